"""Pretraining from scratch: full-rank, LoRA, MoRA, ReLoRA and ReMoRA on the shipped Shakespeare corpus,
same initial weights, same batches, same token budget; the four PEFT methods at the same adapter budget.

The paper's claim (spec §6, 250M on C4): held-out perplexity ReMoRA < MoRA < ReLoRA < LoRA. Here: a 1.8M
character-level Llama (hidden 192, 4 layers, SwiGLU 512), adapters on every linear layer of the blocks at
LoRA rank ``r`` (24 by default, r / hidden = 1/8 as the paper's 128 / 768 ~ 1/6; MoRA
``r_hat = round(sqrt((k + d) r))``: 96 and 130), embeddings, norms and the head trained fully (as in the paper),
300 steps of 16 x 64 characters, a restart every ``--merge-every`` steps for ReLoRA/ReMoRA (4 cycles; ReMoRA types
1 -> 2 -> 1 ...), jagged cosine learning rate. It also stores the spectra of ``W - W0`` for ``rank_spectra.py``.

Usage::

    python benchmarks/pretrain_compare.py                        # default: 19 min measured on 2 shared cores (load ~9)
    python benchmarks/pretrain_compare.py --device cuda --threads 0 --hidden 768 --layers 12 --intermediate 2048 \
        --heads 12 --steps 4000 --merge-every 1000 --batch 64 --seq 256 --r 128
    python benchmarks/pretrain_compare.py --steps 4 --merge-every 2 --hidden 32 --layers 1 --intermediate 48 \
        --heads 2 --batch 2 --seq 16 --eval-windows 4 --warmup 1 --restart-warmup 1 --out /tmp/p.json        # toy (CI)

Spec: §3 (ReMoRA), §3.1 (ReLoRA), §6 (reference results).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evidence_common as ev  # noqa: E402

METHOD_ORDER = ["full", "lora", "mora", "relora", "remora"]


# Output paths, redraw mode and machine settings do not change the figures, so they stay out of the JSON.
_NOT_CONFIG = ("out", "plot", "plot_only", "threads", "device")

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHOD_ORDER))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--merge-every", type=int, default=75, help="ReLoRA/ReMoRA restart period T")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--restart-warmup", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--r", type=int, default=24, help="LoRA rank; MoRA gets the same parameter count")
    p.add_argument("--mora-type", type=int, default=1, help="type of plain MoRA (1 suits large r, spec §2.3)")
    p.add_argument("--remora-types", default="1,2", help="ReMoRA type cycle")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default r: scaling 1)")
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=2e-3)
    p.add_argument("--lr-mora", type=float, default=2e-3)
    ev.add_model_args(p)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows of --seq characters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves it alone")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ev.RESULTS_DIR / "pretrain_compare.json"))
    p.add_argument("--plot", default=None, help="PNG of the curves (default: --out with .png)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    args = p.parse_args(argv)
    ev.check_schedule_args(p, args, METHOD_ORDER)
    return args


def methods(args: argparse.Namespace) -> list[ev.Method]:
    cycle = tuple(int(t) for t in args.remora_types.split(","))
    table = {
        "full": ev.Method("full", "full", lr=args.lr_full),
        "lora": ev.Method("lora", "lora", r=args.r, lr=args.lr_lora),
        "mora": ev.Method("mora", "mora", r=args.r, type_cycle=(args.mora_type,), lr=args.lr_mora),
        "relora": ev.Method("relora", "lora", r=args.r, merge_every=args.merge_every, lr=args.lr_lora),
        "remora": ev.Method("remora", "mora", r=args.r, type_cycle=cycle, merge_every=args.merge_every,
                            lr=args.lr_mora),
    }
    return [table[name] for name in METHOD_ORDER if name in args.methods.split(",")]


def held_out_windows(ids: torch.Tensor, count: int, seq: int) -> torch.Tensor:
    """``count`` evenly spaced windows of ``seq + 1`` ids: ``(count, seq + 1)``."""
    starts = torch.linspace(0, len(ids) - seq - 2, count).long()
    return torch.stack([ids[s: s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int) -> dict[str, float]:
    """Held-out loss (nats per character) and perplexity over all windows."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i: i + batch]
        total += float(model(input_ids=chunk, labels=chunk).loss) * len(chunk)
    model.train(was_training)
    loss = total / len(windows)
    return {"loss": loss, "ppl": math.exp(loss)}


