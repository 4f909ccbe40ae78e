"""The shipped mixture-of-experts config through the real CLI: ``deepspeed --num_gpus 2`` trains a tiny Mixtral
from scratch with MoRA on every expert and ReMoRA merges, and its experts move."""

import json

import torch
import transformers

from tests.helpers import launch


def test_tiny_moe_config_trains_the_experts_under_deepspeed(tmp_path):
    out = tmp_path / "run"
    proc = launch.run(2, "configs/remora_tiny_moe.json", [
        f"training.output_dir={out}", "training.max_steps=24", "remora.merge_every=12", "training.eval_interval=12",
        "training.save_interval=12",
    ])
    log = proc.stdout + proc.stderr
    assert "MoRA type 1 on 12 layers" in log  # 4 attention projections + 2 expert projections, 2 layers
    steps = launch.scalars(out)
    losses = steps["train/loss"]
    assert losses[max(losses)] < losses[min(losses)]
    assert steps["remora/type"]  # the merges ran
    export = tmp_path / "merged"
    launch.export_in_process("--run", str(out), "--out", str(export))
    # transformers writes Mixtral's experts in the hub layout (experts.N.w1/w2/w3) and fuses them again on load
    merged = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    experts = merged.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 352, 128) and torch.isfinite(experts.down_proj).all()
    assert json.loads((export / "config.json").read_text())["model_type"] == "mixtral"
