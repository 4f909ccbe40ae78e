"""Shared parts of the evidence experiments: corpus, character tokenizer, a tiny Llama, the five
training methods, restarts (ReLoRA/ReMoRA), spectra of ``W - W0``, deterministic JSON and plots.

Everything runs in one process on CPU (or one GPU with ``--device cuda``) with a fixed thread count, seeded
generators and deterministic algorithms, so a rerun with the same seed writes the same JSON.

Why characters, not BPE: the shipped corpus is 1.2 M characters; a character model keeps the vocabulary at 96,
so nearly all parameters sit in the linear layers that the methods adapt (a BPE vocabulary would put most of a
3 M-parameter model in its embeddings), and the memorisation task's "character accuracy" is then per token.

Spec: §2 (MoRA), §3 (ReMoRA), §3.1 (LoRA, ReLoRA), §6 (the claims these scripts test).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from mora_dist import MoRAConfig, apply_mora, compute_r_hat, merge_mora, mora_layers, set_mora_type
from mora_dist.layer import MoRALayerMixin
from mora_dist.lora import LoRALinear, apply_lora, lora_layers

REPO = Path(__file__).resolve().parents[1]
CORPUS_DIR = REPO / "data" / "shakespeare"
RESULTS_DIR = REPO / "benchmarks" / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Printable ASCII and newline: a fixed vocabulary, independent of the corpus (unknown characters become "?").
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))


class CharTokenizer:
    """Characters <-> ids over :data:`ALPHABET` (96 symbols)."""

    def __init__(self) -> None:
        self.stoi = {c: i for i, c in enumerate(ALPHABET)}
        self.unknown = self.stoi["?"]

    @property
    def vocab_size(self) -> int:
        return len(ALPHABET)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.stoi.get(c, self.unknown) for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(ALPHABET[i] for i in ids.tolist())


def load_corpus(root: Path = CORPUS_DIR) -> str:
    """The shipped Shakespeare corpus (every ``*.txt.gz`` under ``root``, in name order)."""
    files = sorted(root.glob("*.txt.gz"))
    if not files:
        raise FileNotFoundError(f"no *.txt.gz corpus under {root}; the repository ships data/shakespeare/")
    return "".join(gzip.open(f, "rt", encoding="utf-8").read() for f in files)


def split_corpus(ids: torch.Tensor, held_out: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / held-out split by position: the last ``held_out`` fraction is never trained on."""
    cut = int(len(ids) * (1.0 - held_out))
    return ids[:cut], ids[cut:]


@dataclass(frozen=True)
class ModelSize:
    """Shape of the tiny Llama (SwiGLU, RoPE, RMSNorm), the 250M model of spec §6 scaled down."""

    hidden: int = 192
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 256


