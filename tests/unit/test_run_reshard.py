"""Resume at another data-parallel size: what is refused before any process group, and how the saved size is
read. The end-to-end DP=2 -> 1 -> 2 resume runs in ``test_launch_pretrain.py`` (it reuses that module's run)."""

from __future__ import annotations

import pytest

from mora_dist.run import reshard
from mora_dist.run.checkpoint import read_state_dict
from mora_dist.run.config import RunConfigError, load_run_config
from mora_dist.run.reshard import check_resume_dp, saved_dp_size

TINY = "configs/remora_tiny.json"


def _checkpoint(tmp_path, ranks: int, stage_files: str = "zero_pp_rank_{r}_mp_rank_00_optim_states.pt"):
    tag = tmp_path / "checkpoints" / "step_0000010"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    for r in range(ranks):
        (tag / stage_files.format(r=r)).write_bytes(b"")
    (tmp_path / "checkpoints" / "latest").write_text("step_0000010")
    return tmp_path / "checkpoints"


def test_saved_size_is_the_zero_shard_count(tmp_path):
    ckpt = _checkpoint(tmp_path, 4)
    assert saved_dp_size(ckpt / "step_0000010") == 4
    (ckpt / "step_0000010" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert saved_dp_size(ckpt / "step_0000010") == 4


@pytest.mark.parametrize("config, sets, message", [
    (TINY, ["data.streaming=true"], "data.streaming=true (sources ['plays', 'poems']): each rank's position"),
    (TINY, ['deepspeed={"zero_optimization": {"stage": 3}}'], "stage=3: resuming at another data-parallel size"),
    ("configs/remora_tiny_megatron_tp2.json", [], "backend 'hf' only"),
], ids=["streaming", "zero3", "megatron"])
def test_unsupported_dp_changes_are_refused_naming_the_reason_and_the_fix(tmp_path, config, sets, message):
    ckpt = _checkpoint(tmp_path, 2)
    cfg = load_run_config(config, [*sets, f"training.output_dir={tmp_path}"])
    with pytest.raises(RunConfigError, match="written at data-parallel size 2, this launch has 1") as info:
        check_resume_dp(cfg, ckpt, 1)
    assert message in str(info.value) and "relaunch with 2 data-parallel ranks" in str(info.value)


def test_same_size_or_no_zero_shards_needs_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(reshard, "_deepspeed_version", lambda: reshard.UNIVERSAL_MIN_DEEPSPEED)
    cfg = load_run_config(TINY, [f"training.output_dir={tmp_path}", "data.streaming=true"])
    assert not check_resume_dp(cfg, _checkpoint(tmp_path / "a", 2), 2)
    assert not check_resume_dp(cfg, _checkpoint(tmp_path / "b", 0), 4)  # ZeRO-0: optimizer not partitioned
    tiny = load_run_config(TINY, [f"training.output_dir={tmp_path}"])
    assert check_resume_dp(tiny, tmp_path / "a" / "checkpoints", 1)  # ZeRO-2, map-style, hf: converted


def test_a_deepspeed_older_than_the_tested_universal_resume_is_refused(tmp_path, monkeypatch):
    """DeepSpeed 0.16.0's universal checkpoint resumed on another loss curve: refused, not trained silently."""
    monkeypatch.setattr(reshard, "_deepspeed_version", lambda: (0, 16))
    cfg = load_run_config(TINY, [f"training.output_dir={tmp_path}"])
    with pytest.raises(RunConfigError, match=r"deepspeed 0\.16: resuming at another data-parallel size.*>= 0\.19"):
        check_resume_dp(cfg, _checkpoint(tmp_path, 2), 1)


def test_a_state_dict_with_nan_is_refused_naming_the_tensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    weights = {"a.weight": torch.ones(2), "b.weight": torch.tensor([1.0, float("nan")])}
    save_file(weights, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"1 tensor\(s\) hold NaN or inf values, e.g. \['b.weight'\]"):
        read_state_dict(tmp_path)
