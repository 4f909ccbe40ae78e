"""Tensor-parallel MoRA for megatron-core: wrappers (``layers``, ``te``), rank-local <-> TP = 1 layouts, collectives
on ``M`` (``mappings``), model chunks across pipeline stages (``chunks``), DeepSpeed's ``mpu`` over megatron-core
(``mpu``) and a CPU shim for megatron-core.

Names load on first use (``layers`` imports megatron-core; ``layouts`` and ``mappings`` need only torch). Spec: §4.
"""

import importlib

__all__ = [
    "MoRAColumnParallelLinear",
    "MegatronMPU",
    "MoRARowParallelLinear",
    "ShardPlan",
    "enable_cpu_megatron",
    "finalize_model_grads",
    "plan_shard",
    "suggest_r_hat",
    "sum_replicated_grads",
]

_LAZY = {
    "MoRAColumnParallelLinear": "layers",
    "MoRARowParallelLinear": "layers",
    "MegatronMPU": "mpu",
    "ShardPlan": "layouts",
    "plan_shard": "layouts",
    "suggest_r_hat": "layouts",
    "enable_cpu_megatron": "cpu_shim",
    "finalize_model_grads": "mappings",
    "sum_replicated_grads": "mappings",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
