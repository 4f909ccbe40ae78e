"""CPU stand-ins for Transformer Engine's linear layers and megatron-core's wrappers of them.

Transformer Engine needs CUDA to install, so the TE tests run on these. They mirror, for what MoRA relies on:
- TE 2.20.0.dev0 (NVIDIA/TransformerEngine commit d0067d0), ``transformer_engine/pytorch/module/linear.py`` and
  ``layernorm_linear.py``: the constructor arguments used by megatron; ``in_features``/``out_features`` per
  partition; ``tp_size``, ``tp_group``, ``parallel_mode`` (``"column"``, ``"row"``, None), ``sequence_parallel =
  tp_size > 1 and sequence_parallel``; ``use_bias``/``return_bias``/``apply_bias``; the forward's collectives
  (column: all-gather of the input along the sequence under sequence parallelism, else an all-reduce of the
  input gradient; row: all-reduce or reduce-scatter of the output, then the bias); the return values
  (``out``, ``(out, bias)``, ``(out, ln_out)``, ``(out, bias, ln_out)``); ``LayerNormLinear``'s
  ``layer_norm_weight``/``layer_norm_bias``, ``normalization``, ``zero_centered_gamma``, and the gradient of
  ``ln_out``: added after TE's reduction of the input gradient, and dropped when
  ``return_layernorm_output_gathered`` is set (``_LayerNormLinear.backward`` reads ``grad_outputs[1]`` only for
  the non-gathered form); ``primary_weights_in_fp8`` (``module/base.py``: set under ``quantized_model_init``).
- megatron-core 0.16.1, ``megatron/core/extensions/transformer_engine.py``: ``TELinear``, ``TEColumnParallelLinear``,
  ``TERowParallelLinear``, ``TELayerNormColumnParallelLinear`` (signatures, ``te_return_bias``, the
  ``(output, bias)`` convention, CPU initialisation through ``_initialize_affine_weight_cpu``, parameter
  attributes, ``sharded_state_dict``).
Left out: FP8/quantisation, userbuffers overlap, weight workspaces, ``_extra_state``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import mappings as mm
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu, set_tensor_model_parallel_attributes
from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none
from torch import nn

TE_VERSION = "2.20.0.dev0 (NVIDIA/TransformerEngine d0067d0)"
MEGATRON_CORE_VERSION = "0.16.1"


def _divide(a: int, b: int) -> int:
    if a % b:
        raise ValueError(f"{a} is not divisible by {b}")
    return a // b


# ---------------------------------------------------------------- transformer_engine.pytorch
class Linear(nn.Module):
    """``transformer_engine.pytorch.Linear``."""

    def __init__(self, in_features, out_features, *, sequence_parallel=False, fuse_wgrad_accumulation=False,
                 tp_group=None, tp_size=1, get_rng_state_tracker=None, rng_tracker_name=None, init_method=None,
                 bias=True, return_bias=False, params_dtype=None, parallel_mode=None, device="cpu", **_ignored):
        super().__init__()
        params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.in_features, self.out_features = in_features, out_features
        self.use_bias, self.return_bias, self.apply_bias = bias, return_bias, bias and not return_bias
        self.tp_group = tp_group
        self.tp_size = tp_size if tp_group is None else get_pg_size(tp_group)
        if parallel_mode not in ("column", "row", None):
            raise AssertionError(f"parallel_mode {parallel_mode} not supported")
        self.parallel_mode = parallel_mode
        if parallel_mode == "column":
            self.out_features = _divide(self.out_features, self.tp_size)
        elif parallel_mode == "row":
            self.in_features = _divide(self.in_features, self.tp_size)
        self.sequence_parallel = self.tp_size > 1 and sequence_parallel
        self.primary_weights_in_fp8 = False  # TE: True for modules built under quantized_model_init
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=params_dtype, device=device))
        if init_method is not None:
            init_method(self.weight)
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=params_dtype, device=device)) if bias else None

    def set_tensor_parallel_group(self, tp_group) -> None:
        self.tp_group = tp_group

    def _gemm_input(self, x: torch.Tensor) -> torch.Tensor:
        """Column: gather the sequence (dgrad reduce-scattered) or all-reduce the dgrad. Others: as is."""
        if self.parallel_mode != "column" or self.tp_size == 1:
            return x
        if self.sequence_parallel:
            return mm.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.tp_group)
        return mm.copy_to_tensor_model_parallel_region(x, group=self.tp_group)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        in_gemm = self.apply_bias and self.parallel_mode != "row"
        out = F.linear(x, self.weight, self.bias if in_gemm else None)
        if self.parallel_mode == "row" and self.tp_size > 1:
            if self.sequence_parallel:
                out = mm.reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
            else:
                out = mm.reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        if self.apply_bias and self.parallel_mode == "row":
            out = out + self.bias
        return out

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None):
        out = self._gemm(self._gemm_input(inp))
        return (out, self.bias) if self.return_bias else out


class LayerNormLinear(Linear):
    """``transformer_engine.pytorch.LayerNormLinear``: ``Linear(norm(x))``, optionally returning ``norm(x)``."""

    def __init__(self, in_features, out_features, *, eps=1e-5, normalization="LayerNorm",
                 return_layernorm_output=False, return_layernorm_output_gathered=False, zero_centered_gamma=False,
                 params_dtype=None, device="cpu", **kwargs):
        super().__init__(in_features, out_features, params_dtype=params_dtype, device=device, **kwargs)
        params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"Unsupported normalization {normalization}")
        self.eps, self.normalization, self.zero_centered_gamma = eps, normalization, zero_centered_gamma
        self.return_layernorm_output = return_layernorm_output
        self.return_layernorm_output_gathered = return_layernorm_output_gathered if return_layernorm_output else False
        gamma = torch.zeros if zero_centered_gamma else torch.ones
        self.layer_norm_weight = nn.Parameter(gamma(in_features, dtype=params_dtype, device=device))
        self.layer_norm_bias = (
            nn.Parameter(torch.zeros(in_features, dtype=params_dtype, device=device))
            if normalization == "LayerNorm"
            else None
        )

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.layer_norm_weight + 1 if self.zero_centered_gamma else self.layer_norm_weight
        xf = x.float()
        if self.normalization == "RMSNorm":
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * gamma
        else:
            y = F.layer_norm(xf, (xf.shape[-1],), gamma, self.layer_norm_bias, self.eps)
        return y.to(x.dtype)

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None):
        ln_out = self._norm(inp)
        ln_out_total = self._gemm_input(ln_out)
        out = self._gemm(ln_out_total)
        if self.return_layernorm_output_gathered:
            ln_out = ln_out_total.detach()  # TE returns the gathered tensor but ignores its gradient
        if self.return_bias:
            return (out, self.bias, ln_out) if self.return_layernorm_output else (out, self.bias)
        return (out, ln_out) if self.return_layernorm_output else out


# ---------------------------------------------------------------- megatron.core.extensions.transformer_engine
def _condition_init_method(config, init_method):
    return init_method if config.perform_initialization else (lambda w: None)


def _sharded(layer, prefix, sharded_offsets, metadata, axis_map):
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    state_dict = layer.state_dict(prefix="", keep_vars=True)
    return make_sharded_tensors_for_checkpoint(
        state_dict, prefix, axis_map, sharded_offsets, tp_group=layer._tp_group, dp_cp_group=metadata["dp_cp_group"]
    )


class TELinear(Linear):
    """megatron's ``TELinear``: ``parallel_mode`` ``"column"``, ``"row"`` or ``"duplicated"``; ``(out, bias)``."""

    def __init__(self, input_size, output_size, *, parallel_mode, config, init_method, bias, skip_bias_add,
                 skip_weight_param_allocation, tp_comm_buffer_name=None, is_expert=False, symmetric_ar_type=None,
                 tp_group=None):
        self.config = config
        self.te_return_bias = skip_bias_add and bias
        self.is_first_microbatch = True
        if skip_weight_param_allocation:
            raise ValueError("Transformer Engine linear layers do not support skip_weight_param_allocation")
        if parallel_mode == "duplicated":
            if tp_group is not None:
                raise AssertionError("duplicated linear should not have tp_group set")
            tp_size, te_parallel_mode, tp_group_for_te = 1, None, None
        else:
            tp_size, te_parallel_mode, tp_group_for_te = get_pg_size(tp_group), parallel_mode, tp_group
        super().__init__(
            input_size, output_size, sequence_parallel=config.sequence_parallel, tp_group=tp_group_for_te,
            tp_size=tp_size, init_method=_condition_init_method(config, init_method), bias=bias,
            return_bias=self.te_return_bias, parallel_mode=te_parallel_mode, params_dtype=config.params_dtype,
        )
        for param in self.parameters():
            param.allreduce = True
            if parallel_mode == "duplicated":
                param.sequence_parallel = config.sequence_parallel
        self._tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)

    def forward(self, x):
        out = super().forward(x, is_first_microbatch=self.is_first_microbatch)
        self.is_first_microbatch = False
        return out if self.te_return_bias else (out, None)  # always (output, bias)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return _sharded(self, prefix, sharded_offsets, metadata, {"weight": 0, "bias": 0})


