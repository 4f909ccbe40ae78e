"""The PEFT LoRA terms of megatron-core experts (``mora_dist/run/megatron/export.py``): per-expert linears stacked
into the fused Hugging Face expert parameters. Spec: §2.5, §4."""

from __future__ import annotations

import pytest
import torch

from mora_dist.errors import MoRAConfigError
from mora_dist.run.megatron.export import _fused_expert_terms


def _terms(experts, cycles: int = 2):
    g = torch.Generator().manual_seed(0)
    return {f"decoder.layers.1.mlp.experts.local_experts.{e}.{fc}": [
        (torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g)) for _ in range(cycles)]
        for e in experts for fc in ("linear_fc1", "linear_fc2")}


def test_expert_terms_stack_in_expert_order_per_cycle():
    terms = _terms([2, 0, 1])  # any dict order
    fused = _fused_expert_terms(terms, 3)
    assert sorted(fused) == [f"model.layers.1.mlp.experts.mora.{p}" for p in ("down_proj", "gate_up_proj")]
    factors = fused["model.layers.1.mlp.experts.mora.gate_up_proj"]
    assert len(factors) == 2
    for c, (A, B) in enumerate(factors):
        assert A.shape == (3, 3, 5) and B.shape == (3, 7, 3)
        for e in range(3):
            a, b = terms[f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1"][c]
            assert torch.equal(A[e], a) and torch.equal(B[e], b)


def test_some_experts_unadapted_is_refused():
    with pytest.raises(MoRAConfigError, match=r"only experts \[0, 2\] of model.layers.1.mlp.experts.gate_up_proj"):
        _fused_expert_terms(_terms([0, 2]), 3)
