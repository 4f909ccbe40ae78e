"""Our adapter files: ``adapter_config.json`` (``peft_type: "MORA"``, the :class:`mora_dist.MoRAConfig`) and
``adapter_model.safetensors`` with ``base_model.model.<module>.mora_M``, the global ``(r_hat, r_hat)`` matrix whatever
the TP size, and ``base_model.model.<module>.<param>`` for ``modules_to_save``.

``load_mora`` also reads the MoRA authors' PEFT fork (``"use_mora": true`` in the config, the matrix under
``lora_A.weight``, the same matrix again under ``lora_B.weight``) with the ``modules_to_save`` tensors it holds, in
PEFT's saved layout (``base_model.model.<module>.<param>``) or its in-memory one
(``<module>.modules_to_save.<adapter>.<param>``).

Module names are global across pipeline stages (``decoder.layers.<i>`` is the model-wide layer index), so one
file serves any TP / PP / virtual-pipeline layout: saving gathers every stage's tensors, loading on a stage takes
that stage's layers. Both are collective over the tensor- and pipeline-parallel groups. Spec: §2.5, §4.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from mora_dist.adapters.files import (
    PREFIX,
    WEIGHTS_NAME,
    is_rank0,
    modules_to_save_state,
    read_config_values,
    require_mora_config,
    write_adapter_dir,
)
from mora_dist.config import MoRAConfig
from mora_dist.errors import AdapterLoadError
from mora_dist.model import Model, apply_mora, current_mora_type, mora_layers
from mora_dist.parallel.chunks import (
    expert_group,
    local_param,
    merge_stage_dicts,
    named_parameters,
    pipeline_group,
    raise_if_any,
    tensor_group,
    unmatched_everywhere,
)


def mora_state_dict(model: Model) -> dict[str, torch.Tensor]:
    """Global adapter tensors of the whole model keyed as in the file: tensor-parallel shards gathered, every
    pipeline stage's and expert-parallel rank's tensors merged (collective: call on every rank; every rank gets
    the whole dict)."""
    state = {f"{PREFIX}{name}.mora_M": layer.get_global_M().cpu() for name, layer in mora_layers(model)}
    state = merge_stage_dicts(state, pipeline_group(model))
    state = merge_stage_dicts(state, expert_group(model))  # each expert-parallel rank has its own experts
    state.update(modules_to_save_state(model))
    return state


def write_mora(model: Model, path: str | os.PathLike) -> None:
    """Write our adapter files for ``model`` into the folder ``path`` (collective; global rank 0 writes).
    Spec: §2.5."""
    config = require_mora_config(model)
    state = mora_state_dict(model)
    if not is_rank0():
        return
    values = config.to_dict()
    values["mora_type"] = current_mora_type(model) or config.mora_type  # ReMoRA may have switched it
    values["peft_type"] = "MORA"
    write_adapter_dir(path, values, state)


def read_adapter_config(path: str | os.PathLike) -> tuple[MoRAConfig, bool]:
    """``(config, is_authors_format)`` from ``path/adapter_config.json``."""
    values = read_config_values(path)
    if values.get("use_mora"):
        config = MoRAConfig(
            r=int(values["r"]),
            mora_type=int(values.get("mora_type", 1)),
            target_modules=values["target_modules"],
            dropout=float(values.get("lora_dropout", 0.0) or 0.0),
            modules_to_save=values.get("modules_to_save"),
        )
        return config, True
    values.pop("peft_type", None)
    return MoRAConfig.from_dict(values), False



def load_mora(model: Model, path: str | os.PathLike) -> Model:
    """Load an adapter into ``model`` (a module or a list of chunks; MoRA applied first if it has none) and
    return it. Each pipeline stage takes its own layers' matrices; every rank of the model calls it.

    Raises:
        AdapterLoadError: the file does not fit the model (names the module and both shapes), raised on every
            stage and before anything is loaded.
    """
    config, authors = read_adapter_config(path)
    if not any(True for _ in mora_layers(model)):
        apply_mora(model, config)
    else:
        for _, layer in mora_layers(model):
            layer.set_mora_type(config.mora_type)
    group = pipeline_group(model)
    state = load_file(str(Path(path) / WEIGHTS_NAME))
    suffix = ".lora_A.weight" if authors else ".mora_M"
    matrices = {k[len(PREFIX) : -len(suffix)]: v for k, v in state.items() if k.endswith(suffix)}
    layers = dict(mora_layers(model))
    params = named_parameters(model)
    others, keys = _module_tensors(state, suffix)
    problems = []
    missing = sorted(set(layers) - set(matrices))
    if missing:
        problems.append(f"adapter at {path} has no matrix for module(s) {missing[:5]}; was it saved from this model?")
    for name in set(matrices) & set(layers):
        expected = tuple(layers[name].global_m_shape)
        if tuple(matrices[name].shape) != expected:
            problems.append(
                f"module {name!r}: adapter matrix has shape {tuple(matrices[name].shape)}, the model's layer expects "
                f"{expected} (different in/out features or r); load it into the model it was trained on"
            )
    tp_group = tensor_group(model)
    for name in set(others) & set(params):
        others[name] = local_param(others[name], params[name], tp_group)
        if params[name].shape != others[name].shape:
            problems.append(f"module parameter {name!r}: adapter has shape {tuple(others[name].shape)}, "
                            f"model has {tuple(params[name].shape)}")
    # A name this stage lacks may live on another stage; it is an error only if no stage has it.
    unplaced = unmatched_everywhere([keys[n] for n in others if n not in params], group)
    stray = unmatched_everywhere(sorted(n for n in matrices if n not in layers), group)
    problems += [f"adapter at {path} has a matrix for {n!r}, which is not a MoRA layer of the model" for n in stray]
    if unplaced:
        problems.append(f"adapter at {path} holds {len(unplaced)} tensor(s) this model has no parameter for: "
                        f"{unplaced[:8]}; load it into the model it was trained on, or remove those tensors from "
                        "the file")
    raise_if_any(sorted(problems), group, AdapterLoadError, "")
    for name, M in matrices.items():
        if name in layers:
            layers[name].set_global_M(M)
    with torch.no_grad():
        for name, value in others.items():
            if name in params:
                params[name].copy_(value)
    return model



def _module_tensors(state: dict[str, torch.Tensor], suffix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``({module parameter name: value}, {name: file key})`` of the tensors of ``state`` that are not adapter
    matrices (``modules_to_save``).

    Accepts PEFT's saved key ``base_model.model.<module>.<param>`` and its in-memory
    ``base_model.model.<module>.modules_to_save.<adapter>.<param>``. The authors' ``lora_B.weight`` is a second
    copy of ``lora_A.weight`` and is skipped when equal. A key outside ``base_model.model.`` keeps its own name
    (and matches no parameter).
    """
    values, keys = {}, {}
    for key, value in state.items():
        if key.endswith(suffix):
            continue
        if suffix == ".lora_A.weight" and key.endswith(".lora_B.weight"):
            twin = state.get(key[: -len(".lora_B.weight")] + suffix)
            if twin is not None and torch.equal(twin, value):
                continue
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        if key.startswith(PREFIX) and ".modules_to_save." in name:
            module, _, rest = name.partition(".modules_to_save.")
            name = f"{module}.{rest.partition('.')[2]}"  # drop the adapter name
        values[name], keys[name] = value, key
    return values, keys
