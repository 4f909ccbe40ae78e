"""What every adapter file format shares: the folder layout, PEFT-style keys, atomic writes, ``modules_to_save``
tensors and global fp32 matrices read from the model or from the optimizer's masters.

Keys are PEFT's: ``base_model.model.<module>.<tensor>`` with global module names (pipeline stages merged) and
global tensors (tensor-parallel shards gathered), so one file serves any TP / PP layout. Spec: §2.5, §4.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mora_dist.errors import AdapterLoadError, MoRAConfigError
from mora_dist.experts import MoRAExpertProjection
from mora_dist.model import Model, mora_layers
from mora_dist.parallel.chunks import (
    all_gather,
    global_param,
    merge_stage_dicts,
    model_chunks,
    named_modules,
    pipeline_group,
    tensor_group,
    unmatched_everywhere,
)
from mora_dist.targeting import plan_modules_to_save
from mora_dist.training.optimizer_state import backend_for


def refuse_expert_layers(model: Model, export: str) -> None:
    """Raise before anything is written when ``model`` has MoRA on fused experts, which ``export`` cannot hold."""
    experts = [name for name, layer in mora_layers(model) if isinstance(layer, MoRAExpertProjection)]
    if experts:
        raise MoRAConfigError(
            f"{export}: {experts[0]} (and {len(experts) - 1} more) adapt fused expert parameters, which this format "
            "cannot hold yet; export the merged model, or save our adapter format (save_mora / --format mora)"
        )


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_rank0() -> bool:
    """Whether this process writes files (global rank 0, or no process group)."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def mora_config(model: Model) -> Any:
    """The :class:`mora_dist.MoRAConfig` ``apply_mora`` attached to the model, or ``None``."""
    return getattr(model_chunks(model)[0], "mora_config", None)


def require_mora_config(model: Model) -> Any:
    """:func:`mora_config`, or an :class:`AdapterLoadError` for a model without MoRA."""
    config = mora_config(model)
    if config is None:
        raise AdapterLoadError("the model has no MoRA adapter (apply_mora or load_mora first)")
    return config


def modules_to_save_state(model: Model, names: list[str] | str | None = None) -> dict[str, torch.Tensor]:
    """The parameters of the modules ``names`` (default: the MoRA config's ``modules_to_save``), keyed as in the
    file (PEFT's keys for them too), at TP = 1 and from every pipeline stage (collective over both groups; every
    rank gets the whole dict). A name is valid when some stage has it."""
    chunks = model_chunks(model)
    if names is None and hasattr(chunks[0], "mora_config"):
        names = chunks[0].mora_config.modules_to_save
    group, tp_group = pipeline_group(chunks), tensor_group(chunks)
    named = [(name, module) for name, module, _, _ in named_modules(chunks)]
    modules = dict(named)
    agree = partial(unmatched_everywhere, group=group)
    state = {}
    for name in plan_modules_to_save(named, names, unmatched_everywhere=agree):
        for pname, p in modules[name].named_parameters():
            state[f"{PREFIX}{name}.{pname}"] = global_param(p, tp_group)
    return merge_stage_dicts(state, group)



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


def master_value(optimizer: Any, p: nn.Parameter) -> torch.Tensor | None:
    """The fp32 master of ``p`` (DeepSpeed or megatron-core optimizer; collective under ZeRO / the distributed
    optimizer), or ``None`` without an optimizer."""
    return None if optimizer is None else backend_for(optimizer).get_full(optimizer, p)


def parameter_value(p: nn.Parameter, optimizer: Any) -> torch.Tensor:
    """``p``'s fp32 value on the CPU, from the optimizer's master when there is one."""
    master = master_value(optimizer, p)
    return (p if master is None else master).detach().float().cpu()


def global_matrices(model: nn.Module, optimizer: Any = None) -> dict[str, torch.Tensor]:
    """The global fp32 ``M: (r_hat, r_hat)`` of every MoRA layer, from the optimizer's master when given.
    Collective (tensor-parallel gather, ZeRO reads): call on every rank."""
    return {name: layer.get_global_M(master_value(optimizer, layer.mora_M)).float().cpu()
            for name, layer in mora_layers(model)}


def merge_stages(values: dict[str, Any], group: Any) -> dict[str, Any]:
    """The union of every pipeline stage's ``{global module name: value}`` (every stage receives it)."""
    merged: dict[str, Any] = {}
    for part in all_gather(values, group):
        merged.update(part)
    return merged


def target_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """PEFT ``target_modules`` for exactly ``names``: their last components when those select no other
    ``nn.Linear`` of the model (what servers expect), else the full module names."""
    short = sorted({name.rpartition(".")[2] for name in names})
    chosen = set(names)
    inner = {f"{name}.base_layer" for name in names}
    for name, module, _, _ in named_modules(model):
        if name in chosen or name in inner or not isinstance(module, nn.Linear):
            continue
        if name.rpartition(".")[2] in short:
            return sorted(names)
    return short


def base_model_name(model: nn.Module) -> str | None:
    """The Hugging Face model id or path the model was loaded from, for ``base_model_name_or_path``."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def saved_module_names(extra: Mapping[str, torch.Tensor]) -> list[str]:
    """The modules holding the ``modules_to_save`` tensors (PEFT wraps each and reads ``<module>.<param>``)."""
    return sorted({key[len(PREFIX):].rpartition(".")[0] for key in extra})


def read_config_values(path: str | os.PathLike) -> dict[str, Any]:
    """The raw ``adapter_config.json`` of the adapter folder ``path``."""
    return json.loads((Path(path) / CONFIG_NAME).read_text())


