"""The memory plan's placement rules and its bad-input errors (the bytes themselves are checked against real
engines in tests/integration/test_run_plan.py)."""

from __future__ import annotations

import pytest

from mora_dist.run.config import RunConfigError, load_run_config
from mora_dist.run.plan import GIB, inventory, parse_memory, plan_hf, vocab_size_for

TINY = "configs/remora_tiny.json"


def _cfg(*overrides):
    return load_run_config(TINY, ["model.vocab_size=1000", "training.global_batch_size=64", *overrides])


@pytest.fixture(scope="module")
def bf16_inventory():
    return inventory(_cfg("model.dtype=bfloat16"), 1000)


def test_zero_3_partitions_every_weight_and_zero_2_only_the_optimizer(bf16_inventory):
    inv = bf16_inventory
    plans = {(stage, n): plan_hf(_cfg("model.dtype=bfloat16", f"deepspeed.zero_optimization.stage={stage}"), n,
                                 inv=inv).memory for stage in (2, 3) for n in (1, 4)}
    for row in ("base weights", "MoRA matrices", "other trainable"):
        assert plans[2, 4][row] == plans[2, 1][row] > 0
        assert plans[3, 4][row] == pytest.approx(plans[3, 1][row] / 4, rel=0.01)
    for stage in (2, 3):
        for row in ("optimizer states", "compensation buffers", "gradients"):
            assert plans[stage, 4][row] == pytest.approx(plans[stage, 1][row] / 4, rel=0.01), (stage, row)
        assert plans[stage, 4]["activations"] == plans[stage, 1]["activations"] > 0
    # fp32 masters + two moments: 12 bytes per trainable element, as a whole at DP 1
    assert plans[2, 1]["optimizer states"] == 12 * inv.trainable_numel


def test_an_fp32_base_needs_no_compensation_and_no_fp32_master():
    plan = plan_hf(_cfg(), 2).memory
    assert plan["compensation buffers"] == 0
    assert plan["optimizer states"] == 8 * inventory(_cfg(), 1000).trainable_numel / 2


def test_activations_grow_with_the_micro_batch(bf16_inventory):
    doubled = inventory(_cfg("model.dtype=bfloat16", "training.micro_batch_size=16"), 1000)
    assert doubled.activations == pytest.approx(2 * bf16_inventory.activations, rel=0.02)


def test_gradient_checkpointing_is_refused_by_name():
    with pytest.raises(RunConfigError, match="model.gradient_checkpointing=true"):
        inventory(_cfg("model.gradient_checkpointing=true"), 1000)


def test_the_plan_says_whether_it_fits(bf16_inventory):
    plan = plan_hf(_cfg("model.dtype=bfloat16"), 2, nodes=2, inv=bf16_inventory)
    assert plan.fits(80 * GIB) and not plan.fits(plan.total)
    text = plan.render(80 * GIB)
    assert "world size 2 on 2 node(s)" in text and "fits in 80.0 GiB" in text and "ZeRO-2" in text
    assert "does NOT fit" in plan.render(plan.total)


@pytest.mark.parametrize("text, gib", [("80", 80), ("80GiB", 80), ("141 GB", 141), ("0.5", 0.5)])
def test_gpu_memory_reads_gib(text, gib):
    assert parse_memory(text) == int(gib * GIB)


@pytest.mark.parametrize("text", ["eighty", "-1", "0"])
def test_a_bad_gpu_memory_names_the_flag(text):
    with pytest.raises(RunConfigError, match="--gpu-memory"):
        parse_memory(text)


def test_bad_layouts_and_back_ends_are_refused_by_name(bf16_inventory):
    with pytest.raises(RunConfigError, match="--nodes 3 does not divide --world-size 4"):
        plan_hf(_cfg(), 4, nodes=3, inv=bf16_inventory)
    megatron = load_run_config("configs/remora_tiny_megatron_tp2.json", ["model.vocab_size=1000"])
    with pytest.raises(RunConfigError, match="model.backend='megatron' is not planned"):
        plan_hf(megatron, 2)


def test_a_hub_tokenizer_needs_the_vocabulary_size_given():
    cfg = load_run_config("configs/remora_250m.json")
    with pytest.raises(RunConfigError, match="--set model.vocab_size="):
        vocab_size_for(cfg)
    assert vocab_size_for(load_run_config("configs/remora_250m.json", ["model.vocab_size=32100"])) == 32100
