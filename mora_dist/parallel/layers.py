"""MoRA around megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear``: same function at every TP size,
Megatron's collectives only. Transformer Engine layers reuse these classes from :mod:`mora_dist.parallel.te`.

Each wrapper is thin: it reads its shard's global ids and the shard plan of ``M`` from
:mod:`mora_dist.parallel.layouts`, builds a :class:`~mora_dist.operators.MoRAOperator` on global ids, and
re-runs the base layer's forward with the adapter added where it costs no communication:

- column-parallel: the adapter reads the input the base layer already has (replicated, or all-gathered along
  the sequence under sequence parallelism); its input gradient joins the base layer's single all-reduce
  (or reduce-scatter) of the input gradient;
- row-parallel: the adapter's output is added to the partial output *before* the base layer's all-reduce
  (or reduce-scatter).

Transformer Engine layers do their collectives inside one call, so for them the adapter runs beside the base
layer and moves ``r_hat``-wide tensors instead (compress, then all-gather ``u`` along the sequence; all-reduce
``z`` on row-parallel layers): ``_forward_beside``. The same path serves megatron-core layers when
``fuse_with_base_comm=False``.

Spec: §4.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import mappings as mm
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.utils import (
    get_pg_size,
    make_sharded_tensor_for_checkpoint,
    make_tp_sharded_tensor_for_checkpoint,
)
from torch import nn

from mora_dist.config import MoRAConfig, resolve_dtype, resolve_mora_type
from mora_dist.errors import MoRAConfigError, ShardingError
from mora_dist.layer import MoRALayerMixin
from mora_dist.merge import RESIDUAL, new_residual
from mora_dist.operators import MoRAOperator
from mora_dist.parallel.layouts import ShardPlan, partition_ids, plan_shard
from mora_dist.parallel.mappings import gather_matrix_shards, reduce_replicated_grad

logger = logging.getLogger(__name__)

_BASE = "base_layer."

ADAPTERS_SAVED = "mora_dist_adapters"
"""Key of a ``dist_checkpointing`` checkpoint's content metadata (the ``metadata`` dict megatron's
``sharded_state_dict`` methods receive, which Megatron-LM stores with the checkpoint): ``True`` when the checkpoint
holds MoRA's entries. Building the state dict to load one whose flag is ``False`` (a base model's), the adapter
entries are left out and keep their fresh values; a missing flag means ``True``."""


def adapters_in_checkpoint(metadata: dict | None) -> bool:
    """Whether a sharded state dict built with ``metadata`` names MoRA's entries (see :data:`ADAPTERS_SAVED`)."""
    return metadata is None or metadata.get(ADAPTERS_SAVED) is not False


def _forget_left_out_keys(module: nn.Module, incompatible_keys) -> None:
    left_out = module.__dict__.pop("_mora_left_out_keys", set())
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in left_out]


def leave_out_of_load(module: nn.Module, keys: set[str]) -> None:
    """``keys`` (full state-dict keys) were left out of the sharded state dict being loaded, by design: the next
    ``load_state_dict`` does not report them missing, so a strict load (Megatron-LM's) passes."""
    if "_mora_left_out_hook" not in module.__dict__:
        module.__dict__["_mora_left_out_hook"] = module.register_load_state_dict_post_hook(_forget_left_out_keys)
    module.__dict__.setdefault("_mora_left_out_keys", set()).update(keys)


def _flatten_base_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State dicts read like the base layer's plus ``mora_M`` (``linear_qkv.weight``, not ``.base_layer.``),
    so Megatron checkpoints of the base model load into the adapted one and back."""
    for key in [k for k in state_dict if k.startswith(prefix + _BASE)]:
        state_dict[prefix + key[len(prefix) + len(_BASE) :]] = state_dict.pop(key)


def _nest_base_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Inverse of :func:`_flatten_base_keys` on load: every key of this module that is not ``mora_*`` is the
    base layer's."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if not rest.startswith(("mora_", _BASE)):
            state_dict[prefix + _BASE + rest] = state_dict.pop(key)


def _tp_group(base_layer: nn.Module) -> dist.ProcessGroup:
    """The base layer's own tensor-parallel group (megatron's global one only for layers that lack it)."""
    group = getattr(base_layer, "tp_group", None)
    return group if group is not None else parallel_state.get_tensor_model_parallel_group()


def _partition_stride(kind: str, base_layer: nn.Module, name: str) -> int:
    """Chunks per rank of the split dim: 2 for gated ``linear_fc1`` (the MLP reads each rank's rows as
    ``[gate_t; up_t]``, whatever the initialisation did), else the weight's ``partition_stride``."""
    if kind == "row":
        return 1
    config = getattr(base_layer, "config", None)
    if name.split(".")[-1] == "linear_fc1" and getattr(config, "gated_linear_unit", False):
        return 2
    return getattr(base_layer.weight, "partition_stride", 1)


