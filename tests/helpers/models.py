"""Tiny Hugging Face models built offline from configs, with widths that do not divide the usual r_hat."""

from pathlib import Path

import torch
import transformers

from mora_dist.data import load_tokenizer

TINY_VOCAB = 96


def tiny_llama(**overrides) -> transformers.PreTrainedModel:
    """A 2-layer Llama (GQA, SwiGLU) with widths that do not divide the usual r_hat."""
    values = dict(
        vocab_size=TINY_VOCAB, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    values.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**values)).float().eval()


def tiny_qwen2() -> transformers.PreTrainedModel:
    config = transformers.Qwen2Config(
        vocab_size=TINY_VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return transformers.Qwen2ForCausalLM(config).float().eval()


def tiny_gpt_neox() -> transformers.PreTrainedModel:
    config = transformers.GPTNeoXConfig(
        vocab_size=TINY_VOCAB, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )
    return transformers.GPTNeoXForCausalLM(config).float().eval()


TINY_MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt_neox": tiny_gpt_neox}


# Mixtures of experts whose experts are fused 3-D parameters (transformers 5): hidden 40, expert width 26, so
# gate_up (E, 52, 40) and down (E, 40, 26) divide no r_hat the tests use; 5 experts, top 2.
FUSED_EXPERTS = int(transformers.__version__.split(".")[0]) >= 5
MOE_EXPERTS = 5
_MOE_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=40, intermediate_size=26, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64,
                   tie_word_embeddings=False)
_MOE_CONFIGS = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(num_local_experts=MOE_EXPERTS)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        num_experts=MOE_EXPERTS, moe_intermediate_size=26, shared_expert_intermediate_size=18)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(num_experts=MOE_EXPERTS, moe_intermediate_size=26)),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(num_experts=MOE_EXPERTS, eos_token_id=1, pad_token_id=0)),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(
        n_routed_experts=6, moe_intermediate_size=26, n_group=2, topk_group=1, first_k_dense_replace=0,
        n_shared_experts=1, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)),
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", dict(
        num_local_experts=MOE_EXPERTS, head_dim=10, layer_types=["full_attention"])),
}
MOE_KINDS = tuple(_MOE_CONFIGS)


def tiny_moe(kind: str, *, std: float = 0.1, dtype: torch.dtype = torch.float32,
             **overrides) -> transformers.PreTrainedModel:
    """A one-layer mixture of experts of ``kind`` (a :data:`MOE_KINDS` name) with N(0, std) weights (routers and
    biases included, so routing is not uniform; norms stay at one), running transformers' eager experts loop (the
    reference)."""
    model_cls, config_cls, extra = _MOE_CONFIGS[kind]
    config = getattr(transformers, config_cls)(**{**_MOE_COMMON, **extra, **overrides})
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or "bias" in name:  # norms keep their ones
                p.normal_(0.0, std)
    return model.to(dtype).eval()


SHAKESPEARE_VOCAB = 2048  # the shipped tokenizer's size


def save_tiny_checkpoint(path: Path, kind: str, tie: bool = False, **extra) -> Path:
    """A two-layer Hugging Face ``kind`` (llama, qwen2, mixtral, qwen3_moe) saved with the Shakespeare tokenizer at
    ``path``: norms and biases moved off their init, routers sharpened so tokens pick different experts."""
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
           "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM)}[kind]
    moe = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
           "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, head_dim=24)}
    config = cls[0](**{**dict(vocab_size=SHAKESPEARE_VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              tie_word_embeddings=tie, rope_theta=5e5, rms_norm_eps=1e-5),
                       **moe.get(kind, {}), **extra})
    torch.manual_seed(0)
    model = cls[1](config)
    with torch.no_grad():  # norms and biases away from their init, so a swapped or dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("mlp.gate.weight"):  # a router that picks different experts per token
                p.mul_(20)
            if ".mlp.experts." in name:  # experts that weigh in the output, so a wrong one shows in the loss
                p.mul_(8)
    model.save_pretrained(str(path))
    load_tokenizer("data/shakespeare/tokenizer.json").save_pretrained(str(path))
    return path
