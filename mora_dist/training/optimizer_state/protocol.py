"""The one interface ReMoRA/ReLoRA use to read and write every copy of a trainable parameter and its optimizer
state. Implemented, as module-level functions, by :mod:`.deepspeed` and :mod:`.megatron` of this package.

Values are always *full* (the shape of the module's parameter ``p``, fp32), whatever shard of the master or
of the moments this rank holds. The functions are collective over the data-parallel group: call them on every
rank, with the same value, in the same order.

Spec: §3, §5.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class OptimizerState(Protocol):
    """What a merge needs from an engine's optimizer (implemented by a module's functions)."""

    def check(self, optimizer: Any, named_params: Sequence[tuple[str, nn.Parameter]]) -> None:
        """Raise ``MoRAError`` naming the parameter if ``optimizer`` does not hold one of ``named_params``; changes
        nothing. A merge calls it before it changes anything."""

    def gathered(self, params: Sequence[nn.Parameter], *, modifier_rank: int | None = None
                 ) -> contextlib.AbstractContextManager[None]:
        """Full ``p.data`` inside the block (ZeRO-3 gathers; a no-op where parameters are never partitioned)."""

    def get_full(self, optimizer: Any, p: nn.Parameter, key: str | None = None) -> torch.Tensor | None:
        """The full fp32 master (``key=None``) or moment ``key`` of ``p``, shape of ``p``; ``None`` if absent."""

    def set_full(self, optimizer: Any, p: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
        """Write the full ``value`` into the moment ``key``, or with ``key=None`` into every copy of ``p`` (the
        module's and the master, in whichever shard holds it)."""

    def state_keys(self, optimizer: Any, p: nn.Parameter) -> list[str]:
        """The moment keys (of :data:`MOMENT_KEYS`) the optimizer keeps for ``p``, the same on every rank."""

    def zeroed_fraction(self, optimizer: Any, params: Sequence[nn.Parameter]) -> float:
        """Fraction of the moment entries of ``params`` that read back as exactly zero."""
