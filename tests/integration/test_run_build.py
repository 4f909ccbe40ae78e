"""Config -> runtime choices that a user would otherwise meet as a silent surprise: the Adam implementation on a
machine that cannot build DeepSpeed's fused op quickly, and adapters larger than the layers they adapt."""

from __future__ import annotations

import logging

import pytest
import torch

from mora_dist.run import deepspeed_engine, hf
from mora_dist.run.config import load_run_config
from tests.helpers.launch import TINY


@pytest.mark.skipif(torch.cuda.is_available(), reason="the automatic choice on a CPU machine")
def test_torch_adam_is_chosen_automatically_without_cuda_and_says_so(caplog):
    """Catches DeepSpeed silently JIT-compiling its C++ Adam (minutes) on CPU when torch_adam is unset, and an
    explicit setting being overridden."""
    cfg = load_run_config(TINY, ["optimizer.torch_adam=null"])
    with caplog.at_level(logging.INFO, logger="mora_dist.run.deepspeed_engine"):
        params = deepspeed_engine.deepspeed_config(cfg, 1)["optimizer"]["params"]
    assert params["torch_adam"] is True
    assert "torch_adam unset: using torch's AdamW (no CUDA" in caplog.text
    assert deepspeed_engine.resolve_torch_adam(False) is False and deepspeed_engine.resolve_torch_adam(True) is True


@pytest.mark.parametrize("r,warns", [(256, True), (16, False)], ids=["r256-outgrows", "r16-fits"])
def test_warning_when_adapters_outgrow_the_adapted_layers(caplog, r, warns):
    """Catches r = 256 on a small model passing silently (the adapters then train more than the layers hold)."""
    cfg = load_run_config(TINY, [f"mora.r={r}"])
    with caplog.at_level(logging.WARNING, logger="mora_dist.run.build"):
        hf.build_hf_model(cfg, 512, 0)
    assert ("more than the" in caplog.text) == warns, caplog.text
    if warns:
        assert "lower mora.r" in caplog.text
