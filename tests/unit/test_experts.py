"""MoRA on fused expert parameters (transformers 5 MoE models): exact against a float64 dense reference through
the model's own routing, targeting, merging, unloading, adapter files and bad input."""

import copy

import pytest
import torch
import transformers
from torch import nn

from mora_dist import (
    MoRAConfig,
    MoRAConfigError,
    NoMatchingModuleError,
    apply_mora,
    load_mora,
    merge_mora,
    mora_layers,
    save_mora,
    trainable_summary,
    unload,
)
from mora_dist.experts import MoRAExpertProjection, MoRAExpertsMixin
from mora_dist.layer import MoRALayerMixin
from tests.helpers.models import FUSED_EXPERTS, MOE_KINDS, TINY_VOCAB, tiny_moe
from tests.helpers.reference import dense_delta, r_hat_for

pytestmark = pytest.mark.skipif(not FUSED_EXPERTS, reason="transformers < 5 keeps experts as nn.Linear lists")
EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def _experts(model):
    return model.model.layers[0].mlp.experts


def _randomize(model, std=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in mora_layers(model):
            layer.mora_M.copy_(torch.randn(layer.mora_M.shape, generator=gen, dtype=torch.float64) * std)


def _dense_reference(base, adapted, mora_type):
    """``base`` with ``W_e + dW(M_e)`` built from the spec's 0/1 matrices, and the leaf ``M`` tensors it uses."""
    reference = copy.deepcopy(base)
    leaves = {}
    experts = _experts(reference)
    for name, layer in mora_layers(adapted):
        param = name.rpartition(".")[2]
        M = layer.mora_M.detach().clone().requires_grad_(True)
        leaves[param] = M
        W = getattr(experts, param)
        deltas = [dense_delta(M[e], layer.in_features, layer.out_features, mora_type) for e in range(M.shape[0])]
        delta = torch.stack([d.t() for d in deltas] if experts.is_transposed else deltas)
        delattr(experts, param)
        setattr(experts, param, W.detach() + delta)  # a plain tensor: differentiable in M
    return reference, leaves


@pytest.mark.parametrize("mora_type", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("kind", MOE_KINDS)
def test_every_expert_matches_the_dense_reference_through_the_models_routing(kind, mora_type):
    """Forward, input gradient and the gradient of every expert's M against x (W_e + dW_e)^T + b_e in float64."""
    base = tiny_moe(kind, dtype=torch.float64)
    model = apply_mora(copy.deepcopy(base), MoRAConfig(r=2, mora_type=mora_type, target_modules=None,
                                                       target_parameters=EXPERT_PARAMS, mora_dtype="float64"))
    _randomize(model)
    reference, leaves = _dense_reference(base, model, mora_type)
    gen = torch.Generator().manual_seed(2)
    embeds = torch.randn(3, 7, 40, generator=gen, dtype=torch.float64)
    probe = torch.randn(3, 7, TINY_VOCAB, generator=gen, dtype=torch.float64)
    x_ours, x_ref = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    out = model(inputs_embeds=x_ours).logits
    expected = reference(inputs_embeds=x_ref).logits
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert (out - base(inputs_embeds=embeds).logits).abs().max() > 1e-3  # the experts' adapters act
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=1e-12)
    for name, layer in mora_layers(model):
        grad = leaves[name.rpartition(".")[2]].grad
        assert grad.abs().amax(dim=(1, 2)).min() > 0  # every expert got tokens and a gradient
        torch.testing.assert_close(layer.mora_M.grad, grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_r_hat_follows_each_experts_shape_as_for_a_linear(kind):
    model = apply_mora(tiny_moe(kind), MoRAConfig(r=3, mora_type=6, target_modules="all-linear"))
    layers = dict(mora_layers(model))
    prefix = "model.layers.0.mlp.experts.mora."
    gate_up, down = layers[prefix + "gate_up_proj"], layers[prefix + "down_proj"]
    assert (gate_up.in_features, gate_up.out_features) == (40, 52)
    assert (down.in_features, down.out_features) == (26, 40)
    assert gate_up.mora_M.shape == (5, r_hat_for(40, 52, 3, 6), r_hat_for(40, 52, 3, 6))
    assert down.mora_M.shape == (5, r_hat_for(26, 40, 3, 6), r_hat_for(26, 40, 3, 6))


def test_a_token_routed_nowhere_gets_no_expert_output():
    """Slot ids >= E (dropped / capacity-limited slots) contribute nothing, as in transformers' loop."""
    model = apply_mora(tiny_moe("mixtral", dtype=torch.float64),
                       MoRAConfig(r=2, target_modules=["experts"], mora_dtype="float64"))
    _randomize(model)
    experts = _experts(model)
    x = torch.randn(4, 40, dtype=torch.float64)
    index = torch.tensor([[0, 5], [5, 5], [2, 1], [3, 0]])
    weights = torch.rand(4, 2, dtype=torch.float64)
    out = experts(x, index, weights)
    assert torch.equal(out[1], torch.zeros(40, dtype=torch.float64))
    alone = experts(x[:1], index[:1, :1], weights[:1, :1])
    torch.testing.assert_close(out[0], alone[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_all_linear_reaches_experts_and_shared_experts_never_the_router(kind):
    model = apply_mora(tiny_moe(kind), MoRAConfig(r=2, target_modules="all-linear"))
    names = {n for n, _ in mora_layers(model)}
    assert {"model.layers.0.mlp.experts.mora.gate_up_proj", "model.layers.0.mlp.experts.mora.down_proj"} <= names
    assert not any(n.rpartition(".")[2] in ("gate", "router", "shared_expert_gate") for n in names)
    mlp = model.model.layers[0].mlp
    router = getattr(mlp, "gate", None) or mlp.router
    assert not any(p.requires_grad for p in router.parameters())
    shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
    if shared is not None:
        assert {"gate_proj", "up_proj", "down_proj"} <= {n.rpartition(".")[2] for n in names if ".shared_expert" in n}
    experts = _experts(model)
    assert not any(p.requires_grad for n, p in experts.named_parameters() if ".mora." not in f".{n}")
    # trainable_summary counts E square matrices per projection
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(layer.mora_M.numel() for _, layer in mora_layers(model)) == trainable
    assert f"trainable params: {trainable:,d}" in trainable_summary(model)


@pytest.mark.parametrize("targets, expected", [
    (["experts"], {"gate_up_proj", "down_proj"}),
    (["experts.down_proj"], {"down_proj"}),
    (["mlp.*.gate_up_proj"], {"gate_up_proj"}),
    (r".*\.experts", {"gate_up_proj", "down_proj"}),
    (r".*\.experts\.gate_up_proj", {"gate_up_proj"}),
])
def test_expert_parameters_are_named_like_modules(targets, expected):
    model = apply_mora(tiny_moe("qwen3_moe"), MoRAConfig(r=2, target_modules=targets))
    assert {n.rpartition(".")[2] for n, _ in mora_layers(model)} == expected


def test_target_parameters_has_peft_meaning_and_adds_to_target_modules():
    model = apply_mora(tiny_moe("mixtral"), MoRAConfig(r=2, target_modules=["q_proj"],
                                                       target_parameters=["experts.down_proj"]))
    assert {n.rpartition(".")[2] for n, _ in mora_layers(model)} == {"q_proj", "down_proj"}


def test_router_is_adapted_only_when_named():
    model = apply_mora(tiny_moe("mixtral"),
                       MoRAConfig(r=2, target_modules="all-linear", exclude_modules=["*experts"]))
    assert {n.rpartition(".")[2] for n, _ in mora_layers(model)} == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize("config, match", [
    (dict(target_modules=None, target_parameters=["experts.up_proj"]),
     r"target_parameters entry 'experts.up_proj' matches no fused expert parameter; candidates look like "
     r"\['experts.down_proj', 'experts.gate_up_proj'\]"),
    (dict(target_modules=None, target_parameters=["q_proj.weight"]), r"name linear layers in target_modules"),
    (dict(target_modules=["experts.up_proj"]), r"target_modules entry 'experts.up_proj' matches no module"),
    (dict(r_hat=60, target_modules=["experts"]), r"model.layers.0.mlp.experts.(gate_up|down)_proj"),
])
def test_bad_targets_and_sizes_are_refused_before_any_change(config, match):
    model = tiny_moe("mixtral")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises((MoRAConfigError, NoMatchingModuleError), match=match):
        apply_mora(model, MoRAConfig(**{"r": 2, **config}))
    assert not any(isinstance(m, (MoRALayerMixin, MoRAExpertsMixin)) for m in model.modules())
    assert all(p.requires_grad and torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_experts_in_a_dtype_we_cannot_fold_into_are_refused_naming_the_parameter():
    model = tiny_moe("mixtral")
    experts = _experts(model)
    experts.down_proj = nn.Parameter(experts.down_proj.data.to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(MoRAConfigError, match=r"model\.layers\.0\.mlp\.experts\.down_proj has dtype "
                                              r"torch\.float8_e4m3fn, which a MoRA merge cannot fold into exactly"):
        apply_mora(model, MoRAConfig(r=2, target_modules="all-linear"))
    assert not any(isinstance(m, MoRALayerMixin) for m in model.modules())


class _CustomExperts(nn.Module):
    """An MoE block outside transformers' experts interface: 3-D weights, no has_gate/is_transposed flags."""

    def __init__(self):
        super().__init__()
        self.num_experts = 3
        self.w_in = nn.Parameter(torch.randn(3, 16, 8))
        self.w_out = nn.Parameter(torch.randn(3, 8, 16))


def test_an_unknown_experts_block_is_refused_with_class_and_path_never_skipped():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 8))
    model.add_module("moe", _CustomExperts())
    with pytest.raises(MoRAConfigError, match=r"moe \(_CustomExperts\) holds its experts as 3-D parameters "
                                              r"\(w_in \(3, 16, 8\), w_out \(3, 8, 16\)\)"
                                              r".*exclude_modules=\['\*moe'\]"):
        apply_mora(model, MoRAConfig(r=2, target_modules="all-linear"))
    apply_mora(model, MoRAConfig(r=2, target_modules="all-linear", exclude_modules=["*moe"]))
    assert [n for n, _ in mora_layers(model)] == ["proj"]


@pytest.mark.parametrize("kind", ["qwen2_moe", "gpt_oss"])
def test_merge_and_unload_give_a_plain_transformers_checkpoint_with_equal_logits(kind, tmp_path):
    model = apply_mora(tiny_moe(kind), MoRAConfig(r=2, mora_type=1, target_modules="all-linear"))
    _randomize(model)
    ids = torch.randint(0, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    trained = model(ids).logits
    plain = unload(model)
    experts = _experts(plain)
    assert type(experts) is type(_experts(tiny_moe(kind))) and not hasattr(experts, "mora")
    torch.testing.assert_close(plain(ids).logits, trained, rtol=0, atol=1e-5)
    plain.save_pretrained(tmp_path / "merged", safe_serialization=True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    reloaded.config._experts_implementation = "eager"
    torch.testing.assert_close(reloaded.eval()(ids).logits, trained, rtol=0, atol=1e-5)


def test_merge_into_bf16_experts_is_compensated_per_expert():
    """Ten small merges into bf16 experts accumulate as in fp32 (the residual buffer has the (E, d, k) shape)."""
    model = apply_mora(tiny_moe("mixtral", dtype=torch.bfloat16), MoRAConfig(r=2, mora_type=1,
                                                                             target_parameters=EXPERT_PARAMS))
    experts = _experts(model)
    start = experts.gate_up_proj.detach().double().clone()
    layer = experts.mora["gate_up_proj"]
    total = torch.zeros_like(start)
    gen = torch.Generator().manual_seed(4)
    for _ in range(10):
        with torch.no_grad():
            layer.mora_M.copy_(torch.randn(layer.mora_M.shape, generator=gen) * 1e-4)
        total += layer.delta_weight().double()
        merge_mora(model)
        assert not layer.mora_M.any()
    held = experts.gate_up_proj.double() + layer.mora_base_residual.double()
    assert layer.mora_base_residual.shape == experts.gate_up_proj.shape
    # the residual keeps 8 bits of what bf16 rounds away: |error| ~ 2^-9 bf16 steps of |W| ~ 0.3
    torch.testing.assert_close(held, start + total, rtol=0, atol=1e-5)
    assert (experts.gate_up_proj.double() - (start + total)).abs().max() > 1e-4  # bf16 alone could not hold it


def test_each_expert_merges_its_own_matrix():
    """Catches a merge that folds one expert's dW into another (or all of them into expert 0)."""
    model = apply_mora(tiny_moe("gpt_oss", dtype=torch.float64), MoRAConfig(
        r=2, mora_type=2, target_parameters=["experts.down_proj"], mora_dtype="float64"))
    layer = _experts(model).mora["down_proj"]
    before = _experts(model).down_proj.detach().clone()
    with torch.no_grad():
        layer.mora_M[3].normal_()
    M3 = layer.mora_M[3].clone()
    merge_mora(model)
    change = _experts(model).down_proj.detach() - before
    assert torch.equal(change[[0, 1, 2, 4]], torch.zeros(4, 26, 40, dtype=torch.float64))
    # gpt-oss stores down_proj transposed, (E, k, d): expert 3's slice gained dW^T
    torch.testing.assert_close(change[3], dense_delta(M3, 26, 40, 2).t(), rtol=0, atol=1e-12)


def test_adapter_files_round_trip_the_expert_matrices(tmp_path):
    model = apply_mora(tiny_moe("olmoe"), MoRAConfig(r=2, target_modules="all-linear"))
    _randomize(model)
    save_mora(model, tmp_path / "adapter")
    fresh = load_mora(tiny_moe("olmoe"), tmp_path / "adapter")
    ids = torch.randint(0, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    for (name, ours), (_, theirs) in zip(mora_layers(model), mora_layers(fresh)):
        assert isinstance(ours, MoRALayerMixin) and torch.equal(ours.mora_M, theirs.mora_M), name
    assert any(isinstance(layer, MoRAExpertProjection) for _, layer in mora_layers(fresh))


def test_the_authors_format_refuses_experts_before_writing(tmp_path):
    """The MoRA authors' fork has no fused-expert layers: writing one would drop the experts' adapters."""
    from mora_dist.adapters.authors import save_mora_authors

    model = apply_mora(tiny_moe("mixtral"), MoRAConfig(r=2, mora_type=1, target_modules="all-linear"))
    with pytest.raises(MoRAConfigError, match=r"mora-authors export: model\.layers\.0\.mlp\.experts\.mora\."
                                              r"gate_up_proj \(and 1 more\) adapt fused expert parameters"):
        save_mora_authors(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_lora_baseline_refuses_fused_experts_it_would_skip():
    """Catches a ReLoRA/LoRA baseline on an MoE that trains attention only (its LoRA adapts nn.Linear only)."""
    from mora_dist.lora import apply_lora, lora_layers

    model = tiny_moe("mixtral")
    with pytest.raises(MoRAConfigError, match=r"model\.layers\.0\.mlp\.experts \(MixtralExperts\) holds its experts "
                                              r"as 3-D parameters \(gate_up_proj \(5, 52, 40\), down_proj "
                                              r"\(5, 40, 26\)\) but the LoRA baseline adapts nn.Linear layers only"):
        apply_lora(model, "all-linear", r=2)
    assert not any(True for _ in lora_layers(model))
    apply_lora(model, "all-linear", r=2, exclude_modules=["*experts"])
    assert {n.rpartition(".")[2] for n, _ in lora_layers(model)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
