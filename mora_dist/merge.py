"""Model-wide merge: ``W += dW`` in fp32 for every MoRA layer, then ``M = 0``. Backend-neutral, local to each
rank (a tensor-parallel rank merges its own shard). Optimizer copies of ``M`` (ZeRO masters, moments) are the
business of :mod:`mora_dist.training.zero_state`.

Spec: §2.4, §3 step 1.
"""

from __future__ import annotations

import torch
from torch import nn

from mora_dist.model import mora_layers


@torch.no_grad()
def merge_mora(model: nn.Module, reinit: bool = True) -> int:
    """Fold every layer's ``dW`` into its frozen base weight; zero ``M`` if ``reinit``. Returns the layer count."""
    count = 0
    for _, layer in mora_layers(model):
        layer.merge(reinit=reinit)
        count += 1
    return count