class TEColumnParallelLinear(TELinear):
    """megatron's ``TEColumnParallelLinear``: output rows split (``partition_stride`` = ``stride``)."""

    def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias, skip_bias_add,
                 is_expert, skip_weight_param_allocation=False, tp_comm_buffer_name=None, tp_group=None, stride=1):
        if gather_output:
            raise ValueError("Transformer Engine linear layers do not support gather_output = True")
        tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        world_size, rank = get_pg_size(tp_group), get_pg_rank(tp_group)
        self.stride = stride
        super().__init__(
            input_size, output_size, parallel_mode="column", config=config,
            init_method=_condition_init_method(config, init_method) if not config.use_cpu_initialization
            else (lambda w: None),
            bias=bias, skip_bias_add=skip_bias_add, is_expert=is_expert,
            skip_weight_param_allocation=skip_weight_param_allocation, tp_group=tp_group,
        )
        self.weight.partition_stride = stride
        _cpu_init(self, config, init_method, output_size, input_size, 0, stride, rank, world_size, bias, True)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return _sharded(self, prefix, sharded_offsets, metadata, {"weight": 0, "bias": 0})


class TERowParallelLinear(TELinear):
    """megatron's ``TERowParallelLinear``: input columns split; only ``input_is_parallel=True``."""

    def __init__(self, input_size, output_size, *, config, init_method, bias, input_is_parallel, skip_bias_add,
                 is_expert, tp_comm_buffer_name=None, tp_group=None):
        if not input_is_parallel:
            raise ValueError("Transformer Engine linear layers do not support input_is_parallel = False")
        tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        super().__init__(
            input_size, output_size, parallel_mode="row", config=config,
            init_method=_condition_init_method(config, init_method) if not config.use_cpu_initialization
            else (lambda w: None),
            bias=bias, skip_bias_add=skip_bias_add, skip_weight_param_allocation=False, is_expert=is_expert,
            tp_group=tp_group,
        )
        _cpu_init(self, config, init_method, output_size, input_size, 1, 1, get_pg_rank(tp_group),
                  get_pg_size(tp_group), bias, False)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return _sharded(self, prefix, sharded_offsets, metadata, {"weight": 1})


