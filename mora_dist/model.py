"""Inject MoRA into a model: plan, validate the whole plan, then wrap. Also ``unload`` and a trainable summary.

Dispatchers are tried in order; the first that accepts a module wraps it (``nn.Linear`` here, megatron-core
column/row-parallel layers in :mod:`mora_dist.parallel.layers`, Transformer Engine layers in
:mod:`mora_dist.parallel.te_layers`; both imported only when such a layer is present).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from torch import nn

from mora_dist.config import MoRAConfig
from mora_dist.errors import MoRAConfigError
from mora_dist.layer import MoRALayerMixin, MoRALinear
from mora_dist.operators import check_r_hat, compute_r_hat
from mora_dist.targeting import plan_modules_to_save, plan_targets

logger = logging.getLogger(__name__)


def _is_megatron_linear(module: nn.Module) -> bool:
    return (
        type(module).__module__.startswith(("megatron.core", "transformer_engine"))
        and hasattr(module, "input_size")
        and hasattr(module, "output_size")
    )


def _is_te_linear(module: nn.Module) -> bool:
    """Transformer Engine's public interface (``te.pytorch.Linear``, ``LayerNormLinear``, ``GroupedLinear`` and
    megatron's wrappers of them): per-partition ``in_features``/``out_features``, ``parallel_mode``, ``tp_size``."""
    return not isinstance(module, nn.Linear) and all(
        hasattr(module, a) for a in ("in_features", "out_features", "parallel_mode", "tp_size")
    )


def _is_candidate(module: nn.Module) -> bool:
    if isinstance(module, MoRALayerMixin):
        return False
    return isinstance(module, nn.Linear) or _is_megatron_linear(module) or _is_te_linear(module)


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


def _wrap(module: nn.Module, name: str, config: MoRAConfig, r_hat: int) -> nn.Module:
    if isinstance(module, nn.Linear):
        return MoRALinear(
            module, mora_type=config.mora_type, r_hat=r_hat, dropout=config.dropout, mora_dtype=config.torch_dtype,
            merge_compensation=config.merge_compensation,
        )
    from mora_dist.parallel.layers import wrap_megatron_linear

    return wrap_megatron_linear(module, name, config, r_hat)


def _features(module: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    from mora_dist.parallel.layers import megatron_features

    return megatron_features(module, name)


def apply_mora(model: nn.Module, config: MoRAConfig) -> nn.Module:
    """Wrap the targeted linear layers of ``model`` with MoRA, in place, and return it.

    Every parameter is frozen except the square matrices and the modules in ``config.modules_to_save``. The
    whole plan (targets, ``r_hat`` of every layer, modules to save) is validated before anything changes.

    Raises:
        NoMatchingModuleError: a target or a module to save matches nothing.
        MoRAConfigError: an ``r_hat`` cannot work for some layer (the message names it).
    """
    if any(isinstance(m, MoRALayerMixin) for m in model.modules()):
        raise MoRAConfigError("apply_mora: the model already has MoRA layers; call unload(model) first")
    targets = plan_targets(model, config.target_modules, config.exclude_modules, _is_candidate)
    to_save = plan_modules_to_save(model, config.modules_to_save)
    modules = dict(model.named_modules())
    plan = [(name, layer_r_hat(*_features(modules[name], name), config, name)) for name in targets]
    for name, r_hat in plan:
        if not isinstance(modules[name], nn.Linear):
            from mora_dist.parallel.layers import check_megatron_linear

            check_megatron_linear(modules[name], name, config, r_hat)  # sharding errors before any change

    model.requires_grad_(False)
    for name, r_hat in plan:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _wrap(modules[name], name, config, r_hat))
    for name in to_save:
        model.get_submodule(name).requires_grad_(True)
    model.mora_config = config
    trainable, total = count_parameters(model)
    logger.info(
        "MoRA type %d on %d layers; trainable params: %d || all params: %d || trainable%%: %.4f",
        config.mora_type,
        len(plan),
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    return model


def mora_layers(model: nn.Module) -> Iterator[tuple[str, MoRALayerMixin]]:
    """``(name, layer)`` of every MoRA layer, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, MoRALayerMixin):
            yield name, module


def set_mora_type(model: nn.Module, mora_type: int | str) -> None:
    """Switch every MoRA layer to another type (ReMoRA, after a merge). Spec: §3."""
    for _, layer in mora_layers(model):
        layer.set_mora_type(mora_type)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (ZeRO-3 partitioned parameters counted by their full size)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """PEFT-style line: ``trainable params: N || all params: M || trainable%: P``."""
    trainable, total = count_parameters(model)
    percent = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every MoRA layer by its base layer (merging ``dW`` first unless ``merge=False``)."""
    for name, layer in list(mora_layers(model)):
        if merge:
            layer.merge(reinit=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.release_base())
    if hasattr(model, "mora_config"):
        del model.mora_config
    return model
