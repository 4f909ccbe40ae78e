"""The LoRA baseline: dense equivalence, zero start, merge with re-initialisation. Spec §3.1."""

import torch
from torch import nn

from mora_dist.lora import LoRALinear, apply_lora, lora_layers, lora_rank_for_budget
from tests.helpers.models import tiny_llama


def test_forward_is_linear_with_scaled_BA():
    layer = LoRALinear(nn.Linear(30, 20, dtype=torch.float64), r=4, lora_alpha=8, lora_dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 30, dtype=torch.float64)
    dW = 2.0 * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ dW.T, rtol=0, atol=1e-12)
    before = layer(x)
    old_A = layer.lora_A.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)
    assert torch.count_nonzero(layer.lora_B) == 0 and not torch.equal(layer.lora_A, old_A)


def test_apply_lora_freezes_base_and_starts_equal():
    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 7))
    before = model(ids).logits
    apply_lora(model, ["q_proj", "v_proj"], r=2)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert len(list(lora_layers(model))) == 4
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_equal_budget_rank():
    assert lora_rank_for_budget(2048, 2048, 181) == 8
