"""The megatron-core model of a run: a Llama-shaped ``GPTModel`` (local spec, RMSNorm, SwiGLU, RoPE, GQA) split over
``tensor_model_parallel_size`` ranks, and :class:`MegatronBackend`, which trains it with DeepSpeed over the
data-parallel groups. With ``model.pretrained`` (continual pretraining) a local Hugging Face Llama / Qwen2
checkpoint is loaded into every rank's shards first (:mod:`.hf_weights`).

megatron-core is imported inside the functions that build the model: a Hugging Face run never loads it.

Spec: §4.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mora_dist.errors import MoRAConfigError
from mora_dist.model import trainable_summary
from mora_dist.parallel.cpu_shim import cpu_model_parallel_kwargs, cpu_model_parallel_seed, enable_cpu_megatron
from mora_dist.parallel.mpu import MegatronMPU
from mora_dist.run.build import apply_adapters, build_callbacks
from mora_dist.run.config import TORCH_DTYPES, RunConfig
from mora_dist.run.deepspeed_engine import build_engine
from mora_dist.run.distributed import device
from mora_dist.run.megatron.hf_weights import load_hf_into_gpt
from mora_dist.run.model_shape import GPTShape

logger = logging.getLogger(__name__)


def init_model_parallel(tp: int, seed: int, *, pp: int = 1, vpp: int | None = None, ep: int = 1,
                        etp: int = 1) -> None:
    """megatron-core's parallel state over the existing process group, CPU shim when CUDA is absent, seeds."""
    from megatron.core import parallel_state  # megatron-core is heavy: only megatron runs load it

    enable_cpu_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp,
                                             expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # CUDA runs only

        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_model_parallel_seed(seed)



class SequenceParallelRMSNorm(nn.RMSNorm):
    """RMSNorm as megatron builds a norm (``config, hidden_size, eps``), usable under sequence parallelism, which
    megatron-core requires for MoE at TP > 1: it normalises each token alone, so a rank's sequence chunk needs
    nothing from the others, and its weight is tagged ``sequence_parallel`` so megatron sums its gradient over TP,
    as Apex's and Transformer Engine's norms are. Megatron's local spec falls back to a torch norm that refuses
    sequence parallelism when Apex is absent (always on CPU)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def moe_fields(cfg: RunConfig, shape: GPTShape) -> dict[str, Any]:
    """The ``TransformerConfig`` fields of the model's mixture of experts (none for a dense model): top-k of
    ``num_experts`` experts, routed as the Hugging Face model of the same architecture routes (Mixtral: softmax over
    the top-k logits; Qwen3-MoE: softmax over all, then top-k, unless its ``norm_topk_prob`` makes it Mixtral's), the
    load-balancing loss weighted by ``router_aux_loss_coef``; sequence parallelism at TP > 1."""
    m = cfg.model
    if not shape.is_moe:
        return {}
    return dict(
        num_moe_experts=shape.num_experts, moe_router_topk=shape.experts_per_token,
        moe_ffn_hidden_size=shape.moe_intermediate_size, moe_router_pre_softmax=shape.router_pre_softmax,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=m.router_aux_loss_coef,
        moe_token_dispatcher_type=m.moe_token_dispatcher_type, qk_layernorm=shape.qk_layernorm,
        expert_model_parallel_size=m.expert_model_parallel_size,
        expert_tensor_parallel_size=m.expert_tensor_parallel_size,
        sequence_parallel=m.tensor_model_parallel_size > 1,
    )


def layer_spec(config: Any) -> Any:
    """megatron-core's local spec for ``config``: ``SequentialMLP`` experts for a mixture of experts, whose norms
    are :class:`SequenceParallelRMSNorm` under sequence parallelism."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # megatron runs only
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # megatron runs only

    experts = config.num_moe_experts
    spec = get_gpt_layer_local_spec(num_experts=experts, normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    if not config.sequence_parallel:
        return spec
    sub = spec.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = SequenceParallelRMSNorm
    if config.qk_layernorm:
        sub.self_attention.submodules.q_layernorm = sub.self_attention.submodules.k_layernorm = \
            SequenceParallelRMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * config.num_layers, layer_norm=SequenceParallelRMSNorm)


def gpt_shape(cfg: RunConfig, vocab_size: int | None = None) -> GPTShape:
    """The model's :class:`~mora_dist.run.model_shape.GPTShape`: read from ``model.pretrained`` for
    continual pretraining, else from the model section (``vocab_size``: the tokenizer's, for new models)."""
    m = cfg.model
    if m.pretrained is not None:
        return GPTShape.from_pretrained(m.pretrained)
    a = m.arch()
    moe = {}
    if m.architecture != "llama":  # the Hugging Face backend's new Qwen3-MoE keeps norm_topk_prob=False
        moe = dict(model_type=m.architecture, num_experts=a["num_experts"], experts_per_token=a["num_experts_per_tok"],
                   moe_intermediate_size=a["intermediate_size"], router_pre_softmax=m.architecture == "qwen3_moe",
                   qk_layernorm=m.architecture == "qwen3_moe")
    return GPTShape(hidden_size=a["hidden_size"], num_layers=a["num_layers"], num_heads=a["num_heads"],
                    num_kv_heads=a["num_kv_heads"], head_dim=a["hidden_size"] // a["num_heads"],
                    intermediate_size=a["intermediate_size"], vocab_size=vocab_size or m.vocab_size,
                    rope_theta=m.rope_theta, norm_eps=1e-5, tie_word_embeddings=m.tie_word_embeddings, **moe)


def build_gpt(cfg: RunConfig, vocab_size: int) -> nn.Module:
    """The GPTModel of the model section, adapters applied (one pipeline stage). The CPU init draws every global
    weight in the same order at any TP size, so TP = 1 and TP = n start from the same function. With
    ``model.pretrained`` the Hugging Face weights are loaded into this rank's shards before the adapters are
    applied."""
    return build_gpt_chunks(cfg, vocab_size)[0]



def build_gpt_chunks(cfg: RunConfig, vocab_size: int) -> list[nn.Module]:
    """This rank's GPTModel chunks (one per virtual pipeline stage; one without virtual pipeline), adapters
    applied over all of them (names global across stages, :mod:`mora_dist.parallel.chunks`)."""
    # megatron-core is heavy: only megatron runs load it
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel  # megatron-core is heavy: loaded only where megatron is used
    from megatron.core.transformer.transformer_config import TransformerConfig  # megatron runs only

    m = cfg.model
    shape = gpt_shape(cfg, vocab_size)
    if m.pretrained is not None and vocab_size > shape.vocab_size:
        raise MoRAConfigError(f"the tokenizer has {vocab_size} tokens but model.pretrained={m.pretrained!r} embeds "
                              f"{shape.vocab_size}: use the checkpoint's own tokenizer as data.tokenizer")
    extra = cpu_model_parallel_kwargs() if not torch.cuda.is_available() else {}
    native = cfg.deepspeed is None  # megatron-native: Float16Module casts an fp32-built model to bf16
    dtype = TORCH_DTYPES[m.dtype]
    vpp = m.virtual_pipeline_model_parallel_size
    config = TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads, kv_channels=shape.head_dim, ffn_hidden_size=shape.intermediate_size,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=shape.qkv_bias,
        normalization="RMSNorm", layernorm_epsilon=shape.norm_eps,
        tensor_model_parallel_size=m.tensor_model_parallel_size,
        pipeline_model_parallel_size=m.pipeline_model_parallel_size, virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=dtype, params_dtype=torch.float32 if native else dtype,
        bf16=native and m.dtype == "bfloat16", hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        **moe_fields(cfg, shape), **extra,
    )
    torch.manual_seed(cfg.training.seed)
    chunks = []
    for stage in range(vpp or 1):
        vp = stage if vpp else None
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=layer_spec(config),
            vocab_size=shape.vocab_size, max_sequence_length=cfg.data.seq_len, position_embedding_type="rope",
            rotary_base=int(shape.rope_theta), share_embeddings_and_output_weights=shape.tie_word_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp), vp_stage=vp,
        ))
    if m.pretrained is not None:  # one chunk: the config refuses model.pretrained with pipeline stages
        load_hf_into_gpt(chunks[0], m.pretrained, shape)
    apply_adapters(cfg, nn.ModuleList(chunks))  # a ModuleList of chunks reads as the model (chunks.py)
    return chunks



