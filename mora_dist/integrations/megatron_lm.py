"""MoRA / ReMoRA inside an existing Megatron-LM ``pretrain()`` script: three additions, ``forward_step`` untouched.

1. Wrap the script's ``model_provider``: :func:`mora_model_provider` builds the model as before, loads base weights
   (optional ``load_base``), applies MoRA, and installs :func:`mora_dist.parallel.finalize_model_grads` on the
   model's config; ``get_model`` then moves it to the GPU and wraps it in ``Float16Module`` and DDP, so DDP sees
   only ``M`` as trainable. Megatron's own ``--load`` / ``--pretrained-checkpoint`` also work afterwards: adapted
   layers keep the base layers' state-dict and ``sharded_state_dict`` keys, plus ``mora_M``.
2. After every ``optimizer.step()`` of the loop, call :meth:`MegatronReMoRA.step` (merges every ``merge_every``
   steps, resets ``M`` and its moments, switches the type).
3. Megatron-LM keeps a ``config.finalize_model_grads_func`` that is already set (Megatron-LM d98e8a6,
   ``training.py``); older versions overwrite it, so set it again after ``setup_model_and_optimizer`` there.

Example (``examples/megatron_pretrain_hook.py`` runs the same steps on CPU)::

    from mora_dist import MoRAConfig
    from mora_dist.integrations.megatron_lm import MegatronReMoRA, mora_model_provider

    provider = mora_model_provider(model_provider, MoRAConfig(r=128, mora_type=1, target_modules=[
        "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]))
    pretrain(train_valid_test_datasets_provider, provider, ModelType.encoder_or_decoder, forward_step)

Spec: §3, §4.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mora_dist.config import MoRAConfig
from mora_dist.model import apply_mora
from mora_dist.parallel.mappings import finalize_model_grads

logger = logging.getLogger(__name__)

__all__ = ["MegatronReMoRA", "mora_model_provider"]


def mora_model_provider(model_provider: Callable[..., nn.Module], config: MoRAConfig, *,
                        load_base: Callable[[nn.Module], None] | None = None) -> Callable[..., nn.Module]:
    """``model_provider`` with MoRA applied to what it returns, before Megatron wraps the model.

    Args:
        model_provider: the script's provider (any signature: ``pre_process``, ``post_process``, ``vp_stage``...).
        config: what to adapt; ``target_modules`` use Megatron names (``linear_qkv``, ``linear_fc1``...).
        load_base: called on the bare model before the adapters, e.g. to load a Hugging Face checkpoint with
            :func:`mora_dist.run.megatron.hf_weights.load_hf_into_gpt`.

    Returns:
        A provider with the same signature.
    """

    @functools.wraps(model_provider)
    def provider(*args: Any, **kwargs: Any) -> nn.Module:
        model = model_provider(*args, **kwargs)
        if load_base is not None:
            load_base(model)
        apply_mora(model, config)
        model_config = getattr(model, "config", None)
        if model_config is not None and hasattr(model_config, "finalize_model_grads_func"):
            # Megatron's finalize (DP / layernorm reductions), then the once-per-step TP sum of replicated M.
            model_config.finalize_model_grads_func = finalize_model_grads
        return model

    return provider


class _Engine:
    """The engine interface :class:`~mora_dist.training.remora.ReMoRACallback` reads, over Megatron's pieces."""

    def __init__(self, model: list[nn.Module], optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> None:
        from megatron.core import parallel_state  # megatron-core is heavy: loaded only where megatron is used

        self.module = nn.ModuleList(model)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.mpu = parallel_state
        self.global_steps = 0
        self.device = next(self.module.parameters()).device


class MegatronReMoRA:
    """Runs ReMoRA from a Megatron training loop: call :meth:`step` after every ``optimizer.step()``.

    Args:
        callback: a :class:`~mora_dist.training.remora.ReMoRACallback` (or ``ReLoRACallback``).
        model: the model chunks as Megatron returns them (DDP-wrapped is fine).
        optimizer: Megatron's optimizer as ``setup_model_and_optimizer`` returns it (``FP32Optimizer``,
            ``Float16OptimizerWithFloat16Params``, ``DistributedOptimizer``, chained): a merge writes ``M = 0``
            and resets its moments in whichever copy and shard holds them
            (:mod:`mora_dist.training.optimizer_state.megatron`); or a torch optimizer.
        lr_scheduler: a restarting scheduler from :mod:`mora_dist.training.schedulers` when the callback has a
            ``restart_warmup``; ``None`` otherwise (Megatron's own scheduler does not restart).

    Spec: §3, §5.
    """

    def __init__(self, callback: Any, model: nn.Module | list[nn.Module], optimizer: Any,
                 lr_scheduler: Any = None) -> None:
        chunks = model if isinstance(model, list) else [model]
        self.callback = callback
        self.engine = _Engine(chunks, optimizer, lr_scheduler)
        callback.on_train_begin(self.engine)

    def step(self, iteration: int) -> dict[str, float] | None:
        """After the optimizer step that completed ``iteration`` (1-based): merge when one is due; returns the
        callback's metrics (``remora/merges``...) on a merge step."""
        self.engine.global_steps = iteration
        return self.callback.on_step_end(self.engine)

    def state_dict(self) -> dict[str, Any]:
        """Save with the checkpoint (the type cycle position and the merge count)."""
        return self.callback.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.callback.load_state_dict(state)
