"""Every copy of a trainable parameter and of its optimizer state, one module per engine behind one declared
:class:`OptimizerState` protocol: :mod:`.deepspeed` for plain torch optimizers and DeepSpeed (ZeRO 0-3,
``BF16_Optimizer``), :mod:`.megatron` for megatron-core's optimizers (``FP32Optimizer``,
``Float16OptimizerWithFloat16Params``, ``DistributedOptimizer``, ``ChainedOptimizer``). Each is the only code
touching its engine's optimizer internals; :func:`backend_for` picks one from the optimizer's type.

Spec: §3, §5.
"""

from __future__ import annotations

import importlib
from typing import Any

from mora_dist.training.optimizer_state.protocol import MOMENT_KEYS, OptimizerState

__all__ = ["MOMENT_KEYS", "OptimizerState", "backend_for"]


def backend_for(optimizer: Any) -> OptimizerState:
    """:mod:`.megatron` for a megatron-core optimizer, else :mod:`.deepspeed` (plain torch and DeepSpeed).

    Each imports its engine (DeepSpeed or megatron-core), which the other engine's users need not load: the
    module is imported here, on first use.
    """
    engine = "megatron" if type(optimizer).__module__.startswith("megatron.core.optimizer") else "deepspeed"
    return importlib.import_module(f"{__name__}.{engine}")
