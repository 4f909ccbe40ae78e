"""The one merge path. :func:`fold_delta` is the only code that adds an update into a frozen base weight (every
layer's ``merge``, ReMoRA/ReLoRA, export, ``merge_mora`` and ``unload`` reach it through the layers). Local to each
rank (a tensor-parallel rank merges its own shard). Optimizer copies of the adapter (ZeRO masters, moments) are the
business of :mod:`mora_dist.training.optimizer_state`.

Merges into a bf16/fp16 base are compensated: each layer keeps what the base dtype rounded away in the buffer
``mora_base_residual`` and adds it to the next merge, so repeated merges accumulate as fp32 would (chosen over an
fp32 base, which costs the same memory but changes the forward, DeepSpeed's cast and ZeRO-3's gathers, and over
stochastic rounding, which is unbiased but after 10 merges of 0.1 % of ``|W|`` leaves 40 % of entries more than a
bf16 step off).

Under data parallelism the buffer can be sharded (:func:`shard_residual`): each of the ``N`` ranks keeps the
residual of one contiguous ``1/N`` slice of the flattened weight, folds that slice only, and the new weight is
all-gathered, one layer at a time. The fold is elementwise, so the result is bit-identical to the unsharded one.

Spec: §2.4, §3 step 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from mora_dist.errors import MoRAError


class FoldNorms(NamedTuple):
    """Squared Frobenius norms (float64 sums) of one fold: the update ``dW`` and what the base could not hold."""

    delta_sq: float
    residual_sq: float


# The compensation buffer's dtype per base dtype: bf16 keeps bf16's exponent range, so a residual of about
# 2^-9 |W| keeps 8 significant bits; fp16 would hold it as a subnormal (few or no bits), so it gets fp32.
# An fp32 (or wider) base rounds dW away only below 2^-24 |W|: no buffer.
RESIDUAL_DTYPES = {torch.bfloat16: torch.bfloat16, torch.float16: torch.float32}
RESIDUAL = "mora_base_residual"


@torch.no_grad()
def fold_delta(weight: torch.Tensor, delta: torch.Tensor, residual: torch.Tensor | None = None) -> FoldNorms:
    """``weight += delta`` in fp32 (or ``delta``'s dtype if wider), rounded once to ``weight``'s dtype, with
    compensated summation when ``residual`` is given: ``exact = W + dW + residual``, ``W = round(exact)``,
    ``residual = exact - W``. ``W + residual`` is then the sum of every update so far (as fp32 would hold it)
    while ``W`` alone, what the forward uses, is the nearest ``weight`` dtype value to it.

    Args:
        weight: the frozen base weight (shard), ``(d, k)``, written in place.
        delta: ``dW: (d, k)``.
        residual: ``(d, k)``, what earlier folds could not put into ``weight``; updated in place.

    Returns:
        ``||dW||^2`` and ``||exact - W||^2``, what ``weight``'s dtype could not absorb (carried in ``residual``
        when given, else lost).

    Spec: §2.4, §3 step 1.
    """
    dtype = torch.promote_types(delta.dtype, torch.float32)
    exact = weight.to(dtype) + delta.to(weight.device, dtype)
    if residual is not None:
        exact += residual.to(dtype)
    weight.copy_(exact)
    lost = exact - weight.to(dtype)
    if residual is not None:
        residual.copy_(lost)
    return FoldNorms(float(delta.double().pow(2).sum()), float(lost.double().pow(2).sum()))


def weight_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The full shape of a base weight (a ZeRO-3 partitioned weight keeps it in ``ds_shape``)."""
    return tuple(getattr(weight, "ds_shape", weight.shape))


def new_residual(weight: torch.Tensor, shard: ResidualShard | None = None) -> torch.Tensor | None:
    """A zero compensation buffer for ``weight`` (its device and :data:`RESIDUAL_DTYPES` dtype; its shape, or
    ``(shard.chunk,)`` for the slice a sharded layer keeps), or ``None`` for a base of fp32 or wider, which needs
    none."""
    dtype = RESIDUAL_DTYPES.get(weight.dtype)
    shape = weight_shape(weight) if shard is None else (shard.chunk,)
    return None if dtype is None else torch.zeros(shape, dtype=dtype, device=weight.device)


