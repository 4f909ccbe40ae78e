"""Rank of the learned update: spectra of ``W - W0`` per method, and the rank ReMoRA adds per cycle.

Three parts, one JSON and two PNGs:

1. **Figure 5 analogue**: from ``pretrain_compare.json`` (run that first), the singular values of the
   accumulated update ``W - W0`` of one block's linear layers for every method, and the numerical rank
   (``sigma > 1e-3 sigma_max``) of every adapted matrix.
2. **Type cycles in training**: ReMoRA pretraining of the same tiny Llama with type cycles (1, 2),
   (1, 2, 3, 4) and (6, 6); after each cycle the mean numerical and entropy-effective rank of ``W - W0`` and the
   held-out loss.
3. **Type cycles, structurally**: for one ``--layer-size`` square layer with ``--layer-r-hat``, the rank of
   ``sum_c dW(M_c, type_c)`` with random ``M_c`` (spec §3 states 1024, 128: types 1+2 give 240, 3 and 4 add
   nothing, 6+6 is full rank).

Usage::

    python benchmarks/rank_spectra.py                  # default: 8 min on 2 shared cores (after pretrain_compare)
    python benchmarks/rank_spectra.py --cycles 3 --merge-every 4 --hidden 32 --layers 1 --intermediate 48 --heads 2 \
        --batch 2 --seq 16 --eval-windows 4 --restart-warmup 1 --layer-size 64 --layer-r-hat 16 \
        --pretrain-json /tmp/p.json --out /tmp/r.json                                              # toy (CI)

Spec: §2.3 (ranks of the types), §3 (type switching), §6.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evidence_common as ev  # noqa: E402
import pretrain_compare as pc  # noqa: E402

from mora_dist import MoRAOperator  # noqa: E402

CYCLES = {"1,2": (1, 2), "1,2,3,4": (1, 2, 3, 4), "6,6": (6, 6)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-json", default=str(ev.RESULTS_DIR / "pretrain_compare.json"))
    p.add_argument("--cycles", type=int, default=4, help="ReMoRA cycles per type cycle")
    p.add_argument("--merge-every", type=int, default=40)
    p.add_argument("--restart-warmup", type=int, default=5)
    p.add_argument("--r", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    ev.add_model_args(p)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--layer-size", type=int, default=1024)
    p.add_argument("--layer-r-hat", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves it alone")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ev.RESULTS_DIR / "rank_spectra.json"))
    p.add_argument("--plot-only", action="store_true", help="redraw the PNGs from an existing --out JSON")
    args = p.parse_args(argv)
    if not 0 <= args.restart_warmup < args.merge_every:
        p.error(f"--restart-warmup={args.restart_warmup} must be below --merge-every={args.merge_every}")
    return args


def structural_ranks(size: int, r_hat: int, seed: int) -> dict[str, list[int]]:
    """Rank of ``sum_{c <= i} dW(M_c, type_c)`` after each cycle, random ``M_c``, for each type cycle."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for label, cycle in CYCLES.items():
        total = torch.zeros(size, size, dtype=torch.float64)
        ranks = []
        for t in cycle * 2:
            M = torch.randn(r_hat, r_hat, generator=gen, dtype=torch.float64)
            total += MoRAOperator(size, size, r_hat, t).delta_weight(M).double()
            ranks.append(int(torch.linalg.matrix_rank(total)))
        out[label] = ranks
    return out


