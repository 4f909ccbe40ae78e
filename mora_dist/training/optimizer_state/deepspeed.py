"""Every copy of a trainable parameter and of its optimizer state, under plain torch and DeepSpeed ZeRO 0-3.

The only module that touches DeepSpeed optimizer internals; it implements
:class:`mora_dist.training.optimizer_state.OptimizerState` (as :mod:`.megatron` does for megatron-core's
optimizers). A parameter ``p`` of the module may have:
- the module copy (``p.data``; under ZeRO-3 only the partition ``p.ds_tensor``, gathered on demand);
- an fp32 master (ZeRO-1/2 and ``BF16_Optimizer``: a fragment of a flat partition, reached through
  ``p._hp_mapping``; ZeRO-3: a partition, reached through ``p._z3_optimizer``; ZeRO-0 with bf16: a separate fp32
  tensor of DeepSpeed's ``FP16_UnfusedOptimizer`` or a slice of ``FP16_Optimizer``'s flat buffer; plain fp32:
  none, ``p`` is its own master);
- optimizer moments (``exp_avg``, ``exp_avg_sq``) keyed by that master.
Writing only ``p.data`` is undone at the next step at stages 1-3 (the master is copied back) and
``optimizer.state[p]`` is empty under ZeRO. The functions here read and write the *full* value (shape of
``p``, fp32) and apply it to every copy. They are collective over the data-parallel group: call them on every
rank with the same value.

Facts of DeepSpeed 0.19 this relies on: ``safe_set_full_*`` under ZeRO-3 slices the unpadded value and fails
when ``p.numel()`` is not divisible by the partition count, so ZeRO-3 writes go through ``safe_set_local_*``
with this rank's padded slice; when an engine that has already stepped loads a checkpoint, ZeRO-1/2/BF16
re-link ``_hp_mapping`` without the optimizer-state fragments (the setters then fail with a ``TypeError``),
which :func:`ensure_state_linked` restores.

Spec: §5.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from deepspeed import utils as ds_utils
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.partition_parameters import GatheredParameters
from torch import nn

from mora_dist.errors import MoRAError
from mora_dist.training.optimizer_state.protocol import MOMENT_KEYS


def is_zero3(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 partitioned parameter."""
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: Sequence[nn.Parameter], *, modifier_rank: int | None = None) -> Iterator[None]:
    """Full ``p.data`` inside the block for ZeRO-3 parameters (``GatheredParameters``); writes made on
    ``modifier_rank`` are broadcast and re-partitioned on exit. A no-op for other parameters."""
    z3 = [p for p in params if is_zero3(p)]
    if not z3:
        yield
        return
    with GatheredParameters(z3, modifier_rank=modifier_rank):
        yield


def _inner_state(optimizer: Any) -> dict:
    """The state dict of the torch optimizer under a DeepSpeed ZeRO/BF16 wrapper (keyed by flat partitions)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner.state


def ensure_state_linked(optimizer: Any) -> None:
    """Re-link ZeRO-1/2/BF16 optimizer-state fragments after ``load_checkpoint`` dropped them: DeepSpeed 0.19
    rebuilds ``_hp_mapping`` there but, in an engine that has already stepped, keeps
    ``_hp_optimizer_states_linked=True`` so the next step does not link them again."""
    groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "bf16_groups", None)
    if groups is None or not getattr(optimizer, "_hp_optimizer_states_linked", False):
        return
    if any(getattr(p, "_hp_mapping", None) is not None and p._hp_mapping.optim_fragment is None
           for group in groups for p in group):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _fp16_master(optimizer: Any, p: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """ZeRO-0 with bf16/fp16: ``(master of p, tensor the optimizer state is keyed by, offset of p in it)``."""
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        for lp_group, hp_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for lp, hp in zip(lp_group, hp_group):
                if lp is p:
                    return hp, hp, 0
    if isinstance(optimizer, FP16_Optimizer):
        for lp_group, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            offset = 0
            for lp in lp_group:
                if lp is p:
                    return flat.narrow(0, offset, p.numel()).view_as(p), flat, offset
                offset += lp.numel()
    return None


def _torch_moment(optimizer: Any, p: nn.Parameter, key: str) -> torch.Tensor | None:
    """Moment ``key`` of ``p`` (a view, shape of ``p``) for a plain torch optimizer or DeepSpeed's ZeRO-0 fp16
    wrappers; ``None`` before the first step."""
    master = _fp16_master(optimizer, p)
    if master is None:
        value = optimizer.state.get(p, {}).get(key)
        return value if torch.is_tensor(value) else None
    value = optimizer.optimizer.state.get(master[1], {}).get(key)
    if not torch.is_tensor(value):
        return None
    return value.narrow(0, master[2], p.numel()).view_as(p) if value.dim() == 1 else value


def _z3_local_slice(p: nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """This rank's padded slice of the full ``value`` (the layout of ``p.ds_tensor``)."""
    part = p.ds_tensor.numel()
    optimizer = p._z3_optimizer
    if hasattr(optimizer, "_get_param_partition_rank"):  # newer DeepSpeed: a partition group per parameter
        rank = optimizer._get_param_partition_rank(p)
    else:  # older DeepSpeed (0.16-0.18) partitions every parameter over the data-parallel group
        rank = torch.distributed.get_rank(group=optimizer.dp_process_group)
    flat = value.detach().flatten().float()
    padded = torch.zeros(part * (rank + 1), dtype=flat.dtype, device=flat.device)
    n = min(flat.numel(), padded.numel())
    padded[:n] = flat[:n]
    return padded[part * rank:]


