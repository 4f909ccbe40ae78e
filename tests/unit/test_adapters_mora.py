"""save_mora / load_mora: exact round trip, clear mismatch errors, and the MoRA authors' PEFT-fork files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mora_dist import AdapterLoadError, MoRAConfig, apply_mora, load_mora, mora_layers, save_mora
from tests.helpers.models import tiny_llama
from tests.helpers.reference import dense_delta


def _base(**overrides):
    torch.manual_seed(7)  # the same base weights every time
    return tiny_llama(**overrides)


def _trained(mora_type=6, **config):
    model = _base()
    apply_mora(model, MoRAConfig(r=4, mora_type=mora_type, target_modules="all-linear", **config))
    for _, layer in mora_layers(model):
        with torch.no_grad():
            layer.mora_M.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("mora_type", [1, 2, 6])
def test_round_trip_reproduces_logits(tmp_path, token_ids, mora_type):
    model = _trained(mora_type, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    save_mora(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dir left behind
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.mora_M" in keys
    fresh = _base()
    load_mora(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(token_ids).logits, model(token_ids).logits, rtol=0, atol=0)


def test_mismatched_model_names_module_and_shapes(tmp_path):
    save_mora(_trained(1), tmp_path / "adapter")
    wider = _base(hidden_size=64)
    with pytest.raises(
        AdapterLoadError,
        match=r"module 'model\.layers\.\d\.\w+\.\w+_proj': adapter matrix has shape \(\d+, \d+\), "
        r"the model's layer expects \(\d+, \d+\)",
    ):
        load_mora(wider, tmp_path / "adapter")


def test_overwriting_an_adapter_replaces_it(tmp_path, token_ids):
    save_mora(_trained(1), tmp_path / "adapter")
    model = _trained(1)
    save_mora(model, tmp_path / "adapter")
    fresh = load_mora(_base(), tmp_path / "adapter")
    torch.testing.assert_close(fresh(token_ids).logits, model(token_ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("mora_type", [1, 4, 6])
def test_loads_adapters_of_the_authors_peft_fork(tmp_path, token_ids, mora_type):
    """Their files: ``use_mora``/``mora_type``/``r`` in a LORA config, M under ``lora_A.weight`` (and the same
    module again as ``lora_B``). The expected output is built from the spec's dense dW, not from our layer."""
    targets = ["q_proj", "v_proj", "down_proj"]
    base = _base()
    modules = dict(base.named_modules())
    tensors, expected_weights = {}, {}
    for name, module in modules.items():
        if name.split(".")[-1] not in targets:
            continue
        k, d = module.in_features, module.out_features
        r_hat = int(((k + d) * 8) ** 0.5 + 0.5)
        r_hat = r_hat // 2 * 2 if mora_type == 6 else r_hat
        M = torch.randn(r_hat, r_hat) * 0.05
        tensors[f"base_model.model.{name}.lora_A.weight"] = M
        tensors[f"base_model.model.{name}.lora_B.weight"] = M.clone()
        expected_weights[name] = module.weight.double() + dense_delta(M, k, d, mora_type)
    path = tmp_path / "authors"
    path.mkdir()
    config = {
        "peft_type": "LORA",
        "use_mora": True,
        "mora_type": mora_type,
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))

    reference = _base()
    with torch.no_grad():
        for name, weight in expected_weights.items():
            reference.get_submodule(name).weight.copy_(weight.float())
    model = load_mora(base, path)
    assert {n for n, _ in mora_layers(model)} == set(expected_weights)
    torch.testing.assert_close(model(token_ids).logits, reference(token_ids).logits, rtol=0, atol=1e-5)


def _authors_file(path, base, extra: dict[str, torch.Tensor], modules_to_save: list[str]) -> dict[str, torch.Tensor]:
    """An authors'-format adapter on ``q_proj`` (type 1) with ``extra`` tensors; returns the matrices."""
    tensors = {}
    for name, module in base.named_modules():
        if name.endswith("q_proj"):
            r_hat = int(((module.in_features + module.out_features) * 8) ** 0.5 + 0.5)
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r_hat, r_hat) * 0.05
            tensors[f"base_model.model.{name}.lora_B.weight"] = tensors[f"base_model.model.{name}.lora_A.weight"]
    path.mkdir()
    config = {"peft_type": "LORA", "use_mora": True, "mora_type": 1, "r": 8, "target_modules": ["q_proj"],
              "modules_to_save": modules_to_save, "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.clone() for k, v in {**tensors, **extra}.items()}, str(path / "adapter_model.safetensors"))
    return tensors


def test_authors_files_load_their_modules_to_save_in_both_peft_layouts(tmp_path, token_ids):
    """PEFT saves ``modules_to_save`` as ``base_model.model.<module>.<param>``; the in-memory layout is
    ``<module>.modules_to_save.default.<param>``. Catches a loader that keeps only the matrices and silently drops
    a trained ``lm_head`` / embedding (the logits would be the base model's)."""
    base = _base()
    head = torch.randn_like(base.lm_head.weight)
    embed = torch.randn_like(base.model.embed_tokens.weight)
    extra = {"base_model.model.lm_head.weight": head,
             "base_model.model.model.embed_tokens.modules_to_save.default.weight": embed}
    _authors_file(tmp_path / "authors", base, extra, ["lm_head", "embed_tokens"])
    model = load_mora(_base(), tmp_path / "authors")
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, embed)
    assert model.lm_head.weight.requires_grad  # trainable, as modules_to_save


def test_authors_files_with_tensors_the_model_cannot_place_are_refused_by_name(tmp_path):
    """Catches tensors skipped without a word: every unplaceable key is named, and nothing is loaded."""
    base = _base()
    extra = {"base_model.model.score.modules_to_save.default.weight": torch.zeros(2, 48),
             "base_model.model.model.norm.bias": torch.zeros(48)}
    _authors_file(tmp_path / "authors", base, extra, ["score"])
    model = _base()
    apply_mora(model, MoRAConfig(r=8, mora_type=1, target_modules=["q_proj"]))
    with pytest.raises(AdapterLoadError, match=r"2 tensor\(s\) this model has no parameter for") as exc:
        load_mora(model, tmp_path / "authors")
    assert "model.norm.bias" in str(exc.value) and "score.modules_to_save.default.weight" in str(exc.value)
    assert all(float(layer.mora_M.detach().abs().max()) == 0 for _, layer in mora_layers(model))
