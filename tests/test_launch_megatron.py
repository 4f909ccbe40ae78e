"""The megatron-core backend at TP = 2 on CPU (2 ranks, gloo) runs the tiny ReMoRA job through the ``deepspeed``
launcher, and its export (TP shards gathered to the Hugging Face Llama layout) computes the training model's
function."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from launch_helpers import env, run, scalars

from mora_dist.data import load_text_source, load_tokenizer, split_eval, tokenize_and_pack

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
    tok = load_tokenizer("data/shakespeare/tokenizer.json")
    for name in ("plays", "poems"):
        packed = tokenize_and_pack(load_text_source(path=f"data/shakespeare/{name}.txt.gz"), tok, 128)
        _, held_out = split_eval(packed, 32)
        ids = torch.tensor(held_out)
        with torch.no_grad():
            loss = hf(input_ids=ids, labels=ids).loss.item()
        assert loss == pytest.approx(s[f"eval/{name}/loss"][30], rel=2e-5), name
