"""MoRA on a whole model: ``apply_mora`` (plan, validate the whole plan, then wrap), ``merge_mora``, ``unload``,
the current type, and a trainable summary. Which wrapper adapts which module is :mod:`mora_dist.dispatch`'s table.

A model is a module or a list of model chunks (megatron virtual pipeline); module names are global across
pipeline stages (:mod:`mora_dist.parallel.chunks`), and a target or module to save is valid when it exists
on some stage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from mora_dist import experts
from mora_dist.config import MoRAConfig
from mora_dist.dispatch import expert_parameters, is_candidate, wrapper_class
from mora_dist.errors import MoRAConfigError
from mora_dist.experts import unknown_expert_params
from mora_dist.layer import MoRALayerMixin
from mora_dist.operators import check_r_hat, compute_r_hat
from mora_dist.parallel.chunks import (
    check_supported,
    expert_blocks,
    expert_groups,
    model_chunks,
    named_modules,
    pipeline_group,
    refuse_expert_modules_to_save,
    sum_over,
    tensor_group,
    unmatched_everywhere,
)
from mora_dist.targeting import plan_modules_to_save, plan_target_parameters, plan_targets

logger = logging.getLogger(__name__)


def layer_r_hat(in_features: int, out_features: int, config: MoRAConfig, name: str) -> int:
    """``r_hat`` of one layer under ``config``, validated. Spec: §2."""
    r_hat = (
        config.r_hat
        if config.r_hat is not None
        else compute_r_hat(in_features, out_features, config.r, config.mora_type)
    )
    try:
        check_r_hat(in_features, out_features, r_hat, config.mora_type, where=name)
    except MoRAConfigError as exc:
        raise MoRAConfigError(f"{exc} (from r={config.r}, r_hat={config.r_hat})") from exc
    return r_hat


Model = nn.Module | Sequence[nn.Module]


def apply_mora(model: Model, config: MoRAConfig) -> Model:
    """Wrap the targeted linear layers of ``model`` (a module or a list of chunks) with MoRA, in place; return it.

    Every parameter is frozen except the square matrices and the modules in ``config.modules_to_save``. The
    whole plan (targets, ``r_hat`` of every layer, modules to save) is validated before anything changes. Under
    pipeline parallelism every stage calls it; names are checked against all stages together.

    Raises:
        NoMatchingModuleError: a target or a module to save matches nothing on any stage.
        MoRAConfigError: an ``r_hat`` cannot work for some layer (the message names it), an unsupported
            megatron layout (mixture of experts), or a model that already has MoRA layers.
    """
    chunks = model_chunks(model)
    if any(isinstance(m, MoRALayerMixin) for c in chunks for m in c.modules()):
        raise MoRAConfigError("apply_mora: the model already has MoRA layers; call unload(model) first")
    exclude = config.exclude_modules or []
    check_supported(chunks, [exclude] if isinstance(exclude, str) else exclude)
    index = named_modules(chunks)
    named = [(name, module) for name, module, _, _ in index]
    agree = partial(unmatched_everywhere, group=pipeline_group(chunks))
    experts.refuse_unadaptable_experts(
        named, config.target_modules, config.exclude_modules, unknown_expert_params,
        "does not follow transformers' experts interface (has_gate/has_bias/is_transposed), so MoRA cannot adapt it")
    targets = [] if config.target_modules is None else plan_targets(
        named, config.target_modules, config.exclude_modules, is_candidate, parameters=expert_parameters,
        unmatched_everywhere=agree)
    named_params = plan_target_parameters(named, config.target_parameters, expert_parameters,
                                          unmatched_everywhere=agree)
    targets += [name for name in named_params if name not in targets]
    to_save = plan_modules_to_save(named, config.modules_to_save, unmatched_everywhere=agree)
    modules = dict(named)
    refuse_expert_modules_to_save(modules, to_save)
    where = {name: (chunk, local) for name, _, chunk, local in index}
    layer_names = [name for name in targets if name in modules]
    wrappers = {name: wrapper_class(modules[name], name) for name in layer_names}
    plan = [(name, layer_r_hat(*wrappers[name].global_features(modules[name]), config, name)) for name in layer_names]
    for name, r_hat in plan:
        wrappers[name].check(modules[name], name, config, r_hat)  # e.g. sharding errors, before any change
    expert_plan: dict[str, dict[str, int]] = {}  # {experts block: {parameter: r_hat}}
    for name in targets:
        if name in modules:
            continue
        block, _, param = name.rpartition(".")
        r_hat = layer_r_hat(*experts.projection_features(modules[block], param), config, name)
        experts.check_projection(modules[block], block, param, config, r_hat)
        expert_plan.setdefault(block, {})[param] = r_hat

    for chunk in chunks:
        chunk.requires_grad_(False)
    for name, r_hat in plan:
        chunk, local = where[name]
        parent_name, _, child = local.rpartition(".")
        parent = chunk.get_submodule(parent_name) if parent_name else chunk
        setattr(parent, child, wrappers[name].from_base(modules[name], name, config, r_hat))
    for block, r_hats in expert_plan.items():
        experts.adapt(modules[block], r_hats, config)
    for name in to_save:
        modules[name].requires_grad_(True)
    for chunk in chunks:
        chunk.mora_config = config
    trainable, total = count_parameters(chunks)
    logger.info(
        "MoRA type %d on %d layers; trainable params: %d || all params: %d || trainable%%: %.4f",
        config.mora_type,
        len(targets),
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    return model


def mora_layers(model: Model) -> Iterator[tuple[str, MoRALayerMixin]]:
    """``(global name, layer)`` of every MoRA layer of this rank's chunks, in model order."""
    for name, module, _, _ in named_modules(model):
        if isinstance(module, MoRALayerMixin):
            yield name, module


