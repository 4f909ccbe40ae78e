"""Tiny Hugging Face models built offline from configs, with widths that do not divide the usual r_hat."""

import torch  # noqa: F401
import transformers

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