def check(optimizer: Any, named_params: Sequence[tuple[str, nn.Parameter]]) -> None:
    """Raise ``MoRAError`` naming the parameter if ``optimizer`` does not optimize one of ``named_params``
    (ZeRO-partitioned and ``_hp_mapping`` parameters are DeepSpeed's by construction). Changes nothing."""
    for name, p in named_params:
        if is_zero3(p) or hasattr(p, "_hp_mapping") or _fp16_master(optimizer, p) is not None:
            continue
        groups = getattr(optimizer, "param_groups", None)
        if groups is None or not any(q is p for g in groups for q in g["params"]):
            raise MoRAError(
                f"parameter {name!r} (shape {tuple(p.shape)}) is not optimized by {type(optimizer).__name__}; "
                "build the optimizer (or the DeepSpeed engine) after apply_mora/apply_lora, over the model the "
                "callback merges"
            )


def get_full(optimizer: Any, p: nn.Parameter, key: str | None = None) -> torch.Tensor | None:
    """The full fp32 master (``key=None``) or moment ``key`` of ``p``, shape of ``p``; ``None`` if the optimizer
    holds no such state. Collective under ZeRO 1-3."""
    if is_zero3(p) or hasattr(p, "_hp_mapping"):
        shape = p.ds_shape if is_zero3(p) else p.shape
        if key is None:
            return ds_utils.safe_get_full_fp32_param(p).float().reshape(shape)
        ensure_state_linked(optimizer)
        value = ds_utils.safe_get_full_optimizer_state(p, key)
        return None if value is None else value.float().reshape(shape)
    if key is None:
        master = _fp16_master(optimizer, p)
        return (p if master is None else master[0]).detach().float().clone()
    value = _torch_moment(optimizer, p, key)
    return None if value is None else value.detach().float().clone()


def state_keys(optimizer: Any, p: nn.Parameter) -> list[str]:
    """The moment keys (of ``MOMENT_KEYS``) the optimizer keeps for ``p``, the same on every rank."""
    if is_zero3(p) or hasattr(p, "_hp_mapping"):
        # Per-rank fragments may be absent; the flat groups' state has the same keys on every rank.
        flat_state = next(iter(_inner_state(optimizer).values()), {})
        return [k for k in MOMENT_KEYS if torch.is_tensor(flat_state.get(k))]
    return [k for k in MOMENT_KEYS if _torch_moment(optimizer, p, k) is not None]


@torch.no_grad()
def set_full(optimizer: Any, p: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Write the full ``value`` (shape of ``p``) to the moment ``key`` of ``p``, or with ``key=None`` to the
    parameter itself: the module copy *and* the master, so the next step cannot copy an old value back.
    Collective: call on every rank with the same ``value``."""
    if is_zero3(p):
        if key is None:
            with GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.reshape(p.ds_shape).to(p.dtype))
            ds_utils.safe_set_local_fp32_param(p, _z3_local_slice(p, value))
        else:
            ds_utils.safe_set_local_optimizer_state(p, _z3_local_slice(p, value), key)
        return
    if hasattr(p, "_hp_mapping"):
        if key is None:
            p.data.copy_(value.reshape(p.shape).to(p.dtype))
            ds_utils.safe_set_full_fp32_param(p, value.float().reshape(p.shape))
        else:
            ensure_state_linked(optimizer)
            ds_utils.safe_set_full_optimizer_state(p, value.float().reshape(p.shape), key)
        return
    if key is None:
        p.data.copy_(value.reshape(p.shape).to(p.dtype))
        master = _fp16_master(optimizer, p)
        if master is not None:
            master[0].copy_(value.reshape(p.shape).to(master[0].dtype))
        return
    state = _torch_moment(optimizer, p, key)
    if state is not None:
        state.copy_(value.reshape(state.shape).to(state.dtype))


def zeroed_fraction(optimizer: Any, params: Sequence[nn.Parameter]) -> float:
    """Fraction of the moment entries of ``params`` that read back as exactly zero through DeepSpeed's getters
    (1.0 after a full reset; 0.0 where a reset missed the real state). Collective."""
    zeros = total = 0
    for p in params:
        for key in state_keys(optimizer, p):
            value = get_full(optimizer, p, key)
            if value is not None:
                zeros += int((value == 0).sum())
                total += value.numel()
    return zeros / total if total else 0.0