def causal_inputs(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, position_ids, mask, labels)`` of ``input_ids: (b, s)``: predict tokens 1..s-1 from 0..s-2, causal
    mask ``(1, 1, s-1, s-1)`` with True = masked (megatron's own default mask is built on CUDA)."""
    ids, labels = input_ids[:, :-1], input_ids[:, 1:]
    b, s = ids.shape
    position_ids = torch.arange(s, device=ids.device).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=ids.device), 1)[None, None]
    return ids, position_ids, mask, labels



def gpt_loss(model: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of ``input_ids: (b, s)`` (predicting tokens 1..s-1, as the HF backend does)."""
    ids, position_ids, mask, labels = causal_inputs(input_ids)
    per_token = model(ids, position_ids, mask, labels=labels)  # (b, s)
    return per_token.float().mean(), labels.numel()



class MegatronBackend:
    """megatron-core tensor parallelism inside, DeepSpeed (ZeRO over the data-parallel groups) outside."""

    def __init__(self, cfg: RunConfig) -> None:
        from megatron.core import parallel_state  # megatron-core is heavy: only megatron runs load it

        init_model_parallel(cfg.model.tensor_model_parallel_size, cfg.training.seed)
        self.mpu = MegatronMPU(parallel_state)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()

    def build(self, cfg: RunConfig, vocab_size: int, eos_token_id: int, accum: int):
        model = build_gpt(cfg, vocab_size).to(device())
        logger.info("%s (%s, TP=%d)", trainable_summary(model), cfg.method, cfg.model.tensor_model_parallel_size)
        return build_engine(cfg, model, accum, mpu=self.mpu), build_callbacks(cfg)

    def loss(self, engine: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        return gpt_loss(engine, input_ids.to(device()))
