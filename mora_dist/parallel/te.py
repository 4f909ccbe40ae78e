"""MoRA around Transformer Engine linear layers, as megatron-core's TE spec builds them: ``TEColumnParallelLinear``,
``TERowParallelLinear``, ``TELinear`` (``parallel_mode`` column / row / duplicated) and
``TELayerNormColumnParallelLinear`` (the norm fused into the linear layer).

A TE layer runs its tensor-parallel collectives inside one fused call, so the adapter cannot join them; it runs
beside the base layer through the shared ``_forward_beside`` of :mod:`mora_dist.parallel.layers` and moves only
``r_hat``-wide tensors (column: compress the local input, then all-gather ``u`` along the sequence under sequence
parallelism or all-reduce its gradient; row: reduce ``z`` before decompression). The layers are recognised by
TE's public attributes (``in_features`` and ``out_features`` per partition, ``parallel_mode``, ``tp_size``,
``tp_group``, ``sequence_parallel``) and keep megatron's ``(output, bias)`` convention.

The fused-norm layer: MoRA must read the *normalised* input ``LN(x)``, which only TE computes. The wrapper asks
the layer to return it (``return_layernorm_output=True``, restored by :func:`mora_dist.unload`) and feeds it to
the adapter. Not the gathered form (``return_layernorm_output_gathered``): TE (checked at 2.x, commit d0067d0,
``layernorm_linear.py``) drops the gradient of the gathered output, so the adapter's input gradient would never
reach the norm or the layers below. TE adds the gradient of the local ``LN(x)`` after its own reduction of the
input gradient, so the adapter's partial gradient is summed by the wrapper's ``r_hat``-wide collective on ``u``:
one ``(s, b, r_hat)`` all-reduce (or reduce-scatter), never a ``k``-wide one.

FP8: the adapter is plain torch and never enters TE's FP8 GEMMs. Under ``te.pytorch.autocast`` (formerly
``fp8_autocast``) only the TE layer's own GEMM runs in FP8; the adapter reads the high-precision input (the
fused-norm layer returns ``LN(x)`` before TE quantizes it, ``layernorm_linear.py``) and adds its bf16/fp32 ``D z``
to TE's output. Asking for ``LN(x)`` turns off, on that layer, TE's userbuffers all-gather overlap of the forward
and (under FP8) its fused norm+quantize kernel. Weights kept in FP8 (``quantized_model_init``, formerly
``fp8_model_init``) are refused: a merge ``W += dW`` would be re-quantized to FP8 and lose most of ``dW``.
On CUDA ``M`` is allocated on the base weight's device; with ``params_dtype`` bf16 ``M`` stays in ``mora_dtype``
and the adapter multiplies in the activation dtype (:class:`~mora_dist.parallel.layers.MoRAColumnParallelLinear`).

Refused with an error that names the option: Transformer Engine MoE experts (``SequentialMLP`` local experts of
the TE spec; grouped experts, ``TEGroupedLinear``), which have no per-expert MoRA yet (megatron-core's local-spec
experts are adapted: :mod:`mora_dist.parallel.layers`); FP8 primary weights (above).

Spec: §4.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from mora_dist.errors import MoRAConfigError
from mora_dist.merge import FoldNorms
from mora_dist.parallel.layers import MoRAColumnParallelLinear, MoRARowParallelLinear
from mora_dist.parallel.mappings import reduce_replicated_grad


def _te_tp_layout(base_layer: nn.Module) -> tuple[dist.ProcessGroup | None, int, int]:
    """``(group, size, rank)`` from TE's own ``tp_size`` / ``tp_group`` (megatron's TP group if TE has none)."""
    size = base_layer.tp_size
    if size == 1:
        return None, 1, 0
    group = getattr(base_layer, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
    return group, size, dist.get_rank(group)


class _TEBeside:
    """What every TE wrapper shares: TE runs its collectives inside one fused call, so the adapter runs beside it
    (never fused with the base layer's communication), reads the TP layout from TE's own attributes and returns
    TE's ``(output, bias)``."""

    fuse_with_base_comm = False
    tp_layout = staticmethod(_te_tp_layout)

    def __init__(self, base_layer: nn.Module, r_hat: int, mora_type: int | str = 6, **kwargs) -> None:
        kwargs["fuse_with_base_comm"] = False
        super().__init__(base_layer, r_hat, mora_type, **kwargs)

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        output, bias = self.base_layer(input_)
        return self._forward_beside(input_, output), bias

    def merge(self, reinit: bool = True, *, M: torch.Tensor | None = None) -> FoldNorms:
        """``W += dW(M)`` as every MoRA layer merges, then megatron's ``is_first_microbatch`` flag set again:
        under FP8, TE reuses its cached FP8 copy of the weight while the flag is False (``linear.py``:
        ``update_workspace`` only on a first microbatch), so without it a forward after the merge, outside
        megatron's schedules (which set the flag at each step's first microbatch), would use the old weight."""
        norms = super().merge(reinit, M=M)
        self.base_layer.is_first_microbatch = True
        return norms


class MoRATEColumnParallelLinear(_TEBeside, MoRAColumnParallelLinear):
    """``Y_t = TE(X)_t + [D(M C(X))]_t`` around a frozen TE column-parallel linear (``parallel_mode="column"``).

    ``X: [s, b, k]`` (``[s / tp, b, k]`` under sequence parallelism, gathered by TE itself); rank ``t`` returns
    its ``[s, b, d / tp]`` output rows and TE's bias (``(output, bias)``). ``M`` is split or replicated as for
    :class:`~mora_dist.parallel.layers.MoRAColumnParallelLinear`; ``C``/``D`` act on TP = 1 ids.

    Spec: §4.
    """

    @staticmethod
    def global_features(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_features, base_layer.out_features * base_layer.tp_size  # TE: per-partition sizes


class MoRATERowParallelLinear(_TEBeside, MoRARowParallelLinear):
    """``Y = TE(X) + sum_t [D(M C(X_t))]_t`` around a frozen TE row-parallel linear (``parallel_mode="row"``).

    ``X_t: [s, b, k / tp]``; TE reduces its partial outputs (all-reduce, or reduce-scatter along the sequence)
    and adds its bias; the adapter reduces its ``r_hat``-wide ``z`` the same way and adds ``D z``. Returns
    ``(output, bias)`` as TE does.

    Spec: §4.
    """

    @staticmethod
    def global_features(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_features * base_layer.tp_size, base_layer.out_features


class MoRATEDuplicatedLinear(MoRATEColumnParallelLinear):
    """``Y = TE(X) + D(M C(X))`` around a TE linear whose weight is whole on every rank (megatron's
    ``parallel_mode="duplicated"``, which TE sees as ``parallel_mode=None``): no split, ``M`` replicated. Under
    sequence parallelism each rank sees only its tokens, so ``M``'s gradient is SUM-reduced over TP (megatron
    reduces the duplicated weight's gradient the same way, through its ``sequence_parallel`` tag).

    Spec: §2, §4.
    """

    def __init__(self, base_layer: nn.Module, r_hat: int, mora_type: int | str = 6, **kwargs) -> None:
        super().__init__(base_layer, r_hat, mora_type, **kwargs)
        group = getattr(base_layer, "_tp_group", None)
        split_tokens = getattr(base_layer.weight, "sequence_parallel", False) and group is not None
        self.token_group = group if split_tokens and dist.get_world_size(group) > 1 else None
        if self.token_group is not None and self.grad_sync == "step":
            self.mora_M.mora_tp_sum_group = self.token_group

    @staticmethod
    def global_features(base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.in_features, base_layer.out_features

    @staticmethod
    def tp_layout(base_layer: nn.Module) -> tuple[None, int, int]:
        # The plan is TP = 1; the rank is kept for checkpoint replica ids.
        rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        return None, 1, rank

    def _matrix(self) -> torch.Tensor:
        if self.token_group is not None and self.grad_sync == "backward":
            return reduce_replicated_grad(self.mora_M, self.token_group)
        return self.mora_M

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        output, bias = self.base_layer(input_)
        return self.operator.forward(self.mora_dropout(input_), self._matrix(), output, inplace=True), bias


class MoRATELayerNormColumnParallelLinear(MoRATEColumnParallelLinear):
    """``Y_t = TE(X)_t + [D(M C(LN(X)))]_t`` around a frozen ``TELayerNormColumnParallelLinear``: the adapter
    reads the normalised input TE computes (``return_layernorm_output=True``), the same tensor the base GEMM
    reads, so ``W + dW`` merges exactly. ``LN(X): [s, b, k]`` (``[s / tp, b, k]`` under sequence parallelism).

    Spec: §4.
    """

    def __init__(self, base_layer: nn.Module, r_hat: int, mora_type: int | str = 6, **kwargs) -> None:
        super().__init__(base_layer, r_hat, mora_type, **kwargs)
        base_layer.return_layernorm_output = True
        base_layer.return_layernorm_output_gathered = False  # TE drops the gathered form's gradient

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        result = self.base_layer(input_)
        # megatron's wrapper returns TE's (out, bias, ln_out) when TE returns the bias, else ((out, ln_out), None)
        if self.base_layer.te_return_bias:
            output, bias, normed = result
        else:
            (output, normed), bias = result
        return self._forward_beside(normed, output), bias

    def release_base(self) -> nn.Module:
        self.base_layer.return_layernorm_output = False
        return self.base_layer


def te_wrapper_class(module: nn.Module, name: str) -> type[MoRATEColumnParallelLinear | MoRATERowParallelLinear]:
    """The MoRA class for a Transformer Engine linear layer, or a ``MoRAConfigError`` naming what to change."""
    cls = type(module).__name__
    if not hasattr(module, "parallel_mode") or not hasattr(module, "tp_size"):
        raise MoRAConfigError(f"{name}: {cls} is not a megatron-core or Transformer Engine linear layer MoRA can wrap")
    if getattr(module, "is_expert", False) or ".local_experts." in f".{name}.":
        # megatron builds an expert's TE linear with tp_size=1 and its expert-TP partition as its whole shape, so the
        # adapter would not see the global weight it must be the same function of at every expert-TP size
        raise MoRAConfigError(
            f"{name}: {cls} is a Transformer Engine MoE expert layer, which MoRA does not adapt yet; build the "
            "experts from megatron-core's local spec (get_gpt_layer_local_spec, moe_grouped_gemm=False), or leave "
            "them out with exclude_modules=['*local_experts*']"
        )
    if hasattr(module, "num_gemms") or "Grouped" in cls:
        raise MoRAConfigError(
            f"{name}: {cls} holds grouped MoE experts, which MoRA does not adapt; leave them out with "
            "exclude_modules=['*experts*'], or build the experts without grouped GEMM"
        )
    if getattr(module, "primary_weights_in_fp8", False):
        raise MoRAConfigError(
            f"{name}: {cls} keeps its weight in FP8 (built under Transformer Engine's quantized_model_init / "
            "fp8_model_init), where a MoRA merge W += dW would be re-quantized and lose most of dW; build the "
            "base model with bf16 or fp32 weights (FP8 compute under te.pytorch.autocast is fine)"
        )
    if hasattr(module, "layer_norm_weight"):
        if module.parallel_mode != "column":
            raise MoRAConfigError(f"{name}: {cls} with parallel_mode={module.parallel_mode!r} is not supported")
        return MoRATELayerNormColumnParallelLinear
    mode = module.parallel_mode
    if mode == "column":
        return MoRATEColumnParallelLinear
    if mode == "row":
        return MoRATERowParallelLinear
    if mode is None:
        return MoRATEDuplicatedLinear
    raise MoRAConfigError(f"{name}: {cls} has parallel_mode={mode!r}; MoRA supports 'column', 'row' and duplicated")