def setup_determinism(seed: int, threads: int) -> None:
    """Seed torch, fix the thread count, use deterministic kernels where torch has them."""
    torch.manual_seed(seed)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def build_model(size: ModelSize, vocab_size: int, seed: int, device: str = "cpu") -> nn.Module:
    """A fresh, seeded Llama of ``size``, fp32, on ``device``."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=size.max_positions, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).float().to(device)


@dataclass(frozen=True)
class Method:
    """One training method: ``kind`` in full / lora / mora, restarts every ``merge_every`` steps (0: never),
    and for MoRA the type of each cycle (``type_cycle[i % len]`` in cycle ``i``)."""

    name: str
    kind: str
    r: int = 0
    type_cycle: tuple[int, ...] = ()
    merge_every: int = 0
    lr: float = 1e-3


def attach(model: nn.Module, method: Method, *, lora_alpha: float | None, train_rest: list[str] | None) -> None:
    """Make ``model`` train by ``method``: all weights (full), or adapters on :data:`TARGETS` plus
    ``train_rest`` (embeddings, norms, head when pretraining from scratch). Spec: §3 (modules trained fully)."""
    if method.kind == "full":
        model.requires_grad_(True)
    elif method.kind == "lora":
        apply_lora(model, TARGETS, r=method.r, lora_alpha=lora_alpha, modules_to_save=train_rest)
    elif method.kind == "mora":
        apply_mora(model, MoRAConfig(r=method.r, mora_type=method.type_cycle[0], target_modules=TARGETS,
                                     modules_to_save=train_rest))
    else:
        raise ValueError(f"method kind={method.kind!r}: use 'full', 'lora' or 'mora'")


def adapter_parameter_count(model: nn.Module) -> int:
    """Trainable parameters of the adapters alone (the budget the PEFT methods must share)."""
    count = sum(layer.mora_M.numel() for _, layer in mora_layers(model))
    return count + sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in lora_layers(model))


def mora_r_hats(model: nn.Module) -> dict[str, int]:
    """``r_hat`` of each distinct ``in x out`` shape (for the JSON)."""
    return {f"{layer.in_features}x{layer.out_features}": layer.r_hat for _, layer in mora_layers(model)}


def lora_budget_table(size: ModelSize, r: int, mora_type: int) -> dict[str, dict[str, int]]:
    """Per shape: LoRA parameters ``(k + d) r`` and MoRA ``r_hat^2`` with ``r_hat`` from ``compute_r_hat``."""
    shapes = {(size.hidden, size.hidden), (size.hidden, size.intermediate), (size.intermediate, size.hidden)}
    table = {}
    for k, d in sorted(shapes):
        r_hat = compute_r_hat(k, d, r, mora_type)
        table[f"{k}x{d}"] = {"lora": (k + d) * r, "mora": r_hat * r_hat, "r_hat": r_hat}
    return table


@torch.no_grad()
def restart(model: nn.Module, optimizer: torch.optim.Optimizer, method: Method, cycle: int) -> None:
    """ReLoRA/ReMoRA restart after cycle ``cycle`` (0-based): merge ``dW`` into ``W`` (fp32), re-initialise the
    adapter (``M = 0``; ReLoRA: new ``A``, ``B = 0``), drop the adapter's Adam state (moments *and* step, so bias
    correction starts again), and switch the MoRA type for the next cycle. Spec: §3 steps 1-4, §3.1."""
    if method.kind == "mora":
        merge_mora(model, reinit=True)
        params = [layer.mora_M for _, layer in mora_layers(model)]
        set_mora_type(model, method.type_cycle[(cycle + 1) % len(method.type_cycle)])
    else:
        params = []
        for _, layer in lora_layers(model):
            layer.merge(reinit=True)
            params += [layer.lora_A, layer.lora_B]
    for p in params:
        optimizer.state.pop(p, None)


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The function each targeted linear layer computes now, as a dense fp32 ``(d, k)`` weight (adapter
    included)."""
    weights = {}
    for name, module in model.named_modules():
        if not name.endswith(tuple(TARGETS)):
            continue
        if isinstance(module, (MoRALayerMixin, LoRALinear)):
            weights[name] = module.base_layer.weight.detach().float() + module.delta_weight().detach()
        elif isinstance(module, nn.Linear):
            weights[name] = module.weight.detach().float().clone()
    return weights


def spectrum_stats(delta: torch.Tensor, rtol: float = 1e-3) -> dict:
    """Singular values of ``delta`` (fp64), its numerical rank (``sigma > rtol sigma_max``) and its entropy
    effective rank ``exp(-sum p log p)``, ``p = sigma / sum sigma`` (Roy and Vetterli, 2007)."""
    sigma = torch.linalg.svdvals(delta.double())
    top = float(sigma[0]) if sigma.numel() else 0.0
    if top == 0.0:
        return {"sigma": sigma.tolist(), "rank": 0, "effective_rank": 0.0}
    p = sigma / sigma.sum()
    p = p[p > 0]
    return {
        "sigma": sigma.tolist(),
        "rank": int((sigma > rtol * top).sum()),
        "effective_rank": float(torch.exp(-(p * p.log()).sum())),
    }


def machine() -> dict[str, str | int]:
    """Where a result was measured (for the README)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def rounded(value, digits: int = 6):
    """Round floats recursively so that JSON files compare exactly across reruns and read well."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def write_json(path: Path, payload: dict, *, volatile: dict | None = None) -> None:
    """Write ``payload`` (rounded, sorted keys); ``volatile`` facts (wall time, machine) go under ``"run"``,
    the one key a reproducibility check ignores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = rounded(payload)
    if volatile is not None:
        body["run"] = rounded(volatile)
    path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def size_dict(size: ModelSize) -> dict:
    return asdict(size)


def add_model_args(parser) -> None:
    """``--hidden --layers --heads --intermediate`` with :class:`ModelSize`'s defaults."""
    default = ModelSize()
    for name in ("hidden", "layers", "heads", "intermediate"):
        parser.add_argument(f"--{name}", type=int, default=getattr(default, name))


