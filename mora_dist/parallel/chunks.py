"""Pipeline stages and virtual-pipeline chunks: one model-wide name for every module, and the collectives that
let a rank's adapter code see the whole model.

A megatron-core pipeline stage (or virtual-pipeline chunk) numbers its transformer layers from 0
(``decoder.layers.0``), so two stages would name different layers alike. Every name here is *global*: the
``decoder.layers.<i>`` part of a name carries the layer's model-wide index, read from megatron's own
``TransformerLayer.layer_number`` (1-based, stage and chunk offset included, whatever the layout). A model at
PP = 1 keeps its local names, so adapters move between pipeline layouts unchanged. Likewise a mixture-of-experts
layer under expert parallelism numbers its ``local_experts`` from 0 on every rank; here ``local_experts.<i>``
carries the expert's global index, so adapters move between expert-parallel layouts unchanged.

A model is a module or a list of chunks (virtual pipeline); megatron's wrappers (``DistributedDataParallel``,
``Float16Module``) are looked through. Names that live on one stage only (``embedding``, ``output_layer``,
``decoder.final_layernorm``) are unique already.

Collectives take the pipeline group of the model (``LanguageModule.pp_group``); a model without one (Hugging
Face, PP = 1) is answered locally. Every rank of a pipeline group must call them together.

Spec: §4.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mora_dist.errors import MoRAConfigError
from mora_dist.parallel.layouts import partition_ids
from mora_dist.targeting import name_matches

_LAYER_LIST = re.compile(r"^(.*\.)?layers\.(\d+)$")
_WRAPPERS = ("DistributedDataParallel", "Float16Module", "TorchFullyShardedDataParallel", "FullyShardedDataParallel")


def _is_megatron(module: nn.Module) -> bool:
    return type(module).__module__.startswith("megatron.")


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside megatron's DDP / FSDP / ``Float16Module`` wrappers (the module itself otherwise)."""
    while _is_megatron(module) and type(module).__name__ in _WRAPPERS and hasattr(module, "module"):
        module = module.module
    return module


