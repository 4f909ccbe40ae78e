"""The one merge path. :func:`fold_delta` is the only code that adds an update into a frozen base weight (every
layer's ``merge``, ReMoRA/ReLoRA, export, ``merge_mora`` and ``unload`` reach it through the layers). Local to each
rank (a tensor-parallel rank merges its own shard). Optimizer copies of the adapter (ZeRO masters, moments) are the
business of :mod:`mora_dist.training.optimizer_state`.

Merges into a bf16/fp16 base are compensated: each layer keeps what the base dtype rounded away in the buffer
``mora_base_residual`` and adds it to the next merge, so repeated merges accumulate as fp32 would (chosen over an
fp32 base, which costs the same memory but changes the forward, DeepSpeed's cast and ZeRO-3's gathers, and over
stochastic rounding, which is unbiased but after 10 merges of 0.1 % of ``|W|`` leaves 40 % of entries more than a
bf16 step off).

Spec: §2.4, §3 step 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
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


def new_residual(weight: torch.Tensor) -> torch.Tensor | None:
    """A zero compensation buffer for ``weight`` (its shape, device and :data:`RESIDUAL_DTYPES` dtype), or
    ``None`` for a base of fp32 or wider, which needs none."""
    dtype = RESIDUAL_DTYPES.get(weight.dtype)
    shape = getattr(weight, "ds_shape", weight.shape)  # a ZeRO-3 partitioned weight: its full shape
    return None if dtype is None else torch.zeros(shape, dtype=dtype, device=weight.device)


@torch.no_grad()
def fold_layer(layer: nn.Module, delta: torch.Tensor, part: int | None = None) -> FoldNorms:
    """Fold ``delta`` into ``layer._base_weight_shard()`` with the layer's compensation buffer
    (``mora_base_residual``, created at the first merge into a bf16/fp16 base when ``layer.merge_compensation``;
    a buffer that exists, e.g. loaded from a checkpoint, is always used so nothing it holds is dropped).
    ``part``: fold into slice ``part`` of the weight and buffer only (one expert of a fused ``(E, d, k)`` weight).

    Raises:
        MoRAError: the buffer's shape differs from the weight's (a checkpoint of another layout).
    """
    weight = layer._base_weight_shard()
    residual = getattr(layer, RESIDUAL)
    if residual is None and layer.merge_compensation:
        residual = new_residual(weight)
        setattr(layer, RESIDUAL, residual)
    if residual is not None and residual.shape != weight.shape:
        raise MoRAError(f"{type(layer).__name__}: {RESIDUAL} has shape {tuple(residual.shape)} but the base "
                        f"weight has {tuple(weight.shape)}; load a checkpoint written with the same layout")
    if part is not None:
        weight, residual = weight[part], None if residual is None else residual[part]
    return fold_delta(weight, delta, residual)


def match_residual_to_state(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: give ``module`` a compensation buffer exactly when the state dict has one (a checkpoint
    written after a bf16 merge has it; one written before, or in fp32, has not), so loads stay strict."""
    value = state_dict.get(prefix + RESIDUAL)
    current = getattr(module, RESIDUAL)
    if value is None:
        setattr(module, RESIDUAL, None)
    elif current is None or current.shape != value.shape or current.dtype != value.dtype:
        device = module._base_weight_shard().device
        setattr(module, RESIDUAL, torch.zeros(value.shape, dtype=value.dtype, device=device))