def model_size(args, seq: int) -> ModelSize:
    return ModelSize(args.hidden, args.layers, args.heads, args.intermediate, max(256, seq))


def plot_setup():
    """matplotlib with the file-only backend and a small, legible style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
                         "savefig.bbox": "tight", "svg.hashsalt": "mora"})
    return plt


METHOD_COLORS = {"full": "black", "lora": "tab:blue", "relora": "tab:cyan", "mora": "tab:red",
                 "remora": "tab:orange", "mora1": "tab:red", "mora6": "tab:orange"}

PRETRAIN_FULLY = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "model.norm", "lm_head"]


def make_optimizer(model: nn.Module, method: Method, *, steps: int, warmup: int, restart_warmup: int):
    """AdamW over the trainable parameters and ReLoRA's jagged cosine (one cosine over the run, a short warmup
    after each restart; without restarts it is a plain warmup + cosine). Spec: §3 step 5, §3.1."""
    from mora_dist.training.schedulers import JaggedCosineLR

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=method.lr, betas=(0.9, 0.95), weight_decay=0.0)
    cycle = method.merge_every or steps
    scheduler = JaggedCosineLR(optimizer, total_steps=steps, first_warmup=min(warmup, cycle),
                               restart_warmup=restart_warmup if method.merge_every else 0, cycle_length=cycle)
    return optimizer, scheduler


def train(model: nn.Module, method: Method, *, steps: int, warmup: int, restart_warmup: int, batch_fn, eval_fn,
          eval_every: int, log_every: int = 10, on_restart=None) -> dict:
    """The plain loop every experiment shares: ``loss.backward()``, clip to 1, AdamW step, scheduler step, and a
    restart after every ``method.merge_every`` steps (not after the last one).

    Args:
        batch_fn: ``step -> (input_ids, labels)``, labels ``-100`` where no loss is taken.
        eval_fn: ``model -> dict`` of metrics, called at step 0, every ``eval_every`` steps and at the end.
        on_restart: ``(cycle, model) -> dict`` called right after each restart (e.g. the rank of ``W - W0``).

    Returns:
        ``{"eval": [{"step": s, **metrics}], "train_loss": [mean of each log_every steps], "restarts": [...]}``.
    """
    optimizer, scheduler = make_optimizer(model, method, steps=steps, warmup=warmup, restart_warmup=restart_warmup)
    history = {"eval": [], "train_loss": [], "restarts": []}
    model.train()
    window = []
    for step in range(steps):
        if step % eval_every == 0:
            history["eval"].append({"step": step, **eval_fn(model)})
        input_ids, labels = batch_fn(step)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(float(loss.detach()))
        if len(window) == log_every:
            history["train_loss"].append(sum(window) / len(window))
            window = []
        done = step + 1
        if method.merge_every and done % method.merge_every == 0 and done < steps:
            cycle = done // method.merge_every - 1
            restart(model, optimizer, method, cycle)
            history["restarts"].append({"step": done, **(on_restart(cycle, model) if on_restart else {})})
    history["eval"].append({"step": steps, **eval_fn(model)})
    return history


def mean_rank_of_updates(model: nn.Module, initial: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean numerical and entropy-effective rank of ``W - W0`` over the targeted layers."""
    stats = [spectrum_stats(w - initial[name]) for name, w in linear_weights(model).items()]
    return {"mean_rank": sum(s["rank"] for s in stats) / len(stats),
            "mean_effective_rank": sum(s["effective_rank"] for s in stats) / len(stats)}


def check_schedule_args(parser, args, method_order: list[str]) -> None:
    """Refuse, through ``parser.error``, unknown ``--methods`` and a restart schedule the jagged cosine cannot
    run: ``--steps`` a multiple of ``--merge-every``, ``--restart-warmup < --merge-every``,
    ``--warmup <= --merge-every``."""
    unknown = set(args.methods.split(",")) - set(method_order)
    if unknown:
        parser.error(f"--methods has unknown {sorted(unknown)}; choose from {method_order}")
    if args.steps % args.merge_every:
        parser.error(f"--steps={args.steps} must be a multiple of --merge-every={args.merge_every}")
    if not args.restart_warmup < args.merge_every or args.warmup > args.merge_every:
        parser.error(f"need --restart-warmup ({args.restart_warmup}) < --merge-every ({args.merge_every}) and "
                     f"--warmup ({args.warmup}) <= --merge-every")
