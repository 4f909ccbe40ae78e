"""MoRA on fused experts against PEFT's ``target_parameters`` LoRA at the same trainable-parameter count, side by side
in one run: training-step time (median), tokens/s and peak memory, as ratios against the frozen base.

A tiny-but-wide Mixtral (E=8, top-2). Each variant runs in its own process so its peak resident memory is its own:
``frozen`` (forward and backward through the frozen model, no optimizer), ``mora`` (MoRA r on both expert
parameters, AdamW), ``peft_lora`` (PEFT LoraConfig(target_parameters=..., r) on the same parameters, AdamW) and
``full`` (the experts trained fully). Usage: ``python benchmarks/bench_moe.py [--steps 12] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("frozen", "mora", "peft_lora", "full")
EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def _model(args):
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=512, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=args.seq)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def _run_variant(args) -> dict:
    torch.set_num_threads(args.threads)
    model = _model(args)
    model.requires_grad_(False)
    if args.variant == "mora":
        from mora_dist import MoRAConfig, apply_mora

        apply_mora(model, MoRAConfig(r=args.r, mora_type=1, target_modules=None, target_parameters=EXPERT_PARAMS))
    elif args.variant == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.r, target_modules=[],
                                                 target_parameters=EXPERT_PARAMS))
    elif args.variant == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(".experts." in name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(args.variant == "frozen")
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[2:])
    return {"variant": args.variant, "trainable": sum(p.numel() for p in params), "median_step_s": step,
            "tokens_per_s": args.batch * args.seq / step,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/bench_moe.json")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(_run_variant(args)))
        return 0
    rows = {}
    passed = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "out")]
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, *passed], capture_output=True,
                             text=True, check=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    base = rows["frozen"]
    for row in rows.values():
        row["step_vs_frozen"] = row["median_step_s"] / base["median_step_s"]
        row["peak_rss_vs_frozen"] = row["peak_rss_mib"] / base["peak_rss_mib"]
    summary = {"mora_tokens_per_s_vs_peft_lora": rows["mora"]["tokens_per_s"] / rows["peft_lora"]["tokens_per_s"],
               "mora_peak_rss_vs_peft_lora": rows["mora"]["peak_rss_mib"] / rows["peft_lora"]["peak_rss_mib"]}
    result = {"machine": "CPU", "threads": args.threads, "config": vars(args), "variants": rows, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name:10s} trainable {row['trainable']:>9,d}  step {row['median_step_s'] * 1e3:8.1f} ms "
              f"({row['step_vs_frozen']:.2f}x frozen)  {row['tokens_per_s']:8.0f} tok/s  "
              f"peak {row['peak_rss_mib']:7.0f} MiB ({row['peak_rss_vs_frozen']:.2f}x)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