def set_mora_type(model: Model, mora_type: int | str) -> None:
    """Switch every MoRA layer to another type (ReMoRA, after a merge). Spec: §3."""
    for _, layer in mora_layers(model):
        layer.set_mora_type(mora_type)


def current_mora_type(model: Model) -> int | None:
    """The type every MoRA layer of this rank uses now (the layers' operators are the one record of it), or
    ``None`` when the model has no MoRA layers or they differ. Spec: §3."""
    types = {layer.mora_type for _, layer in mora_layers(model)}
    return types.pop() if len(types) == 1 else None


@torch.no_grad()
def merge_mora(model: Model, reinit: bool = True) -> int:
    """Fold every layer's ``dW`` into its frozen base weight (each layer's ``merge``, through
    :func:`mora_dist.merge.fold_layer`); zero ``M`` if ``reinit``. Local to each rank. Returns the layer count.
    Spec: §2.4."""
    count = 0
    for _, layer in mora_layers(model):
        layer.merge(reinit=reinit)
        count += 1
    return count


def count_parameters(model: Model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of the whole model (ZeRO-3 partitioned parameters counted by
    their full size). A megatron model is counted over all its pipeline stages and tensor-parallel shards, and
    its MoE experts over the expert-TP and expert-parallel ranks (collective over those groups; replicated
    parameters counted once)."""
    chunks = model_chunks(model)
    tp_group = tensor_group(chunks)
    etp_group, ep_group = expert_groups(chunks)
    in_experts = {id(p) for block in expert_blocks(chunks) for p in block.parameters()}
    ranks = {False: dist.get_rank(tp_group) if tp_group is not None else 0,
             True: dist.get_rank(etp_group) if etp_group is not None else 0}
    counts = {False: [0, 0], True: [0, 0]}  # {expert parameter: [trainable, total]}
    for chunk in chunks:
        for p in chunk.parameters():
            expert = id(p) in in_experts
            if ranks[expert] and not getattr(p, "tensor_model_parallel", False):
                continue  # the same values on every (expert) tensor-parallel rank: count them on its rank 0
            n = getattr(p, "ds_numel", p.numel())
            counts[expert][1] += n
            counts[expert][0] += n if p.requires_grad else 0
    dense = sum_over(counts[False], tp_group)
    experts = sum_over(sum_over(counts[True], etp_group), ep_group)
    trainable, total = sum_over([dense[0] + experts[0], dense[1] + experts[1]], pipeline_group(chunks))
    return trainable, total


def trainable_summary(model: Model) -> str:
    """PEFT-style line: ``trainable params: N || all params: M || trainable%: P`` (collective like
    :func:`count_parameters`)."""
    trainable, total = count_parameters(model)
    percent = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def unload(model: Model, merge: bool = True) -> Model:
    """Replace every MoRA layer by its base layer and give adapted expert blocks back their own class (merging
    ``dW`` first unless ``merge=False``)."""
    if merge:
        merge_mora(model)
    for _, layer, chunk, local in list(named_modules(model)):
        if isinstance(layer, experts.MoRAExpertsMixin):
            experts.release(layer)
        if not isinstance(layer, MoRALayerMixin) or isinstance(layer, experts.MoRAExpertProjection):
            continue
        parent_name, _, child = local.rpartition(".")
        parent = chunk.get_submodule(parent_name) if parent_name else chunk
        setattr(parent, child, layer.release_base())
    for chunk in model_chunks(model):
        if hasattr(chunk, "mora_config"):
            del chunk.mora_config
    return model
