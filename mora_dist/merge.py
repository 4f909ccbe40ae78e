"""The one merge path. :func:`fold_delta` is the only code that adds an update into a frozen base weight (every
layer's ``merge``, ReMoRA/ReLoRA, export and ``unload`` reach it through the layers); :func:`merge_mora` merges
a whole model. Local to each rank (a tensor-parallel rank merges its own shard). Optimizer copies of the adapter
(ZeRO masters, moments) are the business of :mod:`mora_dist.training.zero_state`.

Spec: §2.4, §3 step 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class FoldNorms(NamedTuple):
    """Squared Frobenius norms (float64 sums) of one fold: the update ``dW`` and what the base could not hold."""

    delta_sq: float
    residual_sq: float


@torch.no_grad()
def fold_delta(weight: torch.Tensor, delta: torch.Tensor) -> FoldNorms:
    """``weight += delta`` in fp32 (or ``delta``'s dtype if wider), rounded once to ``weight``'s dtype.

    Args:
        weight: the frozen base weight (shard), ``(d, k)``, written in place.
        delta: ``dW: (d, k)``.

    Returns:
        ``||dW||^2`` and ``||(W + dW) - stored||^2``, the part rounded away by ``weight``'s dtype.

    Spec: §2.4, §3 step 1.
    """
    dtype = torch.promote_types(delta.dtype, torch.float32)
    exact = weight.to(dtype) + delta.to(weight.device, dtype)
    weight.copy_(exact)
    lost = exact - weight.to(dtype)
    return FoldNorms(float(delta.double().pow(2).sum()), float(lost.double().pow(2).sum()))


@torch.no_grad()
def merge_mora(model: nn.Module, reinit: bool = True) -> int:
    """Fold every layer's ``dW`` into its frozen base weight; zero ``M`` if ``reinit``. Returns the layer count."""
    from mora_dist.model import mora_layers  # model imports layer, which merges through this module

    count = 0
    for _, layer in mora_layers(model):
        layer.merge(reinit=reinit)
        count += 1
    return count
