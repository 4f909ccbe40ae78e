"""Memorisation of new knowledge: the paper's UUID key -> value task, scaled down.

A small character-level Llama (hidden 192, 4 layers, SwiGLU 512) is first pretrained briefly (150 full-rank
steps) on the shipped corpus; then each method learns ``--pairs`` (64) random ``key:value`` pairs of ``--hex-len``
(6) hex characters for ``--steps`` (150) steps (loss on the value only, the whole set every step): full
fine-tuning, and LoRA, MoRA type 1 and MoRA type 6 at two equal adapter budgets (LoRA ranks 8 and 64; MoRA
``r_hat = round(sqrt((k + d) r))``, even for type 6), for three seeds (a seed draws the pairs and the adapter
initialisation; the pretrained base is the same). Character accuracy and exact match of the
values are measured with teacher forcing; an exact match is then also what greedy decoding would produce.

The paper's claim (spec §6, LLaMA-2 7B, 10k UUID pairs): MoRA memorises much faster than LoRA at the same
parameter count (at 500 steps: MoRA r=256 100 %, LoRA r=256 70.6 %, MoRA r=8 15.7 %, LoRA r=8 10.0 %).
Learning rates: 3e-3 for LoRA (alpha = 2r) and MoRA alike, the best of {1e-3, 3e-3, 1e-2} for LoRA and of
{3e-4, 1e-3, 3e-3} for MoRA type 1 in a 60-step development sweep (r = 8, seed 0); 1e-3 for full fine-tuning.

Usage::

    python benchmarks/memorize.py                          # default: 21 min measured on 2 shared cores (load ~9)
    python benchmarks/memorize.py --device cuda --threads 0 --hidden 768 --layers 12 --heads 12 --intermediate 2048 \
        --pairs 2048 --hex-len 8 --steps 1000 --seeds 0,1,2,3,4
    python benchmarks/memorize.py --pretrain-steps 2 --steps 4 --pairs 8 --hidden 32 --layers 1 \
        --intermediate 48 --heads 2 --seeds 0 --eval-every 2 --ranks 2 --out /tmp/m.json      # toy (CI)

Spec: §2 (types 1 and 6), §3.1 (LoRA), §6.
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

HEX = "0123456789abcdef"


# Output paths, redraw mode and machine settings do not change the figures, so they stay out of the JSON.
_NOT_CONFIG = ("out", "plot", "plot_only", "threads", "device")

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--hex-len", type=int, default=6, help="hex characters of each key and each value")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ranks", default="8,64", help="LoRA ranks of the budgets (MoRA matched to each)")
    p.add_argument("--mora-types", default="1,6")
    p.add_argument("--lora-alpha-ratio", type=float, default=2.0, help="lora_alpha = ratio * r")
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=3e-3)
    p.add_argument("--lr-mora", type=float, default=3e-3)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    ev.add_model_args(p)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves it alone")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ev.RESULTS_DIR / "memorize.json"))
    p.add_argument("--plot", default=None, help="PNG of the curves (default: --out with .png)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    return p.parse_args(argv)


def make_pairs(count: int, hex_len: int, seed: int, tok: ev.CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` distinct random ``key:value\\n`` lines as ``(ids, labels)``, both ``(count, 2 hex_len + 2)``;
    labels are the value characters (and the newline), ``-100`` elsewhere."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    keys: set[str] = set()
    lines = []
    while len(lines) < count:
        key, value = ("".join(HEX[i] for i in torch.randint(0, 16, (hex_len,), generator=gen).tolist())
                      for _ in range(2))
        if key not in keys:
            keys.add(key)
            lines.append(f"{key}:{value}\n")
    ids = torch.stack([tok.encode(line) for line in lines])
    labels = torch.full_like(ids, -100)
    labels[:, hex_len + 1:] = ids[:, hex_len + 1:]
    return ids, labels


@torch.no_grad()
def accuracy(model, ids: torch.Tensor, labels: torch.Tensor, hex_len: int) -> dict[str, float]:
    """Teacher-forced argmax on the value characters: character accuracy and exact match (all correct)."""
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids).logits[:, hex_len: 2 * hex_len]  # position t predicts t + 1: the value
    model.train(was_training)
    correct = logits.argmax(-1) == ids[:, hex_len + 1: 2 * hex_len + 1]
    return {"char_acc": float(correct.float().mean()), "exact": float(correct.all(-1).float().mean())}


def pretrain_base(args, size: ev.ModelSize, tok: ev.CharTokenizer) -> dict[str, torch.Tensor]:
    """Brief full-rank pretraining on the corpus (seed 0); returns the state dict every method starts from."""
    ev.setup_determinism(0, args.threads)
    model = ev.build_model(size, tok.vocab_size, 0, args.device)
    train_ids, _ = ev.split_corpus(tok.encode(ev.load_corpus()))
    gen = torch.Generator().manual_seed(1)

    def batch_fn(step):
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.pretrain_batch,), generator=gen)
        x = torch.stack([train_ids[s: s + args.seq] for s in starts.tolist()]).to(args.device)
        return x, x

    steps = args.pretrain_steps
    ev.train(model, ev.Method("full", "full", lr=1e-3), steps=steps, warmup=max(1, steps // 10), restart_warmup=0,
             batch_fn=batch_fn, eval_fn=lambda m: {}, eval_every=steps + 1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def variants(args) -> list[tuple[str, ev.Method, float | None]]:
    """``(label, method, lora_alpha)``: full fine-tuning, then per budget LoRA and each MoRA type."""
    out = [("FFT", ev.Method("full", "full", lr=args.lr_full), None)]
    for r in (int(v) for v in args.ranks.split(",")):
        out.append((f"LoRA r={r}", ev.Method("lora", "lora", r=r, lr=args.lr_lora), args.lora_alpha_ratio * r))
        for t in (int(v) for v in args.mora_types.split(",")):
            out.append((f"MoRA{t} r={r}", ev.Method(f"mora{t}", "mora", r=r, type_cycle=(t,), lr=args.lr_mora), None))
    return out


def run_one(base_state, method: ev.Method, lora_alpha, seed: int, args, size, tok) -> dict:
    ev.setup_determinism(seed, args.threads)
    model = ev.build_model(size, tok.vocab_size, 0, args.device)
    model.load_state_dict(base_state)
    torch.manual_seed(seed)  # the adapter initialisation (LoRA A) depends on the seed, the base does not
    ev.attach(model, method, lora_alpha=lora_alpha, train_rest=None)
    ids, labels = (t.to(args.device) for t in make_pairs(args.pairs, args.hex_len, seed, tok))
    history = ev.train(model, method, steps=args.steps, warmup=max(1, args.steps // 20), restart_warmup=0,
                       batch_fn=lambda step: (ids, labels), eval_fn=lambda m: accuracy(m, ids, labels, args.hex_len),
                       eval_every=args.eval_every)
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "r_hat": ev.mora_r_hats(model) if method.kind == "mora" else {},
            "eval": history["eval"], "train_loss": history["train_loss"]}


def summarise(runs: list[dict]) -> dict:
    """Mean over seeds of each evaluation point, and the first step at which char accuracy reaches 50 / 90 %."""
    steps = [e["step"] for e in runs[0]["eval"]]
    mean = {key: [sum(r["eval"][i][key] for r in runs) / len(runs) for i in range(len(steps))]
            for key in ("char_acc", "exact")}
    first = {}
    for level in (0.5, 0.9):
        hits = [s for s, a in zip(steps, mean["char_acc"]) if a >= level]
        first[f"steps_to_char_acc_{int(level * 100)}"] = hits[0] if hits else None
    return {"steps": steps, "mean_char_acc": mean["char_acc"], "mean_exact": mean["exact"],
            "final_char_acc": mean["char_acc"][-1], "final_exact": mean["exact"][-1], **first}


def plot(result: dict, path: Path) -> None:
    plt = ev.plot_setup()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    styles = {"LoRA": ("tab:blue", "-"), "MoRA1": ("tab:red", "-"), "MoRA6": ("tab:orange", "-"),
              "FFT": ("black", "-")}
    for label, res in result["variants"].items():
        kind, _, rank = label.partition(" ")
        color, _ = styles.get(kind, ("grey", "-"))
        s = res["summary"]
        ls = "--" if rank and rank.endswith(f"={result['config']['ranks'].split(',')[0]}") else "-"
        axes[0].plot(s["steps"], [100 * a for a in s["mean_char_acc"]], label=label, color=color, ls=ls, lw=1.2)
        axes[1].plot(s["steps"], [100 * a for a in s["mean_exact"]], label=label, color=color, ls=ls, lw=1.2)
    axes[0].set(xlabel="step", ylabel="% (mean over seeds)", title="character accuracy of the value")
    axes[1].set(xlabel="step", title="exact match of the value")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    cfg = result["config"]
    fig.suptitle(f"Memorising {cfg['pairs']} random {cfg['hex_len']}-hex key:value pairs "
                 f"({len(cfg['seeds'].split(','))} seeds); dashed: small budget", fontsize=10, y=1.02)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    lines = ["| method | trainable params | char acc (final) | exact (final) | steps to 50% char "
             "| steps to 90% char |", "|---|---|---|---|---|---|"]
    for label, res in result["variants"].items():
        s = res["summary"]
        lines.append(f"| {label} | {res['trainable_params']:,} | {100 * s['final_char_acc']:.1f} | "
                     f"{100 * s['final_exact']:.1f} | {s['steps_to_char_acc_50'] or '-'} | "
                     f"{s['steps_to_char_acc_90'] or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        result = json.loads(out.read_text(encoding="utf-8"))
        plot(result, Path(args.plot) if args.plot else out.with_suffix(".png"))
        return result
    size = ev.model_size(args, args.seq)
    tok = ev.CharTokenizer()
    t0 = time.perf_counter()
    base_state = pretrain_base(args, size, tok)
    seconds = {"pretrain": time.perf_counter() - t0}
    result = {"config": {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG},
              "variants": {}}
    result["config"]["model"] = ev.size_dict(size)
    for label, method, alpha in variants(args):
        t0 = time.perf_counter()
        runs = [run_one(base_state, method, alpha, int(seed), args, size, tok) for seed in args.seeds.split(",")]
        seconds[label] = time.perf_counter() - t0
        result["variants"][label] = {"trainable_params": runs[0]["trainable_params"], "r_hat": runs[0]["r_hat"],
                                     "lr": method.lr, "lora_alpha": alpha, "summary": summarise(runs),
                                     "per_seed_final": [r["eval"][-1] for r in runs]}
        s = result["variants"][label]["summary"]
        print(f"{label:12s} params={runs[0]['trainable_params']:>9,d} char={100 * s['final_char_acc']:5.1f}% "
              f"exact={100 * s['final_exact']:5.1f}% ({seconds[label]:.0f}s)", flush=True)
    ev.write_json(out, result, volatile={"machine": ev.machine(), "seconds": seconds})
    plot(result, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
