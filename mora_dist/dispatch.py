"""Which MoRA wrapper adapts which module: one table, tried in order (PEFT's dispatchers, as a table).

Every wrapper class answers the same three questions: ``global_features(base) -> (k, d)`` of its TP = 1 weight,
``check(base, name, config, r_hat)`` (raise before anything changes) and ``from_base(base, name, config, r_hat)``.
megatron-core and Transformer Engine wrappers are imported only when such a layer is present: they import
megatron-core, which a Hugging Face model never needs. Fused expert parameters, which are not modules, have
their own row: :func:`expert_parameters`. Spec: §2, §4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from mora_dist.experts import fused_projections
from mora_dist.layer import MoRALayerMixin, MoRALinear


class Dispatcher(NamedTuple):
    """One row of :data:`DISPATCHERS`: a module kind, its test and the wrapper class for a module of it."""

    kind: str
    matches: Callable[[nn.Module], bool]
    wrapper_class: Callable[[nn.Module, str], type]


def is_megatron_linear(module: nn.Module) -> bool:
    """megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` and its wrappers of Transformer Engine."""
    return (
        type(module).__module__.startswith(("megatron.core", "transformer_engine"))
        and hasattr(module, "input_size")
        and hasattr(module, "output_size")
    )


def is_te_linear(module: nn.Module) -> bool:
    """Transformer Engine's public interface (``te.pytorch.Linear``, ``LayerNormLinear``, ``GroupedLinear`` and
    megatron's wrappers of them): per-partition ``in_features``/``out_features``, ``parallel_mode``, ``tp_size``."""
    return not isinstance(module, nn.Linear) and all(
        hasattr(module, a) for a in ("in_features", "out_features", "parallel_mode", "tp_size")
    )


def _megatron_wrapper(module: nn.Module, name: str) -> type:
    # megatron-core is heavy: loaded only where megatron is used
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    # imports megatron-core: only for its layers
    from mora_dist.parallel.layers import MoRAColumnParallelLinear, MoRARowParallelLinear

    if isinstance(module, ColumnParallelLinear):
        return MoRAColumnParallelLinear
    if isinstance(module, RowParallelLinear):
        return MoRARowParallelLinear
    return _te_wrapper(module, name)  # megatron-core's TE wrappers (TEColumnParallelLinear, ...)


def _te_wrapper(module: nn.Module, name: str) -> type:
    from mora_dist.parallel.te import te_wrapper_class  # imports megatron-core: only for Transformer Engine layers

    return te_wrapper_class(module, name)


DISPATCHERS: tuple[Dispatcher, ...] = (
    Dispatcher("torch.nn.Linear", lambda m: isinstance(m, nn.Linear), lambda m, name: MoRALinear),
    Dispatcher("megatron-core linear", is_megatron_linear, _megatron_wrapper),
    Dispatcher("Transformer Engine linear", is_te_linear, _te_wrapper),
)


def is_candidate(module: nn.Module) -> bool:
    """Whether some wrapper can adapt ``module`` (a module that is already a MoRA layer is not a candidate)."""
    return not isinstance(module, MoRALayerMixin) and any(d.matches(module) for d in DISPATCHERS)


def wrapper_class(module: nn.Module, name: str) -> type:
    """The wrapper class for ``module`` (the first row of :data:`DISPATCHERS` that matches).

    Raises:
        TypeError: no row matches (callers plan with :func:`is_candidate` first).
    """
    for dispatcher in DISPATCHERS:
        if dispatcher.matches(module):
            return dispatcher.wrapper_class(module, name)
    raise TypeError(f"{name}: no MoRA wrapper for {type(module).__qualname__}")


def expert_parameters(module: nn.Module) -> list[str]:
    """The fused 3-D expert parameters of ``module`` that :mod:`mora_dist.experts` adapts (each gets a
    :class:`~mora_dist.experts.MoRAExpertProjection`), or ``[]``: the table's row for parameters that are not
    modules."""
    return fused_projections(module)
