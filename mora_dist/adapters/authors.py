"""The MoRA authors' PEFT-fork adapter layout (``use_mora: true``): each module's square matrix under both
``lora_A.weight`` and ``lora_B.weight``, and the LoRA-equivalent ``r`` from which their fork recomputes ``r_hat``.
:func:`mora_dist.load_mora` reads it back. Spec: §2.5.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from mora_dist.adapters.files import (
    PREFIX,
    base_model_name,
    global_matrices,
    is_rank0,
    merge_stages,
    modules_to_save_state,
    mora_config,
    nbytes,
    refuse_expert_layers,
    saved_module_names,
    target_modules,
    write_adapter_dir,
)
from mora_dist.config import resolve_mora_type
from mora_dist.errors import MoRAConfigError
from mora_dist.model import mora_layers
from mora_dist.operators import compute_r_hat
from mora_dist.parallel.chunks import pipeline_group, raise_if_any


def save_mora_authors(model: nn.Module, path: str | os.PathLike, *, optimizer: Any = None) -> dict[str, Any]:
    """Write the adapter as the MoRA authors' PEFT fork loads it: ``peft_type: "LORA"``, ``use_mora: true``,
    ``mora_type``, ``r`` and each global matrix under both ``lora_A.weight`` and ``lora_B.weight``. Collective.

    Raises:
        MoRAConfigError: layers of different types, or an ``r_hat`` the fork would not recompute from one ``r``
            (an explicit ``r_hat``); nothing is written.

    Spec: §2.5.
    """
    refuse_expert_layers(model, "mora-authors export")
    config = mora_config(model)
    layers = dict(mora_layers(model))
    if config is None or not layers:
        raise MoRAConfigError("mora-authors export: the model has no MoRA layers (apply_mora or load_mora first)")
    types = {layer.mora_type for layer in layers.values()}
    if len(types) != 1:
        raise MoRAConfigError(f"mora-authors export: the layers use types {sorted(types)}, the authors' config holds "
                              "one mora_type; export format='mora' or 'peft-lora'")
    mora_type = types.pop()
    problems = []
    for name, layer in layers.items():
        expected = compute_r_hat(layer.in_features, layer.out_features, config.r, mora_type)
        if layer.r_hat != expected:
            problems.append(
                f"mora-authors export: layer {name!r} has r_hat={layer.r_hat}, but the authors' fork recomputes "
                f"r_hat={expected} from r={config.r} (their config has no r_hat); export format='mora' or 'peft-lora'"
            )
    group = pipeline_group(model)
    raise_if_any(problems, group, MoRAConfigError, "")
    matrices = merge_stages(global_matrices(model, optimizer), group)
    extra = modules_to_save_state(model)
    if not is_rank0():
        return {}
    state: dict[str, torch.Tensor] = {}
    for name, M in matrices.items():
        state[f"{PREFIX}{name}.lora_A.weight"] = M
        state[f"{PREFIX}{name}.lora_B.weight"] = M.clone()  # one tensor under two names: safetensors wants two
    state.update(extra)
    values = {
        "peft_type": "LORA", "use_mora": True, "mora_type": resolve_mora_type(mora_type), "r": config.r,
        "lora_alpha": config.r, "lora_dropout": float(config.dropout), "bias": "none", "task_type": None,
        "target_modules": target_modules(model, list(layers)), "inference_mode": True,
        "modules_to_save": saved_module_names(extra) or None,
        "base_model_name_or_path": base_model_name(model),
    }
    write_adapter_dir(path, values, state)
    return {"bytes": nbytes(state)}
