"""Shared fixtures: a seed for every test, tiny Hugging Face models built offline from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

TINY_VOCAB = 96


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


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


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_causal_lm(request):
    return TINY_MODELS[request.param]()


@pytest.fixture
def token_ids():
    return torch.randint(0, TINY_VOCAB, (2, 11))