def cycle_run(cycle: tuple[int, ...], args, train_ids, windows, size: ev.ModelSize, tok) -> dict:
    """ReMoRA pretraining with ``cycle``; rank of ``W - W0`` and held-out loss at the end of every cycle."""
    ev.setup_determinism(args.seed, args.threads)
    model = ev.build_model(size, tok.vocab_size, args.seed, args.device)
    initial = ev.linear_weights(model)
    steps = args.cycles * args.merge_every
    method = ev.Method("remora", "mora", r=args.r, type_cycle=cycle, merge_every=args.merge_every, lr=args.lr)
    ev.attach(model, method, lora_alpha=None, train_rest=ev.PRETRAIN_FULLY)
    gen = torch.Generator().manual_seed(args.seed + 1)
    device_windows = windows.to(args.device)

    def batch_fn(step):
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s: s + args.seq] for s in starts.tolist()]).to(args.device)
        return x, x

    def after_cycle(c, m):
        return {**ev.mean_rank_of_updates(m, initial), **pc.perplexity(m, device_windows, args.batch)}

    history = ev.train(model, method, steps=steps, warmup=min(args.merge_every, max(1, steps // 10)),
                       restart_warmup=args.restart_warmup, batch_fn=batch_fn, eval_fn=lambda m: {},
                       eval_every=steps + 1, on_restart=after_cycle)
    per_cycle = [{k: v for k, v in r.items() if k != "step"} for r in history["restarts"]]
    per_cycle.append(after_cycle(args.cycles - 1, model))  # the last cycle ends with the run, without a merge
    return {"types": list(cycle), "r_hat": ev.mora_r_hats(model), "per_cycle": per_cycle}


def figure5(pretrain: dict) -> dict:
    """Per method: the numerical rank of every matrix and the probe block's singular values."""
    out = {}
    for name, res in pretrain["methods"].items():
        out[name] = {"rank": {k: v["rank"] for k, v in res["rank"].items()}, "sigma": res["sigma"]}
    return out


def plot_spectra(fig5: dict, path: Path) -> None:
    plt = ev.plot_setup()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, res in fig5.items():
        color = ev.METHOD_COLORS.get(name)
        for ax, suffix in zip(axes[:2], ("self_attn.q_proj", "mlp.down_proj")):
            key = next((k for k in res["sigma"] if k.endswith(suffix)), None)
            if key:
                sigma = res["sigma"][key]
                ax.semilogy(range(1, len(sigma) + 1), [s / sigma[0] for s in sigma], label=name, color=color, lw=1.2)
                ax.set(title=f"{key.removeprefix('model.layers.')}: spectrum of W - W0", xlabel="index i",
                       ylabel="sigma_i / sigma_1", ylim=(1e-5, 1.5))
        names = list(res["rank"])
        axes[2].plot(range(len(names)), [res["rank"][n] for n in names], marker="o", ms=2.5, label=name,
                     color=color, lw=1)
    axes[2].set(title="rank of W - W0 per matrix", xlabel="matrix (block-major order)",
                ylabel="rank (sigma > 1e-3 sigma_1)")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_cycles(result: dict, path: Path) -> None:
    plt = ev.plot_setup()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, res in result["training_cycles"].items():
        x = range(1, len(res["per_cycle"]) + 1)
        axes[0].plot(x, [c["mean_rank"] for c in res["per_cycle"]], marker="o", label=f"types ({label})")
        axes[1].plot(x, [c["loss"] for c in res["per_cycle"]], marker="o", label=f"types ({label})")
    for label, ranks in result["structural"]["ranks"].items():
        axes[2].plot(range(1, len(ranks) + 1), ranks, marker="o", label=f"types ({label})")
    axes[0].set(title="ReMoRA training: mean rank of W - W0", xlabel="cycle", ylabel="rank (sigma > 1e-3 sigma_1)")
    axes[1].set(title="ReMoRA training: held-out loss", xlabel="cycle", ylabel="nats / char")
    s = result["structural"]
    axes[2].set(title=f"random M: rank of sum of dW ({s['size']}x{s['size']}, r_hat={s['r_hat']})",
                xlabel="cycle", ylabel="rank")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        result = json.loads(out.read_text(encoding="utf-8"))
        if "figure5" in result:
            plot_spectra(result["figure5"], out.with_name(out.stem + "_methods.png"))
        plot_cycles(result, out.with_name(out.stem + "_cycles.png"))
        return result
    result = {"config": {k: v for k, v in vars(args).items()
                         if k not in ("out", "threads", "device", "pretrain_json")}}
    pretrain_path = Path(args.pretrain_json)
    if pretrain_path.exists():
        pretrain = json.loads(pretrain_path.read_text(encoding="utf-8"))
        result["figure5"] = figure5(pretrain)
        result["figure5_source"] = pretrain_path.name
        plot_spectra(result["figure5"], out.with_name(out.stem + "_methods.png"))
    else:
        print(f"{pretrain_path} not found: run benchmarks/pretrain_compare.py first for the per-method spectra")
    t0 = time.perf_counter()
    result["structural"] = {"size": args.layer_size, "r_hat": args.layer_r_hat,
                            "ranks": structural_ranks(args.layer_size, args.layer_r_hat, args.seed)}
    size = ev.model_size(args, args.seq)
    tok = ev.CharTokenizer()
    train_ids, held_ids = ev.split_corpus(tok.encode(ev.load_corpus()))
    windows = pc.held_out_windows(held_ids, args.eval_windows, args.seq)
    result["training_cycles"] = {}
    for label, cycle in CYCLES.items():
        res = cycle_run(cycle, args, train_ids, windows, size, tok)
        result["training_cycles"][label] = res
        print(f"types ({label}): rank per cycle {[round(c['mean_rank'], 1) for c in res['per_cycle']]} "
              f"loss {[round(c['loss'], 4) for c in res['per_cycle']]}", flush=True)
    print("structural:", result["structural"]["ranks"])
    ev.write_json(out, result, volatile={"machine": ev.machine(), "seconds": time.perf_counter() - t0})
    plot_cycles(result, out.with_name(out.stem + "_cycles.png"))
    return result


if __name__ == "__main__":
    main()