def run_method(method: ev.Method, args, train_ids, windows, size: ev.ModelSize, tok) -> dict:
    ev.setup_determinism(args.seed, args.threads)
    model = ev.build_model(size, tok.vocab_size, args.seed, args.device)
    initial = ev.linear_weights(model)
    ev.attach(model, method, lora_alpha=args.lora_alpha,
              train_rest=None if method.kind == "full" else ev.PRETRAIN_FULLY)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = ev.adapter_parameter_count(model)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    device_windows = windows.to(args.device)

    def batch_fn(step):
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=data_gen)
        x = torch.stack([train_ids[s: s + args.seq] for s in starts.tolist()]).to(args.device)
        return x, x

    t0 = time.perf_counter()
    history = ev.train(model, method, steps=args.steps, warmup=args.warmup, restart_warmup=args.restart_warmup,
                       batch_fn=batch_fn, eval_fn=lambda m: perplexity(m, device_windows, args.batch),
                       eval_every=args.eval_every,
                       on_restart=lambda cycle, m: ev.mean_rank_of_updates(m, initial))
    seconds = time.perf_counter() - t0
    finals = ev.linear_weights(model)
    spectra = {name: ev.spectrum_stats(finals[name] - initial[name]) for name in finals}
    probe = f"model.layers.{size.layers // 2}."
    return {
        "trainable_params": trainable,
        "adapter_params": adapter,
        "lr": method.lr,
        "r_hat": ev.mora_r_hats(model) if method.kind == "mora" else {},
        "final": history["eval"][-1],
        "history": history,
        "rank": {name: {"rank": s["rank"], "effective_rank": s["effective_rank"]} for name, s in spectra.items()},
        "sigma": {name: s["sigma"] for name, s in spectra.items() if name.startswith(probe)},
        "_seconds": seconds,
    }


def plot(result: dict, path: Path, log_every: int) -> None:
    plt = ev.plot_setup()
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, res in result["methods"].items():
        color = ev.METHOD_COLORS.get(name)
        losses = res["history"]["train_loss"]
        ax_train.plot([(i + 1) * log_every for i in range(len(losses))], losses, label=name, color=color, lw=1)
        evals = res["history"]["eval"]
        ax_eval.plot([e["step"] for e in evals], [e["ppl"] for e in evals], marker="o", ms=2.5, label=name,
                     color=color, lw=1)
        for restart in res["history"]["restarts"]:
            ax_train.axvline(restart["step"], color="grey", lw=0.4, ls=":")
    ax_train.set(xlabel="step", ylabel=f"train loss (nats/char, mean of {log_every} steps)", title="training loss")
    late = [e["ppl"] for res in result["methods"].values() for e in res["history"]["eval"] if e["step"] >= 75]
    if late:
        ax_eval.set_ylim(min(late) * 0.97, max(late) * 1.03)
    ax_eval.set(xlabel="step", ylabel="held-out perplexity (per char)", title="held-out perplexity (from step 75)")
    ax_eval.legend(fontsize=8)
    fig.suptitle(f"Pretraining from scratch, {result['config']['model']['hidden']}-wide "
                 f"{result['config']['model']['layers']}-layer char Llama, LoRA r={result['config']['r']} budget",
                 fontsize=10, y=1.02)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    lines = ["| method | trainable params | adapter params | held-out loss | held-out ppl | mean rank(W-W0) |",
             "|---|---|---|---|---|---|"]
    for name, res in result["methods"].items():
        ranks = [v["rank"] for v in res["rank"].values()]
        lines.append(f"| {name} | {res['trainable_params']:,} | {res['adapter_params']:,} | "
                     f"{res['final']['loss']:.4f} | {res['final']['ppl']:.3f} | {sum(ranks) / len(ranks):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        result = json.loads(out.read_text(encoding="utf-8"))
        plot(result, Path(args.plot) if args.plot else out.with_suffix(".png"), log_every=10)
        return result
    size = ev.model_size(args, args.seq)
    tok = ev.CharTokenizer()
    train_ids, held_ids = ev.split_corpus(tok.encode(ev.load_corpus()))
    windows = held_out_windows(held_ids, args.eval_windows, args.seq)
    result = {"config": {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG},
              "methods": {}}
    result["config"]["model"] = ev.size_dict(size)
    result["config"]["tokens_per_method"] = args.steps * args.batch * args.seq
    result["config"]["budget_per_shape"] = ev.lora_budget_table(size, args.r, args.mora_type)
    seconds = {}
    for method in methods(args):
        res = run_method(method, args, train_ids, windows, size, tok)
        seconds[method.name] = res.pop("_seconds")
        result["methods"][method.name] = res
        print(f"{method.name:7s} trainable={res['trainable_params']:>9,d} adapter={res['adapter_params']:>8,d} "
              f"ppl={res['final']['ppl']:.3f} ({seconds[method.name]:.0f}s)", flush=True)
    ev.write_json(out, result, volatile={"machine": ev.machine(), "seconds": seconds})
    plot(result, Path(args.plot) if args.plot else out.with_suffix(".png"), log_every=10)
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