@dataclass(frozen=True)
class ResidualShard:
    """Which slice of a layer's flattened weight this rank keeps the residual of: ``[lo, hi)`` of ``numel``
    entries, in ``chunk``-sized pieces (``ceil(numel / world)``, the last padded) over the data-parallel ``group``.
    """

    group: Any
    rank: int
    world: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def chunk(self) -> int:
        return -(-self.numel // self.world)

    @property
    def lo(self) -> int:
        return min(self.rank * self.chunk, self.numel)

    @property
    def hi(self) -> int:
        return min(self.lo + self.chunk, self.numel)


SHARD = "mora_residual_shard"


@torch.no_grad()
def shard_residual(layer: nn.Module, group: Any = None) -> None:
    """Keep ``layer``'s compensation buffer as this rank's slice of the flattened weight over the data-parallel
    ``group`` (default: the world): a 1-D ``(chunk,)`` buffer, left out of ``state_dict`` (each rank's slice is
    saved by :mod:`mora_dist.training.residual_shards`). An existing full buffer keeps its values in the slice.
    Every rank of ``group`` must then take part in each merge (it all-gathers the new weight). Spec: §2.4."""
    weight = layer._base_weight_shard()
    shard = ResidualShard(group, dist.get_rank(group), dist.get_world_size(group), weight_shape(weight))
    residual = getattr(layer, RESIDUAL)
    if residual is not None and residual.dim() != 1:
        if tuple(residual.shape) != shard.shape:
            raise MoRAError(f"{type(layer).__name__}: {RESIDUAL} has shape {tuple(residual.shape)} but the base "
                            f"weight has {shard.shape}; load a checkpoint written with the same layout")
        residual = pad_to_chunk(residual.reshape(-1)[shard.lo:shard.hi], shard)
    layer.register_buffer(RESIDUAL, residual, persistent=False)
    setattr(layer, SHARD, shard)


def pad_to_chunk(values: torch.Tensor, shard: ResidualShard, device: torch.device | None = None) -> torch.Tensor:
    """``values`` (the ``hi - lo`` entries of a rank's slice, 1-D) zero-padded to ``(shard.chunk,)``, on
    ``device`` (default: ``values``')."""
    out = torch.zeros(shard.chunk, dtype=values.dtype, device=values.device if device is None else device)
    out[: values.numel()] = values
    return out


@torch.no_grad()
def fold_layer(layer: nn.Module, delta: torch.Tensor, part: int | None = None, *, sync: bool = True) -> FoldNorms:
    """Fold ``delta`` into ``layer._base_weight_shard()`` with the layer's compensation buffer
    (``mora_base_residual``, created at the first merge into a bf16/fp16 base when ``layer.merge_compensation``;
    a buffer that exists, e.g. loaded from a checkpoint, is always used so nothing it holds is dropped).
    ``part``: fold into slice ``part`` of the weight and buffer only (one expert of a fused ``(E, d, k)`` weight).
    A layer whose buffer is sharded (:func:`shard_residual`) folds its slice and all-gathers the weight; with
    ``sync=False`` the gather is left to :func:`sync_weight` (one gather after every part of a fused weight).

    Raises:
        MoRAError: the buffer's shape differs from the weight's (a checkpoint of another layout).
    """
    weight = layer._base_weight_shard()
    residual = getattr(layer, RESIDUAL)
    shard = getattr(layer, SHARD, None)
    if shard is not None:
        return _fold_slice(layer, weight, delta, part, shard, sync)
    if residual is None and layer.merge_compensation:
        residual = new_residual(weight)
        setattr(layer, RESIDUAL, residual)
    if residual is not None and residual.shape != weight.shape:
        raise MoRAError(f"{type(layer).__name__}: {RESIDUAL} has shape {tuple(residual.shape)} but the base "
                        f"weight has {tuple(weight.shape)}; load a checkpoint written with the same layout")
    if part is not None:
        weight, residual = weight[part], None if residual is None else residual[part]
    return fold_delta(weight, delta, residual)


def _fold_slice(layer: nn.Module, weight: torch.Tensor, delta: torch.Tensor, part: int | None,
                shard: ResidualShard, sync: bool) -> FoldNorms:
    """:func:`fold_layer` for a sharded buffer: fold the overlap of ``delta`` (flat range ``[start, start + n)``
    of the weight) with this rank's ``[lo, hi)``; the norms are the whole layer's on every rank."""
    if tuple(weight.shape) != shard.shape:
        raise MoRAError(f"{type(layer).__name__}: the base weight has shape {tuple(weight.shape)} where its "
                        f"sharded {RESIDUAL} expects {shard.shape}; gather a ZeRO-3 weight before merging")
    residual = getattr(layer, RESIDUAL)
    if residual is None and layer.merge_compensation:
        residual = new_residual(weight, shard)
        setattr(layer, RESIDUAL, residual)
    start = 0 if part is None else part * delta.numel()
    a, b = max(shard.lo, start), min(shard.hi, start + delta.numel())
    flat = weight.view(-1)
    lost_sq = 0.0
    if a < b:
        mine = None if residual is None else residual[a - shard.lo: b - shard.lo]
        lost_sq = fold_delta(flat[a:b], delta.reshape(-1)[a - start: b - start], mine).residual_sq
    if sync:
        sync_weight(layer)
    lost = torch.tensor([lost_sq], dtype=torch.float64, device=weight.device)
    dist.all_reduce(lost, group=shard.group)
    return FoldNorms(float(delta.double().pow(2).sum()), float(lost.item()))


@torch.no_grad()
def full_residual(layer: nn.Module) -> torch.Tensor | None:
    """``layer``'s whole compensation buffer in its weight's shape (``None`` without one); a sharded buffer is
    all-gathered from its ranks' slices (collective over the shard group)."""
    shard, mine = getattr(layer, SHARD, None), getattr(layer, RESIDUAL)
    if shard is None or mine is None:
        return mine
    gathered = torch.empty(shard.world * shard.chunk, dtype=mine.dtype, device=mine.device)
    dist.all_gather_into_tensor(gathered, mine, group=shard.group)
    return gathered[: shard.numel].reshape(shard.shape)


@torch.no_grad()
def sync_weight(layer: nn.Module) -> None:
    """All-gather a sharded layer's weight from the slices its ranks folded (collective over the shard group)."""
    shard: ResidualShard = getattr(layer, SHARD)
    flat = layer._base_weight_shard().view(-1)
    gathered = torch.empty(shard.world * shard.chunk, dtype=flat.dtype, device=flat.device)
    dist.all_gather_into_tensor(gathered, pad_to_chunk(flat[shard.lo:shard.hi], shard), group=shard.group)
    flat.copy_(gathered[: shard.numel])


def match_residual_to_state(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: give ``module`` a compensation buffer exactly when the state dict has one (a checkpoint
    written after a bf16 merge has it; one written before, or in fp32, has not), so loads stay strict."""
    value = state_dict.get(prefix + RESIDUAL)
    current = getattr(module, RESIDUAL)
    shard = getattr(module, SHARD, None)
    if shard is not None:  # saved apart (mora_dist.training.residual_shards); a full one from an unsharded
        # checkpoint gives this rank its slice
        if value is not None:
            value = pad_to_chunk(state_dict.pop(prefix + RESIDUAL).reshape(-1)[shard.lo:shard.hi], shard)
            value = value.to(module._base_weight_shard().device)
        setattr(module, RESIDUAL, value)
        return
    if value is None:
        setattr(module, RESIDUAL, None)
    elif current is None or current.shape != value.shape or current.dtype != value.dtype:
        device = module._base_weight_shard().device
        setattr(module, RESIDUAL, torch.zeros(value.shape, dtype=value.dtype, device=device))