class _MegatronMoRALinear(MoRALayerMixin, nn.Module):
    """Shared part of the column- and row-parallel wrappers."""

    parallel_kind = ""
    fuse_with_base_comm = True  # the default of the class, read by the dispatcher before construction

    def __init__(
        self,
        base_layer: nn.Module,
        r_hat: int,
        mora_type: int | str = 6,
        *,
        name: str = "",
        dropout: float = 0.0,
        mora_dtype: torch.dtype | str = torch.float32,
        sharding: str = "auto",
        grad_sync: str = "backward",
        fuse_with_base_comm: bool = True,
        merge_compensation: bool = True,
    ) -> None:
        super().__init__()
        _check_base(base_layer, name, fuse_with_base_comm)
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.name = name
        self.in_features, self.out_features = self.global_features(base_layer)
        self.tp_group, self.tp_size, self.tp_rank = self.tp_layout(base_layer)
        # An MoE expert's linear (SequentialMLP local expert, shared experts are not) runs no collective of its
        # own: the token dispatcher gathers its input over the expert-TP group and reduce-scatters its output.
        self.explicit_expert_comm = bool(getattr(base_layer, "explicit_expert_comm", False))
        self.is_expert = bool(getattr(base_layer, "is_expert", False))  # its dW is split over the expert groups
        self.sharding = sharding
        self.stride = _partition_stride(self.parallel_kind, base_layer, name)
        self.fuse_with_base_comm = fuse_with_base_comm
        mora_type = resolve_mora_type(mora_type)
        self.plan = self._plan(mora_type, r_hat)
        self.operator = self._operator(mora_type, r_hat, self.plan)
        matrix = torch.zeros(*self.operator.m_shape, dtype=resolve_dtype(mora_dtype), device=base_layer.weight.device)
        self.mora_M = nn.Parameter(matrix)
        sharded = self.plan.m_dim is not None
        # megatron's gradient norm counts a parameter without tensor_model_parallel only on dense TP rank 0; an
        # expert's M with expert TP = 1 has no copy in its model-parallel group, whatever the dense TP rank
        counted_everywhere = sharded or (self.is_expert and self.tp_size == 1)
        set_tensor_model_parallel_attributes(
            self.mora_M, counted_everywhere, self.plan.m_dim if sharded else (0 if counted_everywhere else -1),
            self.plan.m_stride
        )
        # Reduced as the base weight would be: over data parallel for a dense layer, over the expert data-parallel
        # group for an expert under expert parallelism (megatron's DDP and optimizers read this flag).
        self.mora_M.allreduce = bool(getattr(base_layer.weight, "allreduce", True))
        self.grad_sync = grad_sync
        if not sharded and grad_sync == "step" and self.tp_size > 1:
            # summed over TP once per optimizer step by mora_dist.parallel.finalize_model_grads
            self.mora_M.mora_tp_sum_group = self.tp_group
        self.mora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_merge_compensation(merge_compensation)  # the residual is this rank's shard, like the weight
        self.register_state_dict_post_hook(_flatten_base_keys)
        self.register_load_state_dict_pre_hook(_nest_base_keys)
        logger.debug("%s: r_hat=%d, M %s (%s)", name, r_hat, tuple(self.mora_M.shape), self.plan.reason or "sharded")

    # ---- what the base layer says about itself (Transformer Engine layers answer differently) ----
    @staticmethod
    def global_features(base_layer: nn.Module) -> tuple[int, int]:
        """``(k, d)`` of the TP = 1 weight."""
        return base_layer.input_size, base_layer.output_size

    @staticmethod
    def tp_layout(base_layer: nn.Module) -> tuple[dist.ProcessGroup | None, int, int]:
        """``(group, size, rank)`` over which the base weight is split."""
        group = _tp_group(base_layer)
        return group, dist.get_world_size(group), dist.get_rank(group)

    # ---- the dispatch interface (:mod:`mora_dist.dispatch`) ----
    @classmethod
    def check(cls, base_layer: nn.Module, name: str, config: MoRAConfig, r_hat: int) -> None:
        """Raise before anything changes if ``base_layer`` cannot be wrapped as configured."""
        check_megatron_linear(cls, base_layer, name, config, r_hat)

    @classmethod
    def from_base(cls, base_layer: nn.Module, name: str, config: MoRAConfig, r_hat: int) -> _MegatronMoRALinear:
        return wrap_megatron_linear(cls, base_layer, name, config, r_hat)

    # ---- plan and operator ----
    def _plan(self, mora_type: int, r_hat: int) -> ShardPlan:
        return plan_shard(
            self.parallel_kind,
            self.in_features,
            self.out_features,
            r_hat,
            mora_type,
            tp_size=self.tp_size,
            tp_rank=self.tp_rank,
            stride=self.stride,
            sharding=self.sharding,
            where=self.name,
        )

    def _operator(self, mora_type: int, r_hat: int, plan: ShardPlan) -> MoRAOperator:
        return MoRAOperator(
            self.in_features,
            self.out_features,
            r_hat,
            mora_type,
            in_ids=plan.in_ids,
            out_ids=plan.out_ids,
            m_rows=plan.m_rows,
            m_cols=plan.m_cols,
        )

    def _make_operator(self, mora_type: int) -> MoRAOperator:
        plan = self._plan(mora_type, self.r_hat)
        if not plan.same_matrix_layout(self.plan):
            raise ShardingError(
                f"{self.name}: switching mora_type {self.mora_type} -> {mora_type} changes how M is split over "
                f"TP={self.tp_size} ({self.plan.reason or 'sharded'} -> {plan.reason or 'sharded'}); use "
                "tensor_parallel_sharding='replicate' for ReMoRA cycles that mix these types"
            )
        self.plan = plan
        return self._operator(mora_type, self.r_hat, plan)

    def _base_weight_shard(self) -> torch.Tensor:
        return self.base_layer.weight

    def _matrix(self, x: torch.Tensor) -> torch.Tensor:
        """``M`` as the forward on activations ``x`` uses it: a replicated ``M`` gets its gradient SUM-reduced over
        TP (in ``M``'s dtype); for bf16/fp16 activations it is cast to their dtype, so the adapter multiplies in
        the activation dtype as the base layer does while ``M`` and its gradient stay fp32."""
        M = self.mora_M
        if self.plan.m_dim is None and self.grad_sync == "backward" and self.tp_size > 1:
            M = reduce_replicated_grad(M, self.tp_group)
        if x.is_floating_point() and x.dtype.itemsize < M.dtype.itemsize:
            M = M.to(x.dtype)
        return M

    def _apply(self, fn, recurse: bool = True):
        """Keep ``M`` in ``mora_dtype`` when the model is cast (megatron's ``Float16Module`` calls
        ``module.bfloat16()``; so would ``model.half()``): only a device move applies to it, so ``M`` and the
        optimizer's master copy of it stay fp32 and keep every bit. Spec: §4 (M and merges in fp32)."""
        M = self.mora_M
        kept = M.data
        super()._apply(fn, recurse)
        if M.dtype != kept.dtype:
            M.data = kept.to(M.device)
            if M.grad is not None:
                M.grad = M.grad.to(kept.dtype)
        return self

    def _dropout(self, x: torch.Tensor, split: str | None = None) -> torch.Tensor:
        """Adapter dropout with the TP = 1 mask: the mask of the global input, restricted to this rank's part.

        ``split``: None when ``x`` is the whole input (every rank draws the same mask, as TP = 1 does);
        ``"features"`` when ``x: [s, b, k / tp]`` holds the input columns ``plan.in_ids``; ``"sequence"`` when
        ``x: [s / tp, b, k]`` holds this rank's contiguous chunk of the sequence. The mask is drawn for the
        global shape from the default generator, whose state megatron keeps equal over the TP ranks (its
        tensor-parallel tracker gives each rank a different state, the opposite of what is needed here), so TP
        = n draws the very numbers TP = 1 draws, at the cost of TP = 1's draw. Spec: §4.
        """
        drop = self.mora_dropout
        if split is None or self.tp_size == 1 or not isinstance(drop, nn.Dropout) or not drop.training:
            return drop(x)
        if split == "features":
            ones = x.new_ones(*x.shape[:-1], self.in_features)
            mask = nn.functional.dropout(ones, drop.p).index_select(-1, self.plan.in_ids.to(x.device))
        else:
            ones = x.new_ones(x.shape[0] * self.tp_size, *x.shape[1:])
            mask = nn.functional.dropout(ones, drop.p).narrow(0, self.tp_rank * x.shape[0], x.shape[0])
        return x * mask

    def _m_ids_per_rank(self) -> list[torch.Tensor]:
        return [partition_ids(self.r_hat, self.tp_size, t, stride=self.plan.m_stride) for t in range(self.tp_size)]

    # ---- global matrix (adapter files at any TP size) ----
    def get_global_M(self, local: torch.Tensor | None = None) -> torch.Tensor:
        """The global ``(r_hat, r_hat)`` matrix; collective over the TP group when ``M`` is sharded. ``local``:
        this rank's shard to gather instead of the module's (e.g. its fp32 optimizer master)."""
        local = (self.mora_M if local is None else local).detach()
        if self.plan.m_dim is None:
            return local.clone()
        return gather_matrix_shards(local, self._m_ids_per_rank(), self.plan.m_dim, self.tp_group)

    @torch.no_grad()
    def set_global_M(self, M: torch.Tensor) -> None:
        """Keep this rank's shard of the global ``(r_hat, r_hat)`` matrix."""
        if self.plan.m_dim is not None:
            M = M.index_select(self.plan.m_dim, self.plan.m_ids.to(M.device))
        self.mora_M.copy_(M.to(self.mora_M.dtype))

    # ---- dist_checkpointing ----
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The base layer's sharded tensors under its usual keys, plus ``{prefix}mora_M``: split over TP like
        the base weight (global shape ``(r_hat, r_hat)``) when sharded, else one replica per TP rank; and the
        merge residual ``{prefix}mora_base_residual`` (bf16/fp16 base) sharded like the weight. Only the base
        layer's when loading a checkpoint without adapters (:data:`ADAPTERS_SAVED` ``False``)."""
        with_adapters = adapters_in_checkpoint(metadata)
        metadata = dict(metadata or {})
        dp_group = metadata.get("dp_cp_group") or parallel_state.get_data_parallel_group(with_context_parallel=True)
        metadata["dp_cp_group"] = dp_group
        state = self.base_layer.sharded_state_dict(prefix, sharded_offsets, metadata)
        if not with_adapters:
            leave_out_of_load(self, {f"{prefix}mora_M", f"{prefix}{RESIDUAL}"})
            return state
        residual = getattr(self, RESIDUAL)
        if residual is None and self.merge_compensation:
            # Declared from the start (zeros until the first merge): a loader builds the sharded state dict of a
            # fresh model (Megatron-LM's --load), which must already name the buffer a saved run had.
            residual = new_residual(self._base_weight_shard())
            setattr(self, RESIDUAL, residual)
        if residual is not None:
            # This rank's part of what a bf16 base could not hold at the merges: sharded exactly like the weight,
            # so a resumed run folds it into the next merge as the uninterrupted one does.
            weight = state[f"{prefix}weight"]
            extra = {"dtype": residual.dtype} if hasattr(weight, "dtype") else {}
            state[f"{prefix}{RESIDUAL}"] = dataclasses.replace(weight, key=f"{prefix}{RESIDUAL}", data=residual,
                                                               **extra)
        key = f"{prefix}mora_M"
        dp_rank = dist.get_rank(dp_group)
        if self.plan.m_dim is None:
            state[key] = make_sharded_tensor_for_checkpoint(
                self.mora_M, key, sharded_offsets, replica_id=(0, self.tp_rank, dp_rank)
            )
            return state
        sharded = make_tp_sharded_tensor_for_checkpoint(
            self.mora_M,
            key,
            tp_axis=self.plan.m_dim,
            prepend_offsets=sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=dp_group,
        )
        if self.plan.m_stride == 2:  # rows [chunk t; chunk t + tp]: megatron's gated-fc1 factory
            sharded = apply_swiglu_sharded_factory(sharded, sharded_offsets)
        state[key] = sharded
        return state

    def extra_repr(self) -> str:
        where = "replicated" if self.plan.m_dim is None else f"sharded dim {self.plan.m_dim}"
        return f"r_hat={self.r_hat}, mora_type={self.mora_type}, TP={self.tp_size}, M {where}"

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's local matmul with no collective of its own (ours replace them)."""
        kwargs = dict(
            input=x,
            weight=weight,
            bias=bias,
            gradient_accumulation_fusion=self.base_layer.gradient_accumulation_fusion,
            allreduce_dgrad=False,
            sequence_parallel=False,
            grad_output_buffer=None,
            tp_group=self.tp_group,
        )
        if not weight.requires_grad:
            kwargs["wgrad_deferral_limit"] = None
        return self.base_layer._forward_impl(**kwargs)