class TELayerNormColumnParallelLinear(LayerNormLinear):
    """megatron's ``TELayerNormColumnParallelLinear``: the norm (``config.normalization``) fused into a
    column-parallel linear; built with ``return_layernorm_output=False``."""

    def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias, skip_bias_add,
                 is_expert, skip_weight_param_allocation=False, tp_comm_buffer_name=None, tp_group=None, stride=1):
        self.config = config
        if gather_output:
            raise ValueError("Transformer Engine linear layers do not support gather_output = True")
        if is_expert:
            raise ValueError("Transformer Engine linear layers do not yet support MoE")
        if skip_weight_param_allocation:
            raise ValueError("Transformer Engine linear layers do not support skip_weight_param_allocation")
        tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=is_expert)
        self._tp_group = tp_group
        self.te_return_bias = skip_bias_add and bias
        self.is_first_microbatch = True
        self.stride = stride
        super().__init__(
            input_size, output_size, eps=config.layernorm_epsilon, sequence_parallel=config.sequence_parallel,
            tp_group=tp_group, tp_size=config.tensor_model_parallel_size,
            init_method=_condition_init_method(config, init_method) if not config.use_cpu_initialization
            else (lambda w: None),
            bias=bias, return_bias=self.te_return_bias, parallel_mode="column", return_layernorm_output=False,
            zero_centered_gamma=config.layernorm_zero_centered_gamma, normalization=config.normalization,
            params_dtype=config.params_dtype,
        )
        self.weight.partition_stride = stride
        _cpu_init(self, config, init_method, output_size, input_size, 0, stride, get_pg_rank(tp_group),
                  get_pg_size(tp_group), bias, True)

    def forward(self, x):
        out = super().forward(x, is_first_microbatch=self.is_first_microbatch)
        self.is_first_microbatch = False
        # TE's tuple as is when it returns the bias, else (TE's output, None): ((out, ln_out), None) when asked
        return out if self.te_return_bias else (out, None)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return _sharded(self, prefix, sharded_offsets, metadata, {"weight": 0, "bias": 0})


def _cpu_init(layer, config, init_method, output_size, input_size, dim, stride, rank, world_size, bias, split_bias):
    """megatron's ``use_cpu_initialization`` branch: the global weight drawn once, this rank's shard kept."""
    if not config.use_cpu_initialization:
        return
    per_partition = _divide(output_size if dim == 0 else input_size, world_size)
    _initialize_affine_weight_cpu(
        layer.weight, output_size, input_size, per_partition, dim,
        init_method=_condition_init_method(config, init_method), stride=stride, return_master_weight=False,
        params_dtype=config.params_dtype, rank=rank, world_size=world_size, skip_set_tensor_parallel_attributes=True,
    )
    if bias:
        size = per_partition if split_bias else output_size
        layer.bias = nn.Parameter(torch.zeros(size, dtype=config.params_dtype))
        if split_bias:
            set_tensor_model_parallel_attributes(layer.bias, True, 0, stride)
        else:
            layer.bias.sequence_parallel = config.sequence_parallel
        layer.bias.allreduce = True


def te_gpt_layer_spec(qk_layernorm: bool = False):
    """megatron's ``get_gpt_layer_with_transformer_engine_spec()`` (dense, no MoE) with these stand-ins for the
    TE linear layers: the norms fused into ``linear_qkv`` and ``linear_fc1`` (``input_layernorm`` and
    ``pre_mlp_layernorm`` are identities), megatron's local ``DotProductAttention`` for TE's attention kernel."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    local = get_gpt_layer_local_spec(normalization="RMSNorm")
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=local.submodules.self_attention.submodules.q_layernorm if qk_layernorm else IdentityOp,
                    k_layernorm=local.submodules.self_attention.submodules.k_layernorm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear,
                                                                linear_fc2=TERowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
