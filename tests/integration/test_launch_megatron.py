"""The megatron-core backend at TP = 2 on CPU (2 ranks, gloo) runs the tiny ReMoRA job through the ``deepspeed``
launcher, and its export (TP shards gathered to the Hugging Face Llama layout) computes the training model's
function."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

from tests.helpers.launch import env, held_out_losses, run, scalars

CONFIG = "configs/remora_tiny_megatron_tp2.json"
SETS = ["training.max_steps=40", "remora.merge_every=20", "training.eval_interval=10", "training.save_interval=10",
        "training.keep_last=10", "scheduler.warmup_steps=10"]


def test_megatron_tp2_tiny_run_and_export_match(tmp_path):
    """The exported Hugging Face model's held-out loss equals the loss the TP = 2 engine logged at the same step
    (step 30: one merge done, type switched to 2, M non-zero). Catches a wrong shard order when gathering
    (fused qkv per query group, gated fc1 [gate; up] with partition stride 2, row-parallel columns, vocab-split
    embedding and head), a wrong q/k/v or gate/up split, a dropped dW, and a wrong MoRA type after a merge."""
    out = tmp_path / "run"
    run(2, CONFIG, [*SETS, f"training.output_dir={out}"])
    s = scalars(out)
    assert sorted(s["remora/merges"].items()) == [(20, 1.0), (40, 2.0)]
    assert s["eval/loss"][40] < s["eval/loss"][0] - 1.0
    proc = subprocess.run([sys.executable, "launch/export.py", "--run", str(out), "--out", str(tmp_path / "hf"),
                           "--tag", "step_0000030"], capture_output=True, text=True, env=env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    for name, loss in held_out_losses(hf, 32).items():
        assert loss == pytest.approx(s[f"eval/{name}/loss"][30], rel=2e-5), name
    _check_peft_lora_since_start(out, tmp_path, hf, torch.tensor([[5, 17, 99, 3, 250, 8], [41, 7, 2, 160, 33, 9]]))


# The run's starting weights as a Hugging Face model: the TP = 1 init, which on CPU draws the same global weights
# as the TP = 2 one (build_gpt), with its zero adapters dropped.
_START = """
import os, sys, torch.distributed as dist
from mora_dist.model import unload
from mora_dist.run.checkpoint import read_run_config
from mora_dist.run.megatron.model import build_gpt, init_model_parallel
from mora_dist.run.megatron.export import megatron_to_hf
run, out, port = sys.argv[1:]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=0, world_size=1)
cfg = read_run_config(run)
init_model_parallel(1, cfg.training.seed)
cfg1 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"tensor_model_parallel_size": 1})})
megatron_to_hf(unload(build_gpt(cfg1, cfg.model.vocab_size), merge=False), cfg).save_pretrained(out)
"""


def _check_peft_lora_since_start(out, tmp_path, merged, ids):
    """``--format peft-lora --since-start`` of the TP = 2 Megatron run at step 30 (a type-1 cycle merged, a live
    type-2 adapter, M replicated over TP), keyed by the Hugging Face module names, on the starting weights gives
    the merged export's logits. Catches B rows split unlike the weights (fused qkv per query group, [gate; up]),
    A not shared by the parts of a fused module, and embeddings / norms missing from modules_to_save."""
    import peft

    from tests.helpers.launch import free_port

    cmd = [sys.executable, "launch/export.py", "--run", str(out), "--out", str(tmp_path / "lora"), "--tag",
           "step_0000030", "--adapter-only", "--format", "peft-lora", "--since-start"]
    for args in (cmd, [sys.executable, "-c", _START, str(out), str(tmp_path / "start"), str(free_port())]):
        proc = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=180)
        assert proc.returncode == 0, proc.stderr[-4000:]
    start = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "start")).eval()
    served = peft.PeftModel.from_pretrained(start, str(tmp_path / "lora")).eval()
    assert {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} <= set(served.peft_config["default"].target_modules)
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_megatron_tp2_launch_matches_tp1(tmp_path):
    """The launcher at TP = 2 (2 ranks, DP = 1) and at TP = 1 (1 rank), same data, seed and starting weights (on
    CPU megatron-core draws the TP = 1 master weights and splits them), log the same per-step loss AND gradient
    norm over 6 steps with a merge at step 3 (fp32, no dropout). The gradient norm catches a doubled or missing TP
    reduction that Adam's scale invariance would hide from the loss."""
    sets = ["training.max_steps=6", "remora.merge_every=3", "training.eval_interval=0", "training.save_interval=0",
            "scheduler.warmup_steps=2", "scheduler.restart_warmup_steps=1"]
    logs = {}
    for tp in (2, 1):
        out = tmp_path / f"tp{tp}"
        run(tp, CONFIG, [*sets, f"model.tensor_model_parallel_size={tp}", f"training.output_dir={out}"])
        logs[tp] = scalars(out)
    assert sorted(logs[2]["remora/merges"].items()) == [(3, 1.0), (6, 2.0)]
    for tag in ("train/loss", "train/grad_norm"):
        assert sorted(logs[2][tag]) == list(range(1, 7)), tag
        for step, value in logs[1][tag].items():
            assert logs[2][tag][step] == pytest.approx(value, rel=1e-4), (tag, step)