class MoRAColumnParallelLinear(_MegatronMoRALinear):
    """``Y_t = X W_t^T + b_t + [D(M C(X))]_t`` around a frozen column-parallel layer (output rows split).

    ``X: [s, b, k]`` (``[s / tp, b, k]`` under sequence parallelism) is replicated; rank ``t`` returns its
    output rows ``[s, b, d / tp]`` (gathered if the base layer gathers) and the bias as the base does.
    ``M: (r_hat, r_hat)`` is split by rows like the base rows (same ``partition_stride``) when every rank's
    rows read disjoint rows of ``M`` (interleave decompression with aligned groups); otherwise it is replicated
    and its gradient SUM-reduced over TP. ``C`` and ``D`` act on TP = 1 ids (``linear_qkv``: per query group
    ``[q, k, v]``; gated ``linear_fc1``: ``[gate; up]``).

    Spec: §4.
    """

    parallel_kind = "column"

    def forward(
        self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.base_layer
        weight = base.weight if weight is None else weight
        if not self.fuse_with_base_comm:
            output, bias = base(input_)
            output = self._forward_beside(input_, output)
            if runtime_gather_output:
                output = mm.gather_from_tensor_model_parallel_region(output, group=self.tp_group)
            return output, bias
        if self.explicit_expert_comm:
            x = input_
        elif base.sequence_parallel:
            x = mm.gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=self.tp_group)
        elif base.allreduce_dgrad:
            x = mm.copy_to_tensor_model_parallel_region(input_, group=self.tp_group)  # one dX all-reduce for both
        else:
            x = input_
        bias = base.bias if not base.skip_bias_add else None
        # The base output is fresh and read by no one else: the adapter adds into it.
        output = self.operator.forward(
            self._dropout(x), self._matrix(x), self._linear(x, weight, bias), inplace=True
        )
        gather = base.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            output = mm.gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, (base.bias if base.skip_bias_add else None)

    def _forward_beside(self, input_: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Adapter next to a base that runs its own collectives: compress the local tokens, then gather the
        ``r_hat``-wide ``u`` along the sequence (sequence parallel) or all-reduce its gradient."""
        M = self._matrix(input_)
        split = "sequence" if self.base_layer.sequence_parallel else None
        u = self.operator.compress(self._dropout(input_, split).to(M.dtype))
        if self.explicit_expert_comm:
            pass  # the dispatcher sums the input gradient over the expert-TP group
        elif self.base_layer.sequence_parallel:
            u = mm.gather_from_sequence_parallel_region(u, tensor_parallel_output_grad=True, group=self.tp_group)
        else:
            u = mm.copy_to_tensor_model_parallel_region(u, group=self.tp_group)
        z = self.operator.apply_matrix(u, M)
        return self.operator.decompress_add(output, z.to(output.dtype))


class MoRARowParallelLinear(_MegatronMoRALinear):
    """``Y = sum_t (X_t W_t^T + [D(M C(X))]_t) + b`` around a frozen row-parallel layer (input columns split).

    ``X_t: [s, b, k / tp]`` (split unless ``input_is_parallel=False``, then split here). Each rank adds its
    adapter part to its partial output before the base layer's all-reduce (reduce-scatter along the sequence
    under sequence parallelism): zero extra collectives. ``M`` is split by columns like the base columns when
    the ranks' inputs fill disjoint groups (block-sum compression with aligned groups); otherwise replicated,
    with its gradient SUM-reduced over TP. Returns ``(Y, bias)`` as the base does.

    Spec: §4.
    """

    parallel_kind = "row"

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.base_layer
        x = (
            input_
            if base.input_is_parallel
            else mm.scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        )
        if not self.fuse_with_base_comm:
            output_, bias = base(input_)
            return self._forward_beside(x, output_), bias
        partial = self.operator.forward(
            self._dropout(x, "features"), self._matrix(x), self._linear(x, base.weight, None), inplace=True
        )
        if self.explicit_expert_comm:
            output_ = partial  # the dispatcher's combine reduces the expert-TP partial sums
        elif base.sequence_parallel:
            output_ = mm.reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        else:
            output_ = mm.reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        if base.skip_bias_add:
            return output_, base.bias
        return (output_ + base.bias if base.bias is not None else output_), None

    def _forward_beside(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Adapter next to a base that reduces by itself: reduce the ``r_hat``-wide partial ``z`` instead."""
        M = self._matrix(x)
        u = self.operator.compress(self._dropout(x, "features").to(M.dtype))
        z = self.operator.apply_matrix(u, M)
        if self.explicit_expert_comm:
            pass  # the dispatcher's combine reduces the expert-TP partial sums
        elif self.base_layer.sequence_parallel:
            z = mm.reduce_scatter_to_sequence_parallel_region(z, group=self.tp_group)
        else:
            z = mm.reduce_from_tensor_model_parallel_region(z, group=self.tp_group)
        return self.operator.decompress_add(output, z.to(output.dtype))


