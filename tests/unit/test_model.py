"""apply_mora on tiny Llama / Qwen2 / GPT-NeoX models: targeting, freezing, merging, unloading."""

import pytest
import torch
import transformers
from torch import nn

from mora_dist import (
    MoRAConfig,
    MoRAConfigError,
    MoRALinear,
    NoMatchingModuleError,
    apply_mora,
    merge_mora,
    mora_layers,
    trainable_summary,
    unload,
)
from tests.helpers.models import TINY_VOCAB, tiny_llama


def _train(model, ids, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("mora_type", [1, 6])
def test_adapted_model_starts_equal_trains_and_merges_exactly(tiny_causal_lm, token_ids, mora_type):
    model = tiny_causal_lm
    before = model(token_ids).logits
    apply_mora(model, MoRAConfig(r=4, mora_type=mora_type, target_modules="all-linear"))
    torch.testing.assert_close(model(token_ids).logits, before, rtol=0, atol=0)
    model.train()
    _train(model, token_ids)
    model.eval()
    trained = model(token_ids).logits
    assert (trained - before).abs().max() > 1e-3
    assert merge_mora(model) == len(list(mora_layers(model)))
    torch.testing.assert_close(model(token_ids).logits, trained, rtol=0, atol=1e-5)
    assert all(torch.count_nonzero(layer.mora_M) == 0 for _, layer in mora_layers(model))


def test_only_matrices_and_modules_to_save_train():
    model = tiny_llama()
    apply_mora(
        model, MoRAConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    )
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        [f"model.layers.{i}.self_attn.{p}.mora_M" for i in range(2) for p in ("q_proj", "v_proj")]
        + ["model.embed_tokens.weight", "lm_head.weight"]
    )
    assert trainable_summary(model).startswith("trainable params: ")


@pytest.mark.parametrize(
    ("targets", "exclude", "expected"),
    [
        (["q_proj"], None, {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}),
        (
            r"model\.layers\.1\.mlp\.(gate|up)_proj",
            None,
            {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"},
        ),
        (["layers.0.*_proj"], ["*mlp*"], {f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}),
    ],
    ids=["names", "regex", "wildcard_exclude"],
)
def test_target_forms(targets, exclude, expected):
    model = tiny_llama()
    apply_mora(model, MoRAConfig(r=4, target_modules=targets, exclude_modules=exclude))
    assert {name for name, _ in mora_layers(model)} == expected


def test_all_linear_skips_the_output_head():
    model = apply_mora(tiny_llama(), MoRAConfig(r=4, target_modules="all-linear"))
    names = {name for name, _ in mora_layers(model)}
    assert len(names) == 14 and "lm_head" not in names


def test_unmatched_target_raises_before_any_change():
    model = tiny_llama()
    with pytest.raises(NoMatchingModuleError, match="'qkv_proj'.*q_proj"):
        apply_mora(model, MoRAConfig(r=4, target_modules=["q_proj", "qkv_proj"]))
    assert not any(isinstance(m, MoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_layer_too_small_for_rope_names_the_layer():
    model = nn.Sequential(nn.Linear(1, 1))
    with pytest.raises(MoRAConfigError, match=r"r_hat=0 for layer '0' must be positive.*r=1"):
        apply_mora(model, MoRAConfig(r=1, mora_type=6, target_modules=["0"]))


def test_applying_twice_is_rejected():
    model = apply_mora(tiny_llama(), MoRAConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(MoRAConfigError, match="unload"):
        apply_mora(model, MoRAConfig(r=4, target_modules=["q_proj"]))


def test_unloaded_model_saves_and_reloads_in_plain_transformers(tmp_path, token_ids):
    model = tiny_llama()
    apply_mora(model, MoRAConfig(r=4, mora_type=6, target_modules="all-linear"))
    model.train()
    _train(model, token_ids)
    model.eval()
    trained = model(token_ids).logits
    plain = unload(model)
    assert not any(isinstance(m, MoRALinear) for m in plain.modules())
    plain.save_pretrained(tmp_path / "merged", safe_serialization=True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    torch.testing.assert_close(reloaded(token_ids).logits, trained, rtol=0, atol=1e-5)
    assert reloaded.config.vocab_size == TINY_VOCAB


class _LinearListMoE(nn.Module):
    """Experts as a list of nn.Linear with an nn.Linear router (transformers 4.x, many custom models)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(12, 3, bias=False)
        self.experts = nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(12, 20), "w2": nn.Linear(20, 12)})
                                     for _ in range(3))


def test_experts_kept_as_linear_lists_are_adapted_and_the_router_is_not():
    model = nn.ModuleDict({"attn": nn.Linear(12, 12), "moe": _LinearListMoE()})
    apply_mora(model, MoRAConfig(r=2, target_modules="all-linear"))
    assert [n for n, _ in mora_layers(model)] == ["attn"] + [f"moe.experts.{e}.{w}" for e in range(3)
                                                                for w in ("w1", "w2")]
    assert not model["moe"].gate.weight.requires_grad
    apply_mora(unload(model), MoRAConfig(r=2, target_modules=["attn", "gate"]))
    assert [n for n, _ in mora_layers(model)] == ["attn", "moe.gate"]  # a router named is adapted
