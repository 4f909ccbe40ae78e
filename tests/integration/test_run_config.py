"""Run config: every bad value is reported with its key, value and fix, before any process group or output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mora_dist.run.config import (
    RunConfigError,
    apply_overrides,
    check_world,
    load_run_config,
    validate_run_config,
)

TINY = "configs/remora_tiny.json"


def _raw(**edits):
    raw = json.loads(Path(TINY).read_text())
    return apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in edits.items()])


def _error(raw) -> str:
    with pytest.raises(RunConfigError) as info:
        validate_run_config(raw)
    return str(info.value)


def test_set_overrides_nested_keys_list_items_and_json_values():
    cfg = load_run_config(TINY, ["training.max_steps=80", "data.sources.1.weight=0.5", "remora.mora_types=[1,2]",
                                 "logging.level=DEBUG"])
    assert cfg.training.max_steps == 80 and cfg.data.sources[1].weight == 0.5 and cfg.logging.level == "DEBUG"
    with pytest.raises(RunConfigError, match="section.key=value"):
        apply_overrides({}, ["training.max_steps"])
    with pytest.raises(RunConfigError, match="not an index"):
        apply_overrides({"a": [1]}, ["a.3=1"])


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        ({"training.max_step": 3}, ["training.max_step: unknown key", "did you mean 'training.max_steps'"]),
        ({"mora.rank": 8}, ["mora.rank: unknown key", "'r_hat'"]),
        ({"training.max_steps": "20x"}, ["training.max_steps", "'20x'"]),
        ({"optimizer.lr": -1.0}, ["optimizer.lr", "-1.0"]),
        ({"mora.mora_type": "banana"}, ["mora_type='banana'", "rope"]),
        ({"data.sources.0.path": "/no/such/corpus"}, ["data.sources[0].path='/no/such/corpus' does not exist"]),
        ({"data.tokenizer": "/no/tok.json", "data.tokenizer_vocab_size": None}, ["data.tokenizer='/no/tok.json'"]),
        ({"training.global_batch_size": 20}, ["global_batch_size=20 is not a multiple of", "micro_batch_size=8"]),
        ({"remora.mora_types": [2, 1]}, ["mora.mora_type=1", "starts with 2"]),
        ({"training.max_steps": 150}, ["max_steps=150 is not a multiple of remora.merge_every=40", "use 160"]),
        ({"deepspeed": {"train_batch_size": 64}}, ["deepspeed.train_batch_size=64", "remove it"]),
        ({"model.pretrained": "/no/ckpt"}, ["model.pretrained='/no/ckpt' does not exist"]),
        ({"lora": {"r": 8, "target_modules": "all-linear"}}, ["mora and lora are both set"]),
        ({"model.backend": "megatron"}, ["tensor_parallel_sharding='replicate'"]),
        ({"mora.tensor_parallel_grad_sync": "step"},
         ["mora.tensor_parallel_grad_sync='step' is not performed by the DeepSpeed training loop", "'backward'"]),
        ({"training.exit_signals": ["SIGKILL"]}, ["training.exit_signals", "'SIGKILL'", "SIGUSR1"]),
    ],
    ids=["unknown-key", "unknown-mora-key", "wrong-type", "out-of-range", "bad-mora-type", "missing-corpus",
         "missing-tokenizer", "batch-not-multiple", "type-cycle-mismatch", "cycle-misaligned", "ds-batch-key",
         "missing-checkpoint", "mora-and-lora", "megatron-type-cycle-sharding", "step-sync-under-deepspeed",
         "uncatchable-exit-signal"],
)
def test_bad_config_message_names_key_value_and_fix(edits, expected):
    message = _error(_raw(**edits))
    for text in expected:
        assert text in message, message


def test_world_size_rules():
    cfg = validate_run_config(_raw())
    assert check_world(cfg, 2) == 1 and check_world(cfg, 1) == 2
    with pytest.raises(RunConfigError, match=r"not divisible by micro_batch_size 8 x data-parallel size 3 = 24"):
        check_world(cfg, 3)
    tp = validate_run_config(_raw(**{"model.backend": "megatron", "model.tensor_model_parallel_size": 2,
                                      "mora.tensor_parallel_sharding": "replicate"}))
    assert check_world(tp, 4) == 1
    with pytest.raises(RunConfigError, match="tensor_model_parallel_size=2 does not divide the world size 3"):
        check_world(tp, 3)
    with pytest.raises(RunConfigError, match="needs model.backend='megatron'"):
        check_world(validate_run_config(_raw(**{"model.tensor_model_parallel_size": 2})), 2)
    with pytest.raises(RunConfigError, match="gradient_accumulation_steps 3"):
        check_world(validate_run_config(_raw(**{"training.gradient_accumulation_steps": 3})), 2)


def test_cli_reports_bad_configs_before_any_output(tmp_path):
    """Catches a launcher that creates the output folder (or a partial checkpoint) before validating."""
    out = tmp_path / "run"
    env = {**os.environ, "WORLD_SIZE": "3"}
    cases = [
        (["--set", "training.max_step=3"], "did you mean 'training.max_steps'"),
        ([], "not divisible by micro_batch_size 8 x data-parallel size 3"),
    ]
    for extra, message in cases:
        proc = subprocess.run([sys.executable, "launch/pretrain.py", "--config", TINY, "--set",
                               f"training.output_dir={out}", *extra], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not out.exists()
    empty = subprocess.run([sys.executable, "launch/pretrain.py", "--config", TINY, "--resume", "--set",
                            f"training.output_dir={out}"], capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and f"{out / 'checkpoints'} holds no complete checkpoint" in empty.stderr
    assert not out.exists()  # --resume with nothing to resume stops instead of starting over
    ok = subprocess.run([sys.executable, "launch/pretrain.py", "--config", TINY, "--check", "--world-size", "2",
                         "--set", f"training.output_dir={out}"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "method=remora" in ok.stdout and not out.exists()
    assert "memory plan per rank: world size 2" in ok.stdout and "optimizer states" in ok.stdout
    small = subprocess.run([sys.executable, "launch/pretrain.py", "--config", TINY, "--check", "--world-size", "2",
                            "--gpu-memory", "0.01", "--set", f"training.output_dir={out}"], capture_output=True,
                           text=True, timeout=120)
    assert small.returncode == 3 and "does NOT fit in 0.0 GiB" in small.stdout, small.stdout + small.stderr
    stray = subprocess.run([sys.executable, "launch/pretrain.py", "--config", TINY, "--nodes", "2"],
                           capture_output=True, text=True, timeout=120)
    assert stray.returncode == 2 and "use them with --check" in stray.stderr