def _check_base(base_layer: nn.Module, name: str, fuse_with_base_comm: bool) -> None:
    expert_tp = get_pg_size(getattr(base_layer, "tp_group", None)) if getattr(base_layer, "is_expert", False) else 1
    dense_tp = parallel_state.get_tensor_model_parallel_world_size()
    if expert_tp > 1 and expert_tp != dense_tp:
        # megatron counts a replicated parameter in the gradient norm on dense TP rank 0 only, which is not one
        # rank per expert-TP group unless the two TP sizes agree
        raise MoRAConfigError(
            f"{name}: expert_tensor_parallel_size={expert_tp} with tensor_model_parallel_size={dense_tp} is not "
            "supported for MoRA experts; use expert_tensor_parallel_size=1 or equal to tensor_model_parallel_size"
        )
    if getattr(base_layer, "weight", None) is None:
        raise MoRAConfigError(
            f"{name}: the layer has no weight of its own (skip_weight_param_allocation, e.g. a tied output "
            "layer); add it to exclude_modules"
        )
    if not fuse_with_base_comm and getattr(base_layer, "gather_output", False):
        raise MoRAConfigError(f"{name}: a layer that gathers its output needs fuse_with_base_comm=True")


def check_megatron_linear(cls: type[_MegatronMoRALinear], module: nn.Module, name: str, config: MoRAConfig,
                          r_hat: int) -> None:
    """Raise now, before :func:`mora_dist.apply_mora` changes anything, if ``module`` cannot be wrapped by ``cls``
    as configured (unsupported layer, or ``M`` that cannot be sharded under ``tensor_parallel_sharding='shard'``)."""
    _check_base(module, name, cls.fuse_with_base_comm)
    (k, d), (_, tp_size, tp_rank) = cls.global_features(module), cls.tp_layout(module)
    plan_shard(
        cls.parallel_kind,
        k,
        d,
        r_hat,
        config.mora_type,
        tp_size=tp_size,
        tp_rank=tp_rank,
        stride=_partition_stride(cls.parallel_kind, module, name),
        sharding=config.tensor_parallel_sharding,
        where=name,
    )


def wrap_megatron_linear(cls: type[_MegatronMoRALinear], module: nn.Module, name: str, config: MoRAConfig,
                         r_hat: int) -> _MegatronMoRALinear:
    """Wrap one megatron-core (or Transformer Engine) linear layer with ``cls`` for :func:`mora_dist.apply_mora`.
    Spec: §4."""
    return cls(
        module,
        r_hat,
        config.mora_type,
        name=name,
        dropout=config.dropout,
        mora_dtype=config.torch_dtype,
        sharding=config.tensor_parallel_sharding,
        grad_sync=config.tensor_parallel_grad_sync,
        fuse_with_base_comm=cls.fuse_with_base_comm,
        merge_compensation=config.merge_compensation,
    )