def model_chunks(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """The unwrapped chunks of ``model`` (one for a plain module, several under virtual pipeline parallelism: a
    list or an ``nn.ModuleList`` of chunks)."""
    if isinstance(model, nn.Module) and not isinstance(model, nn.ModuleList):
        return [unwrap(model)]
    chunks = [unwrap(m) for m in model]
    if not chunks or not all(isinstance(m, nn.Module) for m in chunks):
        raise TypeError(f"expected an nn.Module or a non-empty list of model chunks, got {type(model).__name__}")
    return chunks


def _layer_renames(chunk: nn.Module) -> dict[str, str]:
    """``{local prefix: global prefix}`` of every megatron transformer layer whose global index differs, and of
    every MoE local expert whose global index differs (``local_experts.<i>`` of expert-parallel rank ``e`` is
    expert ``e * num_local_experts + i``); expert prefixes come first, being the longer."""
    layers, experts = {}, {}
    for name, module in chunk.named_modules():
        match = _LAYER_LIST.match(name)
        number = getattr(module, "layer_number", None)
        if match and _is_megatron(module) and isinstance(number, int):
            if int(match.group(2)) != number - 1:
                layers[name] = f"{match.group(1) or ''}layers.{number - 1}"
    for name, module in chunk.named_modules():
        if _is_megatron(module) and type(module).__name__ == "SequentialMLP":
            offset = module.ep_group.rank() * module.num_local_experts
            for i in range(module.num_local_experts if offset else 0):
                experts[f"{name}.local_experts.{i}"] = _globalize(f"{name}.local_experts", layers) + f".{offset + i}"
    return {**experts, **layers}


def _globalize(name: str, renames: dict[str, str]) -> str:
    for local, new in renames.items():
        if name == local or name.startswith(local + "."):
            return new + name[len(local) :]
    return name


def named_modules(model: nn.Module | Sequence[nn.Module]) -> list[tuple[str, nn.Module, nn.Module, str]]:
    """``(global name, module, chunk, local name)`` of every named module of every chunk, in model order.

    Raises:
        MoRAConfigError: two chunks of this rank give a module with parameters the same global name (chunks of
            different models). Containers (``decoder``, ``decoder.layers``) exist in every chunk and may repeat.
    """
    out, seen = [], set()
    for chunk in model_chunks(model):
        renames = _layer_renames(chunk)
        for local, module in chunk.named_modules():
            if not local:
                continue
            name = _globalize(local, renames)
            if name in seen and next(module.parameters(recurse=False), None) is not None:
                raise MoRAConfigError(
                    f"module name {name!r} appears in two model chunks; pass the chunks of one model, each built "
                    "with its own vp_stage (megatron numbers their layers globally)"
                )
            seen.add(name)
            out.append((name, module, chunk, local))
    return out


def named_parameters(model: nn.Module | Sequence[nn.Module]) -> dict[str, nn.Parameter]:
    """Parameters of every chunk under their global names."""
    out = {}
    for chunk in model_chunks(model):
        renames = _layer_renames(chunk)
        for local, p in chunk.named_parameters():
            out[_globalize(local, renames)] = p
    return out


_MOE_DISPATCHERS = ("alltoall", "allgather")


def check_supported(model: nn.Module | Sequence[nn.Module], exclude_modules: Sequence[str] = ()) -> None:
    """Refuse megatron layouts whose adapter names or shards we do not handle (before anything changes).

    Mixture-of-experts models are supported with ``SequentialMLP`` experts (megatron-core's local spec,
    ``moe_grouped_gemm=False``) under the ``alltoall`` and ``allgather`` token dispatchers; grouped experts are
    refused unless ``exclude_modules`` leaves them out.

    Raises:
        MoRAConfigError: grouped-GEMM experts, another token dispatcher, overlapped shared experts, a
            multi-token-prediction model, or chunks of mixed configs.
    """
    for chunk in model_chunks(model):
        config = getattr(chunk, "config", None)
        if not _is_megatron(chunk) or config is None:
            continue
        if getattr(config, "num_moe_experts", None):
            _check_moe(chunk, config, exclude_modules)
        if getattr(config, "mtp_num_layers", None):
            raise MoRAConfigError(
                f"mtp_num_layers={config.mtp_num_layers}: multi-token-prediction layers are not supported; build "
                "the model without them"
            )


def refuse_expert_modules_to_save(modules: Mapping[str, nn.Module], to_save: Sequence[str]) -> None:
    """Refuse a ``modules_to_save`` entry holding megatron-core expert linears (``is_expert``: split over expert
    TP and EP, reduced over the expert data-parallel group): a fully trained module's saved tensors are gathered
    over the dense TP group, which is not the experts'. Refused at every layout, so a config does not change
    meaning with the cluster. Spec: §4."""
    for name in to_save:
        if any(getattr(m, "is_expert", False) for m in modules[name].modules()):
            raise MoRAConfigError(
                f"modules_to_save: {name!r} holds megatron-core expert weights, which cannot be trained whole yet "
                "(their saved tensors would be gathered over the dense TP group, not the expert groups); adapt the "
                "experts with target_modules instead, or leave them out of modules_to_save"
            )


def _check_moe(chunk: nn.Module, config: Any, exclude_modules: Sequence[str]) -> None:
    dispatcher = getattr(config, "moe_token_dispatcher_type", "allgather")
    if dispatcher not in _MOE_DISPATCHERS:
        raise MoRAConfigError(
            f"moe_token_dispatcher_type={dispatcher!r} is not supported with MoRA experts; use one of "
            f"{list(_MOE_DISPATCHERS)}"
        )
    if getattr(config, "moe_shared_expert_overlap", False):
        raise MoRAConfigError(
            "moe_shared_expert_overlap=True is not supported with MoRA (the overlapped shared experts run their "
            "linears' pieces outside the layers MoRA wraps); set it to False"
        )
    for name, module in chunk.named_modules():
        grouped = name.rpartition(".")[2] == "experts" and type(module).__name__ != "SequentialMLP"
        if grouped and not any(name_matches(name, e) for e in exclude_modules):
            raise MoRAConfigError(
                f"{name}: {type(module).__name__} keeps all local experts in one grouped weight, which MoRA does "
                "not adapt yet; build the experts with moe_grouped_gemm=False (SequentialMLP, megatron-core's "
                "local spec), or leave the whole MoE block out with exclude_modules=['*experts*']"
            )


def pipeline_group(model: nn.Module | Sequence[nn.Module]) -> dist.ProcessGroup | None:
    """The model's pipeline-parallel group when it has more than one stage, else None."""
    group = getattr(model_chunks(model)[0], "pp_group", None)
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    return group


def expert_blocks(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """This rank's megatron-core MoE expert blocks (``SequentialMLP``): their parameters are split over the
    expert-TP and expert-parallel groups, not over TP."""
    return [m for chunk in model_chunks(model) for m in chunk.modules()
            if _is_megatron(m) and type(m).__name__ == "SequentialMLP"]


def expert_groups(model: nn.Module | Sequence[nn.Module]) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """``(expert-TP group, expert-parallel group)`` of a mixture-of-experts megatron model, each None when it has
    one rank (or the model has no experts). The same answer on every pipeline stage, experts or not."""
    chunks = model_chunks(model)
    if not dist.is_initialized() or not any(getattr(getattr(c, "config", None), "num_moe_experts", None)
                                            for c in chunks):
        return None, None
    from megatron.core import parallel_state  # a megatron model: megatron-core is loaded

    groups = (parallel_state.get_expert_tensor_parallel_group(), parallel_state.get_expert_model_parallel_group())
    return tuple(g if dist.get_world_size(g) > 1 else None for g in groups)


def expert_group(model: nn.Module | Sequence[nn.Module]) -> dist.ProcessGroup | None:
    """The expert-parallel group of a mixture-of-experts model when it has more than one rank, else None: its
    ranks hold different experts (under their global names) and the same dense layers."""
    return expert_groups(model)[1]


def tensor_group(model: nn.Module | Sequence[nn.Module]) -> dist.ProcessGroup | None:
    """The model's tensor-parallel group when it has more than one rank, else None."""
    group = getattr(model_chunks(model)[0], "tp_group", None)
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None
    return group


def all_gather(value: Any, group: dist.ProcessGroup | None) -> list[Any]:
    """Every stage's ``value`` (picklable; tensors on CPU), in stage order; ``[value]`` without a group."""
    if group is None:
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def unmatched_everywhere(unmatched: Iterable[str], group: dist.ProcessGroup | None) -> list[str]:
    """The entries of ``unmatched`` (this stage's) that no stage of ``group`` matched, in first-seen order."""
    per_stage = [list(u) for u in all_gather(list(unmatched), group)]
    common = set.intersection(*(set(u) for u in per_stage))
    return [entry for entry in per_stage[0] if entry in common]


def raise_if_any(problems: list[str], group: dist.ProcessGroup | None, error: type[Exception], head: str) -> None:
    """Raise ``error`` on every stage when any stage found a problem (so no stage goes on alone and hangs)."""
    found = [p for stage in all_gather(problems, group) for p in stage]
    if found:
        unique = list(dict.fromkeys(found))
        raise error(head + "; ".join(unique[:5]) + (f" (and {len(unique) - 5} more)" if len(unique) > 5 else ""))


def merge_stage_dicts(state: dict[str, torch.Tensor], group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """The union of every stage's ``{global name: tensor}`` (every stage receives it)."""
    merged: dict[str, torch.Tensor] = {}
    for part in all_gather({k: v.cpu() for k, v in state.items()}, group):
        merged.update(part)
    return merged


def sum_over(values: list[int], group: dist.ProcessGroup | None) -> list[int]:
    """Element-wise sum of integer counts over ``group`` (identity without one)."""
    if group is None:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    return [int(v) for v in torch.stack([torch.as_tensor(x) for x in all_gather(t, group)]).sum(0).tolist()]


def global_param(param: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The TP = 1 value of a parameter: megatron's tensor-parallel shards (``tensor_model_parallel``, split along
    ``partition_dim`` in ``partition_stride`` chunks per rank) all-gathered; a replicated one as it is. CPU."""
    local = param.detach()
    if group is None or not getattr(param, "tensor_model_parallel", False):
        return local.cpu()
    dim, stride, tp = param.partition_dim, getattr(param, "partition_stride", 1), dist.get_world_size(group)
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=group)
    size = local.shape[dim] * tp
    full = torch.empty(*(size if d == dim else n for d, n in enumerate(local.shape)), dtype=local.dtype)
    for t, shard in enumerate(shards):
        full.index_copy_(dim, partition_ids(size, tp, t, stride=stride), shard.cpu())
    return full


def local_param(value: torch.Tensor, param: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's shard of the TP = 1 ``value`` of ``param`` (inverse of :func:`global_param`)."""
    if group is None or not getattr(param, "tensor_model_parallel", False):
        return value
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    ids = partition_ids(value.shape[dim], dist.get_world_size(group), dist.get_rank(group), stride=stride)
    return value.index_select(dim, ids)


def global_state_dict(model: nn.Module | Sequence[nn.Module]) -> dict[str, Any]:
    """The state dicts of every chunk merged under global names (checkpoints that export can join by name)."""
    out: dict[str, Any] = {}
    for chunk in model_chunks(model):
        renames = _layer_renames(chunk)
        for key, value in chunk.state_dict().items():
            out[_globalize(key, renames)] = value
    return out


def load_global_state_dict(model: nn.Module | Sequence[nn.Module], state: dict[str, Any]) -> None:
    """Inverse of :func:`global_state_dict`: each key goes to the chunk holding its module, loaded strictly (a
    key the chunk does not have yet, such as a buffer created at a merge, is its modules' load hooks' business).

    Raises:
        KeyError: a key that no chunk of this rank has a module for.
    """
    used = set()
    for chunk in model_chunks(model):
        renames = _layer_renames(chunk)
        modules = {_globalize(local, renames): local for local, _ in chunk.named_modules()}
        local_state = {}
        for key, value in state.items():
            module, _, leaf = key.rpartition(".")
            if module in modules:
                local_state[f"{modules[module]}.{leaf}" if modules[module] else leaf] = value
                used.add(key)
        chunk.load_state_dict(local_state, strict=True)
    extra = sorted(set(state) - used)
    if extra:
        raise KeyError(f"state holds {extra[:5]}, which no model chunk of this rank has")
