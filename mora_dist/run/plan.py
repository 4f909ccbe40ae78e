"""What each rank will hold and send, before a process starts (``launch/pretrain.py --check --world-size N``).

The model is built on the ``meta`` device (no memory, any size) exactly as the launcher builds it, adapters
applied, so the inventory of frozen weights, MoRA matrices, other trainable weights and compensation buffers is
the run's own. DeepSpeed's ZeRO rules then place them on a rank:

========================  ==========================================================================================
base weights              the frozen parameters in the model dtype; ZeRO-3: ``ceil(numel / N)`` of each
MoRA matrices, trainable  the module copies of ``M`` and of ``modules_to_save``; ZeRO-3: ``1/N``
gradients                 held after backward: ZeRO-0 an fp32 accumulator and the 16-bit grads, ZeRO-1-3 this rank's
                          16-bit partition
reduce buckets            ``reduce_bucket_size`` elements, as DeepSpeed allocates them for gradient reduction (fp32
                          under ZeRO-1, which accumulates there; 16-bit under ZeRO-2/3; kept by the CUDA caching
                          allocator between backwards)
optimizer states          fp32 masters and Adam's two moments of the trainable parameters; ZeRO-1-3: ``1/N``
compensation buffers      one bf16 residual per adapted weight (ReMoRA / ReLoRA on a 16-bit base), ``1/N`` each
activations               what autograd saves for backward over one micro-batch, traced on ``meta`` (the fused
                          attention kernels' set: q, k, v, output, a float32 log-sum-exp per row)
========================  ==========================================================================================

Communication per optimizer step and rank, computed from the collectives DeepSpeed issues (ring algorithms: an
all-reduce sends ``2 (N-1)/N`` of its bytes, a reduce-scatter or all-gather ``(N-1)/N``): ZeRO-0 all-reduces the
gradients once per step; ZeRO-1 reduce-scatters them once and all-gathers the updated 16-bit weights; ZeRO-2
reduce-scatters every micro-batch; ZeRO-3 also all-gathers every weight in each forward and again in each backward.
The Hugging Face back end has no tensor, pipeline or expert parallelism.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn

from mora_dist.merge import RESIDUAL
from mora_dist.run.build import apply_adapters
from mora_dist.run.config import TORCH_DTYPES, RunConfig, RunConfigError
from mora_dist.run.hf import new_model_config
from mora_dist.run.model_shape import GPTShape

GIB = 2**30
DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default
HEADROOM = 0.9  # of --gpu-memory: the CUDA context, kernel workspaces and fragmentation take the rest

MEMORY_ROWS = ("base weights", "MoRA matrices", "other trainable", "gradients", "reduce buckets",
               "optimizer states", "compensation buffers", "activations")


@dataclass
class Inventory:
    """Bytes of the model as built (whole, not yet placed on ranks), by kind; ``trainable_numel``: elements of
    every trainable parameter (what the optimizer keeps in fp32)."""

    frozen: list[int] = field(default_factory=list)  # bytes of each frozen parameter
    mora: list[int] = field(default_factory=list)
    trainable: list[int] = field(default_factory=list)
    residual: list[int] = field(default_factory=list)
    trainable_numel: int = 0
    activations: int = 0


@dataclass
class Plan:
    """One rank's memory (``memory``: bytes by :data:`MEMORY_ROWS`) and communication (``comm``: bytes sent per
    optimizer step, by parallelism) for ``world`` ranks on ``nodes`` nodes."""

    world: int
    nodes: int
    zero_stage: int
    memory: dict[str, int]
    comm: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.memory.values())

    def fits(self, gpu_bytes: int) -> bool:
        return self.total <= HEADROOM * gpu_bytes

    def render(self, gpu_bytes: int | None = None) -> str:
        """The plan as the launcher prints it; with ``gpu_bytes``, whether it fits."""
        lines = [f"memory plan per rank: world size {self.world} on {self.nodes} node(s), "
                 f"{self.world // self.nodes} per node; DeepSpeed ZeRO-{self.zero_stage}, data parallel {self.world}"]
        for row in MEMORY_ROWS:
            lines.append(f"  {row:<22} {_size(self.memory[row])}")
        lines.append(f"  {'total':<22} {_size(self.total)}")
        lines.append("sent per optimizer step and rank:")
        for kind, sent in self.comm.items():
            lines.append(f"  {kind:<22} {_size(sent)}")
        if gpu_bytes is not None:
            verdict = "fits" if self.fits(gpu_bytes) else "does NOT fit"
            lines.append(f"{verdict} in {gpu_bytes / GIB:.1f} GiB per GPU ({HEADROOM:.0%} usable: "
                         f"{HEADROOM * gpu_bytes / GIB:.1f} GiB)")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / GIB:10.2f} GiB" if n >= GIB else f"{n / 2**20:10.2f} MiB"


def vocab_size_for(cfg: RunConfig) -> int:
    """The vocabulary the run will have, without reaching the hub: ``model.vocab_size``, a local tokenizer
    folder's, or ``data.tokenizer_vocab_size`` (a tokenizer the run trains)."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    if Path(cfg.data.tokenizer).is_dir():
        return len(transformers.AutoTokenizer.from_pretrained(cfg.data.tokenizer))
    if cfg.data.tokenizer_vocab_size is not None:
        return cfg.data.tokenizer_vocab_size
    raise RunConfigError(f"the memory plan needs the vocabulary size, and data.tokenizer={cfg.data.tokenizer!r} "
                         "is not a local folder: pass --set model.vocab_size=<the tokenizer's size>")


