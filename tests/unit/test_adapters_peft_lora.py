"""Serving exports against the real ``peft`` package: a PEFT LoRA that reproduces a MoRA model, a ReMoRA/ReLoRA
run as one LoRA over its starting weights, the MoRA authors' layout, and type 6 refused (spec §2.5)."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from mora_dist import MoRAConfig, MoRAConfigError, apply_mora, load_mora, merge_mora, mora_layers, save_mora, unload
from mora_dist.adapters.peft_lora import save_peft_lora
from mora_dist.experts import MoRAExpertProjection
from mora_dist.lora import apply_lora, lora_layers
from mora_dist.training.callbacks import TrainerEngineView
from mora_dist.training.remora import ReLoRACallback, ReMoRACallback
from tests.helpers.models import FUSED_EXPERTS, MOE_KINDS, TINY_MODELS, TINY_VOCAB, tiny_llama, tiny_moe

ATOL = 1e-5


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise(model, std=0.05):
    for _, layer in mora_layers(model):
        with torch.no_grad():
            layer.mora_M.normal_(0, std)


def _assert_merges_agree(served, model):
    """PEFT's merge_and_unload of ``served`` equals our merge of ``model``, tensor by tensor (1e-6)."""
    merged = served.merge_and_unload()
    merge_mora(model)
    ours = unload(model, merge=False).state_dict()
    assert sorted(ours) == sorted(merged.state_dict())
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, ours[name], atol=1e-6, rtol=0, msg=name)


def _adapted(arch, mora_type, **config):
    """``(base, model)``: identical base weights; the model with MoRA and a random M."""
    torch.manual_seed(3)
    base = TINY_MODELS[arch]()
    model = apply_mora(copy.deepcopy(base), MoRAConfig(target_modules="all-linear", mora_type=mora_type, **config))
    _randomise(model)
    return base, model


@pytest.mark.parametrize("mora_type", [1, 2, 3, 4])
@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_peft_lora_reproduces_the_mora_model_and_its_merge(tmp_path, token_ids, arch, mora_type):
    """Catches a wrong compressor/decompressor matrix (wrap padding, uneven groups, r_hat > d), a padded rank
    that is not zero, a scaling other than 1, and PEFT key names a server would not find. r=16 on these widths
    gives r_hat > d (Llama/Qwen2 k_proj, written dense) and wrap-padded inputs (k not a multiple of r_hat)."""
    base, model = _adapted(arch, mora_type, r=16)
    shapes = {(layer.in_features, layer.out_features, layer.r_hat) for _, layer in mora_layers(model)}
    assert any(k % r_hat for k, _, r_hat in shapes)  # wrap-padded / uneven inputs
    save_mora(model, tmp_path / "lora", format="peft-lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"]
    assert config["r"] == max(min(r_hat, k, d) for k, d, r_hat in shapes)

    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(_logits(served, token_ids), _logits(model, token_ids), atol=ATOL, rtol=0)

    _assert_merges_agree(served, model)


