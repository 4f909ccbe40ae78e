"""A tiny megatron-core mixture-of-experts ``GPTModel`` (local spec, ``SequentialMLP`` experts, shared experts) at any
TP x EP x ETP layout, holding the same global weights at every layout. Call after
:func:`tests.helpers.parallel_setup.init_megatron` with the same sizes."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from mora_dist.run.megatron.model import SequenceParallelRMSNorm

EXPERTS, TOPK, HIDDEN, FFN, MOE_FFN, SHARED_FFN, VOCAB = 4, 2, 32, 48, 24, 16, 64


def moe_config(tp: int, ep: int, etp: int, dispatcher: str = "alltoall", *, num_layers: int = 2, bf16: bool = False):
    """Its ``TransformerConfig``: no load-balancing loss, which depends on how the batch is split over data
    parallel (a product of batch means), so layouts with different DP sizes train different functions with it."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_kwargs

    return TransformerConfig(
        num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=FFN,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp, num_moe_experts=EXPERTS, moe_router_topk=TOPK,
        moe_ffn_hidden_size=MOE_FFN, moe_shared_expert_intermediate_size=SHARED_FFN,
        moe_token_dispatcher_type=dispatcher, moe_router_load_balancing_type="none",
        bf16=bf16, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        **cpu_model_parallel_kwargs(),
    )


def moe_gpt(tp: int, ep: int, etp: int, dispatcher: str = "alltoall", *, seq: int = 8, bf16: bool = False,
            seed: int = 0):
    """The model at this layout with :func:`set_global_weights` applied (fp32 parameters)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    config = moe_config(tp, ep, etp, dispatcher, bf16=bf16)
    layer = get_gpt_layer_local_spec(num_experts=EXPERTS, normalization="RMSNorm")
    layer.submodules.input_layernorm = SequenceParallelRMSNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    spec = TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=SequenceParallelRMSNorm)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=seq,
                     position_embedding_type="rope")
    set_global_weights(model, seed)
    return model


def _expert_layout(name: str) -> tuple[int, int, int]:
    """``(global expert offset, TP size, TP rank)`` of a parameter: experts are split over the expert-TP group
    and numbered from their expert-parallel rank's offset; every other parameter over TP."""
    from megatron.core import parallel_state as ps

    if ".local_experts." in name:
        return (ps.get_expert_model_parallel_rank() * (EXPERTS // ps.get_expert_model_parallel_world_size()),
                ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank())
    return 0, ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def global_name(name: str) -> str:
    """``name`` with the local expert index replaced by the global one."""
    offset, _, _ = _expert_layout(name)
    if not offset:
        return name
    head, _, rest = name.partition(".local_experts.")
    index, _, tail = rest.partition(".")
    return f"{head}.local_experts.{offset + int(index)}.{tail}"


def _stride(name: str, param: torch.Tensor) -> int:
    """Chunks per rank of the split dim: gated ``linear_fc1`` holds ``[gate_t; up_t]``."""
    return 2 if name.split(".")[-2] == "linear_fc1" else getattr(param, "partition_stride", 1)


def _shard_ids(size: int, tp: int, rank: int, stride: int) -> torch.Tensor:
    chunk = size // stride
    part = chunk // tp
    return torch.cat([torch.arange(c * chunk + rank * part, c * chunk + (rank + 1) * part) for c in range(stride)])


@torch.no_grad()
def set_global_weights(model: nn.Module, seed: int = 0) -> None:
    """Give every parameter this rank's part of one global tensor drawn from its global name (norm weights near
    1), so every layout holds the same TP = 1, EP = 1 model."""
    for name, param in model.named_parameters():
        if "mora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        _, tp, rank = _expert_layout(name)
        split = getattr(param, "tensor_model_parallel", False) and tp > 1
        dim = param.partition_dim if split else 0
        shape = list(param.shape)
        if split:
            shape[dim] *= tp
        generator = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(global_name(name).encode()))
        full = torch.randn(shape, generator=generator, dtype=torch.float64)
        full = 1 + 0.1 * full if "norm" in name else 0.3 * full
        if split:
            full = full.index_select(dim, _shard_ids(shape[dim], tp, rank, _stride(name, param)))
        param.copy_(full.to(param.dtype))


def gather_sequence(x: torch.Tensor) -> torch.Tensor:
    """The whole ``[s, ...]`` tensor from this rank's sequence chunk ``[s / tp, ...]`` (sequence parallel)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp)]
    torch.distributed.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, 0)