class _FusedAttention(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention`` in the trace: the output, saving what the fused kernels
    (flash, memory-efficient) save; the ``meta`` device would otherwise run the unfused math, whose
    ``(s, s)`` probabilities no GPU run keeps."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace stops after forward
        raise NotImplementedError


def _fused_sdpa(query, key, value, *args, **kwargs):
    return _FusedAttention.apply(query, key, value)


def _autocast(device_type: str, *args, **kwargs):
    """``torch.autocast``, but a no-op on ``meta`` (transformers 4.x opens one there for RoPE; ``meta`` has
    no autocast)."""
    return contextlib.nullcontext() if device_type == "meta" else _AUTOCAST(device_type, *args, **kwargs)


_AUTOCAST = torch.autocast


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def trace_activations(model: nn.Module, batch: int, seq_len: int) -> int:
    """Bytes of the distinct storages autograd saves over one forward of ``(batch, seq_len)`` tokens with the
    loss (``model`` on ``meta``; parameters left out)."""
    params = {_storage(t) for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage(t)
        if key not in params:
            saved.setdefault(key, t.untyped_storage().nbytes())
        return t

    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    model.train()
    try:
        torch.nn.functional.scaled_dot_product_attention, torch.autocast = _fused_sdpa, _autocast
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
    finally:
        torch.nn.functional.scaled_dot_product_attention, torch.autocast = sdpa, _AUTOCAST
    return sum(saved.values())


def inventory(cfg: RunConfig, vocab_size: int) -> Inventory:
    """The model of ``cfg`` built on ``meta`` with its adapters, counted (see the module docstring)."""
    m = cfg.model
    if m.gradient_checkpointing:  # its recomputation does not run on meta, and its peak is not traced
        raise RunConfigError("the memory plan does not cover model.gradient_checkpointing=true yet: plan the run "
                             "without it (an upper bound on activations)")
    dtype = TORCH_DTYPES[m.dtype]
    with torch.device("meta"):
        if m.pretrained is not None:
            config = transformers.AutoConfig.from_pretrained(m.pretrained)
            config.vocab_size = max(config.vocab_size, vocab_size)
        else:
            config = new_model_config(cfg, vocab_size, 0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_adapters(cfg, model)
    inv = Inventory()
    for name, p in model.named_parameters():
        size = p.numel() * dtype.itemsize  # DeepSpeed casts every parameter (M too) to the model dtype
        if not p.requires_grad:
            inv.frozen.append(size)
        else:
            (inv.mora if name.endswith("mora_M") else inv.trainable).append(size)
            inv.trainable_numel += p.numel()
    merges = cfg.remora is not None or cfg.relora is not None
    for name, buf in model.named_buffers():
        if name.endswith(RESIDUAL) and merges:
            inv.residual.append(buf.numel() * buf.element_size())
    inv.activations = trace_activations(model, cfg.training.micro_batch_size, cfg.data.seq_len)
    return inv


def _split(sizes: list[int], n: int) -> int:
    """Bytes of a rank's ``1/n`` of each tensor (``ceil``, as ZeRO-3 and the residual shards pad)."""
    return sum(math.ceil(s / n) for s in sizes)


def plan_hf(cfg: RunConfig, world: int, nodes: int = 1, inv: Inventory | None = None) -> Plan:
    """:class:`Plan` of the Hugging Face back end (DeepSpeed ZeRO 0-3, data parallel over ``world`` ranks).

    Raises:
        RunConfigError: ``nodes`` does not divide ``world``; the config is not the Hugging Face back end.
    """
    if cfg.model.backend != "hf":
        raise RunConfigError(f"--check memory plan: model.backend={cfg.model.backend!r} is not planned yet (the plan "
                             "covers backend='hf' under DeepSpeed ZeRO 0-3); drop --gpu-memory / --nodes for it")
    if nodes < 1 or world % nodes:
        raise RunConfigError(f"--nodes {nodes} does not divide --world-size {world}: give a node count that does")
    inv = inv or inventory(cfg, vocab_size_for(cfg))
    zero = cfg.deepspeed_dict().get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    bucket = int(float(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET)))
    n = world
    half = 2  # bytes of a 16-bit element: grads, buckets and gathered weights travel in the model dtype
    sixteen = cfg.model.dtype != "float32"
    t16 = inv.trainable_numel * (half if sixteen else 4)  # the trainable weights in the model dtype
    t32 = inv.trainable_numel * 4
    partitioned = stage == 3
    weights = _split(inv.frozen, n) if partitioned else sum(inv.frozen)
    mora = _split(inv.mora, n) if partitioned else sum(inv.mora)
    trainable = _split(inv.trainable, n) if partitioned else sum(inv.trainable)
    if stage == 0:
        grads = t32 + t16 if sixteen else t32
        masters, moments = (t32 if sixteen else 0), 2 * t32
    else:
        grads = math.ceil(t16 / n)
        masters, moments = (math.ceil(t32 / n) if sixteen else 0), 2 * math.ceil(t32 / n)
    buckets = 0 if stage == 0 else bucket * (half if sixteen and stage > 1 else 4)
    memory = {
        "base weights": weights, "MoRA matrices": mora, "other trainable": trainable, "gradients": grads,
        "reduce buckets": buckets, "optimizer states": masters + moments,
        "compensation buffers": _split(inv.residual, n), "activations": inv.activations,
    }
    accum = max(1, cfg.training.global_batch_size // (cfg.training.micro_batch_size * n))
    ring = (n - 1) / n
    if stage == 0:
        dp = 2 * ring * t16  # one all-reduce at the accumulation boundary
    elif stage == 1:
        dp = 2 * ring * t16  # reduce-scatter at the boundary, all-gather of the updated weights
    elif stage == 2:
        dp = ring * t16 * accum + ring * t16  # reduce-scatter each micro-batch, all-gather after the step
    else:
        every = sum(inv.frozen) + sum(inv.mora) + sum(inv.trainable)
        dp = ring * t16 * accum + 2 * ring * every * accum  # weights gathered in forward and in backward
    comm = {"data parallel": int(dp), "tensor parallel": 0, "pipeline parallel": 0, "expert parallel": 0}
    return Plan(world=world, nodes=nodes, zero_stage=stage, memory=memory, comm=comm)


def expert_ranks(world: int, tp: int, ep: int, etp: int, num_experts: int) -> list[dict[str, int]]:
    """Per global rank (one pipeline stage), its place in megatron-core's default rank order: dense layers TP
    fastest then DP; experts expert TP fastest, then EP, then expert DP; the experts ``first .. first + count - 1``
    its EP rank holds (``local_experts.0 ..``). Spec: §4."""
    count = num_experts // ep
    return [{"rank": g, "tp_rank": g % tp, "dp_rank": g // tp, "etp_rank": g % etp, "ep_rank": (g // etp) % ep,
             "edp_rank": g // (etp * ep), "first_expert": (g // etp) % ep * count, "experts": count}
            for g in range(world)]


def render_expert_layout(cfg: RunConfig, world: int) -> str:
    """``--check`` for a megatron mixture of experts: which experts each rank holds and in which groups."""
    m = cfg.model
    shape = GPTShape.from_pretrained(m.pretrained) if m.pretrained is not None else None
    experts = shape.num_experts if shape is not None else m.arch()["num_experts"]
    tp, ep, etp = m.tensor_model_parallel_size, m.expert_model_parallel_size, m.expert_tensor_parallel_size
    lines = [f"expert layout: {experts} experts over {world} ranks: EP {ep} x expert TP {etp} x expert DP "
             f"{world // (ep * etp)} (dense layers: TP {tp} x DP {world // tp}); "
             f"{m.moe_token_dispatcher_type} dispatcher"]
    share = "whole" if etp == 1 else f"1/{etp} of each"
    for r in expert_ranks(world, tp, ep, etp, experts):
        last = r["first_expert"] + r["experts"] - 1
        lines.append(f"  rank {r['rank']}: TP rank {r['tp_rank']}, DP rank {r['dp_rank']} | EP rank {r['ep_rank']}: "
                     f"experts {r['first_expert']}-{last} ({share}, expert TP rank {r['etp_rank']}), "
                     f"expert DP rank {r['edp_rank']}")
    return "\n".join(lines)


def parse_memory(text: str) -> int:
    """``'80'``, ``'80GiB'``, ``'80GB'`` or ``'141 GiB'`` as bytes (GiB either way: GPU memory is sold in GiB)."""
    value = text.strip().lower().removesuffix("gib").removesuffix("gb").strip()
    try:
        gib = float(value)
    except ValueError:
        raise RunConfigError(f"--gpu-memory {text!r} is not a size: give GiB per GPU, e.g. --gpu-memory 80") from None
    if gib <= 0:
        raise RunConfigError(f"--gpu-memory {text!r} must be positive: give GiB per GPU, e.g. --gpu-memory 80")
    return int(gib * GIB)