def test_peft_lora_sizes_and_modules_to_save(tmp_path, token_ids):
    """Catches modules_to_save missing from the PEFT file (the served model would keep the old lm_head) and a
    size report that does not match what was written."""
    base, model = _adapted("llama", 1, r=4, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    report = save_peft_lora(model, tmp_path / "lora")
    save_mora(model, tmp_path / "mora")
    state = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert report["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    mora_state = load_file(tmp_path / "mora" / "adapter_model.safetensors")
    assert report["mora_bytes"] == sum(t.numel() * t.element_size() for t in mora_state.values())
    assert report["bytes"] > report["mora_bytes"]  # r_hat (k + d) > r_hat^2: the price of a plain LoRA
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(_logits(served, token_ids), _logits(model, token_ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fmt", ["peft-lora"])
def test_type6_is_refused_and_nothing_is_written(tmp_path, fmt):
    _, model = _adapted("llama", 6, r=4)
    with pytest.raises(MoRAConfigError, match=r"mora_type=6.*merged model"):
        save_mora(model, tmp_path / "out", format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_names_the_choices(tmp_path):
    _, model = _adapted("llama", 1, r=4)
    with pytest.raises(MoRAConfigError, match="format='lora'.*peft-lora"):
        save_mora(model, tmp_path / "out", format="lora")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_authors_format_round_trips_through_load_mora(tmp_path, token_ids, mora_type):
    """Catches a matrix under only one of the authors' two key names, a missing use_mora/mora_type, an r the
    authors' fork would turn into another r_hat, or a trained lm_head left out."""
    base, model = _adapted("llama", mora_type, r=4, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    save_mora(model, tmp_path / "authors", format="mora-authors")
    config = json.loads((tmp_path / "authors" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "use_mora", "mora_type", "r")} == {
        "peft_type": "LORA", "use_mora": True, "mora_type": mora_type, "r": 4}
    state = load_file(tmp_path / "authors" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj"
    torch.testing.assert_close(state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"], atol=0, rtol=0)
    loaded = load_mora(copy.deepcopy(base), tmp_path / "authors")
    torch.testing.assert_close(_logits(loaded, token_ids), _logits(model, token_ids), atol=0, rtol=0)


def test_mora_authors_refuses_an_explicit_r_hat(tmp_path):
    _, model = _adapted("llama", 1, r_hat=10)
    with pytest.raises(MoRAConfigError, match="r_hat=10.*recomputes"):
        save_mora(model, tmp_path / "authors", format="mora-authors")
    assert list(tmp_path.iterdir()) == []


def _train(model, callback, steps, ids):
    """Plain torch AdamW steps with ``callback.on_step_end`` after each, as a training loop calls it."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.02)
    engine = TrainerEngineView(model, optimizer, None, 0)
    callback.on_train_begin(engine)
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.global_steps = step
        callback.on_step_end(engine)
    return callback


def test_remora_run_exports_as_one_lora_over_the_starting_weights(tmp_path, token_ids):
    """A 3-cycle ReMoRA run (types 1 -> 2 -> 1, then a live type-2 adapter) as one PEFT LoRA on the starting
    weights. Catches a cycle that is not kept (or kept after its M was zeroed), the wrong type for a cycle, and
    kept cycles lost in a save/load of the callback state."""
    torch.manual_seed(5)
    start = tiny_llama()
    model = apply_mora(copy.deepcopy(start), MoRAConfig(r=2, mora_type=1, target_modules="all-linear",
                                                        modules_to_save=["lm_head"]))
    cb = _train(model, ReMoRACallback(merge_every=2, type_cycle=(1, 2), restart_warmup=0), 7, token_ids)
    assert [c["mora_type"] for c in cb.cycles] == [1, 2, 1] and [c["step"] for c in cb.cycles] == [2, 4, 6]
    resumed = ReMoRACallback(merge_every=2, type_cycle=(1, 2), restart_warmup=0)
    resumed.load_state_dict(cb.state_dict())
    report = save_peft_lora(model, tmp_path / "run", cycles=resumed.cycles)
    assert report["rank"] == max(min(4 * layer.r_hat, layer.in_features, layer.out_features)
                                 for _, layer in mora_layers(model))
    served = peft.PeftModel.from_pretrained(copy.deepcopy(start), str(tmp_path / "run")).eval()
    torch.testing.assert_close(_logits(served, token_ids), _logits(model, token_ids), atol=ATOL, rtol=0)
    # Without the cycles the adapter only reproduces the live cycle on the *merged* base.
    save_peft_lora(model, tmp_path / "live")
    live = peft.PeftModel.from_pretrained(copy.deepcopy(start), str(tmp_path / "live")).eval()
    assert (_logits(live, token_ids) - _logits(model, token_ids)).abs().max() > 1e-3


def test_since_start_refuses_a_type6_cycle(tmp_path, token_ids):
    model = apply_mora(tiny_llama(), MoRAConfig(r=2, mora_type=6, target_modules=["q_proj"]))
    cb = _train(model, ReMoRACallback(merge_every=2, type_cycle=(6, 1), restart_warmup=0), 2, token_ids)
    with pytest.raises(MoRAConfigError, match="mora_type=6.*step 2"):
        save_peft_lora(model, tmp_path / "out", cycles=cb.cycles)
    assert list(tmp_path.iterdir()) == []


def test_relora_run_exports_as_one_lora_over_the_starting_weights(tmp_path, token_ids):
    """Catches ReLoRA cycles kept without their scaling (alpha / r != 1 here) or after A was re-drawn."""
    torch.manual_seed(6)
    start = tiny_llama()
    model = apply_lora(copy.deepcopy(start), ["q_proj", "down_proj"], r=3, lora_alpha=6)
    cb = _train(model, ReLoRACallback(merge_every=2, restart_warmup=0), 5, token_ids)
    assert [c["step"] for c in cb.cycles] == [2, 4] and cb.cycles[0]["scaling"] == 2.0
    report = save_peft_lora(model, tmp_path / "run", cycles=cb.cycles)
    assert report["rank"] == 9 and report["mora_bytes"] is None
    assert len(dict(lora_layers(model))) == 4
    served = peft.PeftModel.from_pretrained(copy.deepcopy(start), str(tmp_path / "run")).eval()
    torch.testing.assert_close(_logits(served, token_ids), _logits(model, token_ids), atol=ATOL, rtol=0)


def _max_diff(served, model, ids):
    return (_logits(served, ids) - _logits(model, ids)).abs().max().item()


@pytest.mark.skipif(not FUSED_EXPERTS, reason="transformers < 5 keeps experts as nn.Linear lists")
@pytest.mark.parametrize("mora_type", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", MOE_KINDS)
def test_peft_lora_reproduces_expert_adapters_as_target_parameters(tmp_path, kind, mora_type):
    """Every fused expert parameter as a PEFT ``target_parameters`` LoRA that the real ``PeftModel`` loads:
    catches experts' rows and columns in the wrong order (PEFT reads ``lora_A`` as (E, r, k) and ``lora_B`` as
    (d, r, E)), a transposed layout (gpt-oss) written like the others, nested wrappers keyed in the wrong order,
    a dropout PEFT refuses, and a dense-written projection (r_hat > k here for down_proj) in the wrong layout."""
    torch.manual_seed(7)
    base = tiny_moe(kind)
    model = apply_mora(copy.deepcopy(base), MoRAConfig(r=16, mora_type=mora_type, target_modules="all-linear",
                                                       dropout=0.1)).eval()
    _randomise(model)
    experts = {name for name, layer in mora_layers(model) if isinstance(layer, MoRAExpertProjection)}
    assert experts
    report = save_mora(model, tmp_path / "lora", format="peft-lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) >= {name.replace(".mora.", ".") for name in experts}
    assert config["lora_dropout"] == 0.0 and config["r"] == report["rank"]
    assert any(name.endswith("down_proj") for name in report["dense_modules"] if name in experts)

    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).eval()
    ids = torch.randint(0, TINY_VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    assert _max_diff(served, model, ids) <= ATOL

    _assert_merges_agree(served, model)


@pytest.mark.skipif(not FUSED_EXPERTS, reason="transformers < 5 keeps experts as nn.Linear lists")
def test_remora_run_on_experts_exports_as_one_lora_over_the_starting_weights(tmp_path):
    """Catches expert cycles kept as one (r_hat, r_hat) matrix instead of E, or factored with another expert's
    matrix: three merged cycles (types 1 -> 2 -> 1) plus the live adapter, served by PEFT on the starting model."""
    torch.manual_seed(8)
    start = tiny_moe("qwen3_moe")
    model = apply_mora(copy.deepcopy(start), MoRAConfig(r=2, mora_type=1, target_modules="all-linear"))
    ids = torch.randint(0, TINY_VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    cb = _train(model, ReMoRACallback(merge_every=2, type_cycle=(1, 2), restart_warmup=0), 7, ids)
    assert [c["mora_type"] for c in cb.cycles] == [1, 2, 1]
    save_peft_lora(model, tmp_path / "run", cycles=cb.cycles)
    served = peft.PeftModel.from_pretrained(copy.deepcopy(start), str(tmp_path / "run")).eval()
    assert _max_diff(served, model.eval(), ids) <= ATOL
