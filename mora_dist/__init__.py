"""mora_dist: MoRA and ReMoRA for Hugging Face, megatron-core and DeepSpeed.

Spec: ``docs/spec.md`` (docstrings cite its sections as ``Spec: §N``).
"""

import importlib

from mora_dist.adapters import load_mora, save_mora
from mora_dist.config import MoRAConfig
from mora_dist.errors import AdapterLoadError, MoRAConfigError, MoRAError, NoMatchingModuleError, ShardingError
from mora_dist.layer import MoRALinear
from mora_dist.model import (
    apply_mora,
    count_parameters,
    current_mora_type,
    merge_mora,
    mora_layers,
    set_mora_type,
    trainable_summary,
    unload,
)
from mora_dist.operators import MoRAOperator, compute_r_hat

__all__ = [
    "AdapterLoadError",
    "MoRAConfig",
    "MoRAConfigError",
    "MoRAError",
    "MoRALinear",
    "MoRAOperator",
    "NoMatchingModuleError",
    "ShardingError",
    "apply_mora",
    "compute_r_hat",
    "count_parameters",
    "current_mora_type",
    "load_mora",
    "merge_mora",
    "mora_layers",
    "save_mora",
    "set_mora_type",
    "trainable_summary",
    "unload",
]

# Megatron and DeepSpeed parts import heavy packages: load them on first use.
_LAZY = {
    "MoRAColumnParallelLinear": "mora_dist.parallel.layers",
    "MoRARowParallelLinear": "mora_dist.parallel.layers",
    "MoRATEColumnParallelLinear": "mora_dist.parallel.te",
    "MoRATERowParallelLinear": "mora_dist.parallel.te",
    "MoRATEDuplicatedLinear": "mora_dist.parallel.te",
    "MoRATELayerNormColumnParallelLinear": "mora_dist.parallel.te",
    "finalize_model_grads": "mora_dist.parallel.mappings",
    "mora_model_provider": "mora_dist.integrations.megatron_lm",
    "MegatronReMoRA": "mora_dist.integrations.megatron_lm",
    "MegatronLMRecipe": "mora_dist.integrations.megatron_lm",
    "ReMoRACallback": "mora_dist.training.remora",
    "ReLoRACallback": "mora_dist.training.remora",
    "Callback": "mora_dist.training.callbacks",
    "CallbackList": "mora_dist.training.callbacks",
    "shard_residuals": "mora_dist.training.residual_shards",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mora_dist' has no attribute {name!r}")
