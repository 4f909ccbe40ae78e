"""Training throughput and peak memory: full-rank vs LoRA vs MoRA vs ReMoRA on the same small Llama, one run.

Each method trains in its own process (a fresh peak-memory counter) through the launcher's own pieces
(``mora_dist.run.build``: the model, a DeepSpeed engine, the ReMoRA callback), on random tokens. Methods are
run in rounds, in a rotated order, and the best round of each is kept, so a busy machine penalises every method
alike. Peak memory is the CUDA allocator's peak on a GPU, the process's peak RSS on CPU.

Commands::

    python benchmarks/bench_train.py                              # CPU defaults, about 3 minutes on 2 cores
    python benchmarks/bench_train.py --hidden 1024 --layers 8 --seq 1024 --batch 8 --steps 50   # on a GPU
    python benchmarks/bench_train.py --json bench_train.json

Goal: MoRA and ReMoRA at >= 0.95x LoRA's tokens/s, and faster than full-rank training.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("full", "lora", "mora", "remora")


def run_config(method: str, args: argparse.Namespace) -> dict:
    """The run config of one method: same model, data shape, optimizer and ZeRO stage for all four."""
    heads = max(1, args.hidden // 64)
    raw = {
        "model": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": heads,
                  "num_kv_heads": heads, "intermediate_size": args.hidden * 8 // 3 // 8 * 8,
                  "vocab_size": args.vocab, "dtype": args.dtype},
        "optimizer": {"lr": 1e-3, "torch_adam": True},
        "scheduler": {"name": "constant"},
        "deepspeed": {"zero_optimization": {"stage": args.zero}},
        "data": {"sources": [{"name": "bench", "path": str(ROOT / "data/shakespeare/plays.txt.gz")}],
                 "tokenizer": str(ROOT / "data/shakespeare/tokenizer.json"), "seq_len": args.seq},
        "training": {"output_dir": "/tmp/bench_train", "max_steps": args.steps + args.warmup,
                     "micro_batch_size": args.batch, "global_batch_size": args.batch},
    }
    # Adapters on every linear layer; embeddings, norms and the head train fully in every method (pretraining).
    save = ["embed_tokens", "lm_head", "*norm"]
    if method == "lora":
        raw["lora"] = {"r": args.r, "target_modules": "all-linear", "modules_to_save": save}
    elif method in ("mora", "remora"):
        raw["mora"] = {"r": args.r, "mora_type": 1, "target_modules": "all-linear", "modules_to_save": save}
    if method == "remora":
        raw["remora"] = {"merge_every": args.merge_every, "mora_types": [1, 2]}
    return raw


def worker(method: str, args: argparse.Namespace) -> dict:
    """Train ``method`` for ``warmup + steps`` steps; tokens/s over the timed steps and the peak memory."""
    import torch
    import torch.distributed as dist

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("BENCH_PORT", "29533"))
    from mora_dist.model import count_parameters
    from mora_dist.run import build, deepspeed_engine, distributed, hf
    from mora_dist.run.config import validate_run_config

    cfg = validate_run_config(run_config(method, args))
    distributed.init_distributed(cpu_threads=args.threads)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    model = hf.build_hf_model(cfg, args.vocab, 0)
    trainable, total = count_parameters(model)
    engine = deepspeed_engine.build_engine(cfg, model, 1)
    callbacks = build.build_callbacks(cfg)
    callbacks.on_train_begin(engine)
    device = distributed.device()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen) for _ in range(4)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x = batches[step % len(batches)].to(device)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        callbacks.on_step_end(engine)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    seconds = time.perf_counter() - start
    dist.destroy_process_group()
    merges = sum(getattr(cb, "merges", 0) for cb in callbacks.callbacks)
    return {"method": method, "tokens_per_second": args.steps * args.batch * args.seq / seconds,
            "peak_mib": peak, "trainable_params": trainable, "total_params": total, "merges": merges,
            "device": device.type}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--r", type=int, default=16, help="LoRA rank; MoRA gets the same parameter budget")
    p.add_argument("--merge-every", type=int, default=10, help="ReMoRA merge period (merges are timed)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: robust on a shared box)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return 0
    methods = args.methods.split(",")
    best: dict[str, dict] = {}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("json", "worker", "methods") and v is not None]
    for rnd in range(args.rounds):
        for method in methods[rnd % len(methods):] + methods[: rnd % len(methods)]:
            env = {**os.environ, "BENCH_PORT": str(29533 + rnd)}
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--worker", method], env=env,
                                  capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(lines[-1][7:])
            if method not in best or result["tokens_per_second"] > best[method]["tokens_per_second"]:
                best[method] = result
    lora = best.get("lora", {}).get("tokens_per_second")
    print(f"{'method':8} {'tokens/s':>10} {'x LoRA':>7} {'peak MiB':>9} {'trainable':>11} {'merges':>6}")
    for m in methods:
        r = best[m]
        rel = f"{r['tokens_per_second'] / lora:.2f}" if lora else "-"
        print(f"{m:8} {r['tokens_per_second']:10.0f} {rel:>7} {r['peak_mib']:9.0f} {r['trainable_params']:11,d} "
              f"{r['merges']:6d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": best}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
