"""What the training loop (:mod:`mora_dist.run.loop`) and the callbacks require of a back end and of its engine.

Three back ends implement :class:`Backend`: :class:`~mora_dist.run.hf.HFBackend` (Hugging Face + DeepSpeed),
:class:`~mora_dist.run.megatron.model.MegatronBackend` (megatron-core + DeepSpeed) and
:class:`~mora_dist.run.megatron.native.NativeBackend` (megatron-core alone). Their engines are a DeepSpeed
engine, or :class:`~mora_dist.run.megatron.native.NativeEngine`, which answers DeepSpeed's names.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Engine(Protocol):
    """The parts of a DeepSpeed engine the loop, the checkpoints and the ReMoRA / ReLoRA callbacks use."""

    module: nn.Module
    optimizer: Any
    global_steps: int

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def get_lr(self) -> list[float]: ...

    def get_global_grad_norm(self) -> float | None: ...

    def gradient_accumulation_steps(self) -> int: ...

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any],
                        save_latest: bool = False) -> Any:
        """Write this rank's part of checkpoint ``<save_dir>/<tag>`` with ``client_state``. Collective."""

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, dict[str, Any]]:
        """Restore checkpoint ``<load_dir>/<tag>``; ``(path or None, client_state)``. Collective."""


@runtime_checkable
class Backend(Protocol):
    """Builds the engine of a run and computes the loss of a batch on it.

    A back end whose schedule runs all micro-batches of a step itself (megatron's pipeline) also has
    ``train_step(engine, batches) -> list[float]``; the loop then calls it instead of ``loss``/``backward``/``step``.
    """

    dp_rank: int
    dp_size: int
    dp_group: Any  # the data-parallel process group (None: the whole world)

    def build(self, cfg: Any, vocab_size: int, eos_token_id: int, accum: int) -> tuple[Engine, Any]:
        """``(engine, callbacks)`` for the validated run config."""

    def loss(self, engine: Engine, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean next-token loss of ``input_ids: (b, s)`` and the number of predicted tokens."""
