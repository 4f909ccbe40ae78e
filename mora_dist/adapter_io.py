"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, PEFT-style keys, global tensors.

Our keys: ``base_model.model.<module>.mora_M`` (the global ``(r_hat, r_hat)`` matrix, whatever the TP size) and
``base_model.model.<module>.<param>`` for ``modules_to_save``. ``load_mora`` also reads the MoRA authors' PEFT
fork (``"use_mora": true`` in the config, the matrix under ``lora_A.weight``, the same matrix again under
``lora_B.weight``) with the ``modules_to_save`` tensors it holds, in PEFT's saved layout
(``base_model.model.<module>.<param>``) or its in-memory one (``<module>.modules_to_save.<adapter>.<param>``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mora_dist.config import MoRAConfig
from mora_dist.errors import AdapterLoadError, MoRAConfigError
from mora_dist.model import apply_mora, mora_layers
from mora_dist.targeting import plan_modules_to_save

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def modules_to_save_state(model: nn.Module, names: list[str] | str | None = None) -> dict[str, torch.Tensor]:
    """The parameters of the modules ``names`` (default: the MoRA config's ``modules_to_save``), keyed as in the
    file (PEFT's keys for them too)."""
    state = {}
    if names is None and hasattr(model, "mora_config"):
        names = model.mora_config.modules_to_save
    for name in plan_modules_to_save(model, names):
        for pname, p in model.get_submodule(name).named_parameters():
            state[f"{PREFIX}{name}.{pname}"] = p.detach().cpu()
    return state


def mora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Global adapter tensors keyed as in the file (gathers tensor-parallel shards: call on every rank)."""
    state = {f"{PREFIX}{name}.mora_M": layer.get_global_M().cpu() for name, layer in mora_layers(model)}
    state.update(modules_to_save_state(model))
    return state


def write_adapter_dir(path: str | os.PathLike, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``path`` atomically (a temp dir
    renamed into place, replacing an older adapter there). Returns the safetensors file."""
    state = {k: v.contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "mora_dist"})
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path / WEIGHTS_NAME


def save_mora(model: nn.Module, path: str | os.PathLike, *, format: str = "mora", optimizer: Any = None) -> None:
    """Write the adapter to directory ``path`` atomically. Collective under TP (call on every rank).

    Args:
        model: a model with MoRA layers (``apply_mora``).
        path: the folder to write (replaced if it exists).
        format: ``"mora"`` (our files: the global ``M`` of every layer), ``"peft-lora"`` (a standard PEFT LoRA
            that reproduces the model exactly, types 1-4) or ``"mora-authors"`` (the MoRA authors' PEFT fork);
            see :mod:`mora_dist.export_formats`.
        optimizer: for ``"peft-lora"`` and ``"mora-authors"``: read ``M`` from this (DeepSpeed) optimizer's fp32
            master instead of the module's copy, which may be bf16.

    Raises:
        MoRAConfigError: an unknown ``format``, or a model the format cannot express (nothing is written).

    Spec: §2.5.
    """
    if format != "mora":
        from mora_dist.export_formats import save_adapter

        save_adapter(model, path, format=format, optimizer=optimizer)
        return
    if optimizer is not None:
        raise MoRAConfigError("save_mora(format='mora') writes the module's M; optimizer= is for the export formats")
    config: MoRAConfig = model.mora_config
    state = mora_state_dict(model)
    if not _is_rank0():
        return
    types = {layer.mora_type for _, layer in mora_layers(model)}
    values = config.to_dict()
    values["mora_type"] = types.pop() if len(types) == 1 else config.mora_type  # ReMoRA may have switched it
    values["peft_type"] = "MORA"
    write_adapter_dir(path, values, state)


def read_adapter_config(path: str | os.PathLike) -> tuple[MoRAConfig, bool]:
    """``(config, is_authors_format)`` from ``path/adapter_config.json``."""
    values = json.loads((Path(path) / CONFIG_NAME).read_text())
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


def load_mora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter into ``model`` (applying MoRA first if the model has none) and return the model.

    Raises ``AdapterLoadError`` naming the module and both shapes when the file does not fit the model.
    """
    config, authors = read_adapter_config(path)
    if not any(True for _ in mora_layers(model)):
        apply_mora(model, config)
    else:
        for _, layer in mora_layers(model):
            layer.set_mora_type(config.mora_type)
    state = load_file(str(Path(path) / WEIGHTS_NAME))
    suffix = ".lora_A.weight" if authors else ".mora_M"
    matrices = {k[len(PREFIX) : -len(suffix)]: v for k, v in state.items() if k.endswith(suffix)}
    layers = dict(mora_layers(model))
    missing = sorted(set(layers) - set(matrices))
    if missing:
        raise AdapterLoadError(
            f"adapter at {path} has no matrix for module(s) {missing[:5]}; was it saved from this model?"
        )
    for name, M in matrices.items():
        if name not in layers:
            raise AdapterLoadError(
                f"adapter at {path} has a matrix for {name!r}, which is not a MoRA layer of the model"
            )
        expected = (layers[name].r_hat, layers[name].r_hat)
        if tuple(M.shape) != expected:
            raise AdapterLoadError(
                f"module {name!r}: adapter matrix has shape {tuple(M.shape)}, the model's layer expects {expected} "
                f"(different in/out features or r); load it into the model it was trained on"
            )
    others = _place_module_tensors(model, state, suffix, path)
    for name, M in matrices.items():
        layers[name].set_global_M(M)
    with torch.no_grad():
        for param, value in others:
            param.copy_(value)
    return model


def _place_module_tensors(
    model: nn.Module, state: dict[str, torch.Tensor], suffix: str, path: str | os.PathLike
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, value)`` for every tensor of ``state`` that is not an adapter matrix (``modules_to_save``).

    Accepts PEFT's saved key ``base_model.model.<module>.<param>`` and its in-memory
    ``base_model.model.<module>.modules_to_save.<adapter>.<param>``. The authors' ``lora_B.weight`` is a second
    copy of ``lora_A.weight`` and is skipped when equal.

    Raises:
        AdapterLoadError: tensors the model has no parameter for (all named), or a shape mismatch.
    """
    params = dict(model.named_parameters())
    placed, unplaced = [], []
    for key, value in state.items():
        if key.endswith(suffix):
            continue
        if suffix == ".lora_A.weight" and key.endswith(".lora_B.weight"):
            twin = state.get(key[: -len(".lora_B.weight")] + suffix)
            if twin is not None and torch.equal(twin, value):
                continue
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else None
        if name is not None and ".modules_to_save." in name:
            module, _, rest = name.partition(".modules_to_save.")
            name = f"{module}.{rest.partition('.')[2]}"  # drop the adapter name
        if name not in params:
            unplaced.append(key)
            continue
        if params[name].shape != value.shape:
            raise AdapterLoadError(
                f"module parameter {name!r}: adapter has shape {tuple(value.shape)}, "
                f"model has {tuple(params[name].shape)}"
            )
        placed.append((params[name], value))
    if unplaced:
        raise AdapterLoadError(
            f"adapter at {path} holds {len(unplaced)} tensor(s) this model has no parameter for: {unplaced[:8]}; "
            "load it into the model it was trained on, or remove those tensors from the file"
        )
    return placed
