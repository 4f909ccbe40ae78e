"""The Hugging Face back end's new models: a Llama, or a mixture of experts (Mixtral, Qwen3-MoE) from the model
section, and the config mistakes refused before anything is built."""

from __future__ import annotations

import json

import pytest
import transformers

from mora_dist.run.config import RunConfigError, validate_run_config
from mora_dist.run.hf import new_model_config


def _raw(**model):
    raw = json.loads(open("configs/remora_tiny_moe.json").read())
    raw["model"].update(model)
    return raw


@pytest.mark.parametrize("architecture, cls, experts_field", [
    ("mixtral", transformers.MixtralConfig, "num_local_experts"),
    ("qwen3_moe", transformers.Qwen3MoeConfig, "num_experts"),
])
def test_moe_fields_reach_the_transformers_config(architecture, cls, experts_field):
    cfg = validate_run_config(_raw(architecture=architecture, num_experts=5, num_experts_per_tok=3,
                                   router_aux_loss_coef=0.02))
    config = new_model_config(cfg, vocab_size=100, eos_token_id=0)
    assert isinstance(config, cls) and getattr(config, experts_field) == 5 and config.num_experts_per_tok == 3
    assert config.output_router_logits and config.router_aux_loss_coef == 0.02  # the balancing loss is trained
    size = config.intermediate_size if architecture == "mixtral" else config.moe_intermediate_size
    assert size == cfg.model.intermediate_size


def test_a_dense_llama_by_default():
    raw = _raw()
    for key in ("architecture", "num_experts", "num_experts_per_tok", "router_aux_loss_coef"):
        raw["model"].pop(key)
    assert isinstance(new_model_config(validate_run_config(raw), 100, 0), transformers.LlamaConfig)


@pytest.mark.parametrize("model, message", [
    ({"architecture": "llama"}, "model.num_experts is set but model.architecture='llama' has no experts"),
    ({"num_experts_per_tok": 5}, "model.num_experts_per_tok=5 exceeds model.num_experts=4"),
    ({"backend": "megatron"}, "model.architecture='mixtral' on model.backend='megatron' trains with megatron-core's "
                              "own DDP and optimizer"),
    ({"expert_model_parallel_size": 2}, "read by model.backend='megatron' only"),
    ({"architecture": "llama", "num_experts": None, "num_experts_per_tok": None, "expert_model_parallel_size": 2},
     "model.expert_model_parallel_size=2 needs experts"),
    ({"backend": "megatron", "expert_model_parallel_size": 3}, "model.num_experts=4 is not divisible by "
                                                                "model.expert_model_parallel_size=3"),
    ({"backend": "megatron", "tensor_model_parallel_size": 2, "expert_tensor_parallel_size": 4},
     "model.expert_tensor_parallel_size=4 must be 1 or model.tensor_model_parallel_size=2"),
    ({"backend": "megatron", "tensor_model_parallel_size": 2}, "set data.seq_len to 1 + a multiple of 2"),
], ids=["experts-on-llama", "top-k-above-experts", "megatron-deepspeed", "ep-on-hf", "ep-dense", "ep-divides",
        "etp", "sequence-parallel"])
def test_moe_mistakes_are_refused_naming_the_field(model, message):
    with pytest.raises(RunConfigError) as info:
        validate_run_config(_raw(**model))
    assert message in str(info.value)
