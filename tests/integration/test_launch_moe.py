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


def test_continual_pretraining_of_a_saved_moe_serves_through_peft(tmp_path):
    """A tiny Qwen3-MoE saved by transformers, continued with MoRA on attention and every expert and three ReMoRA
    merges under ``deepspeed --num_gpus 2``. Catches a checkpoint re-initialised instead of loaded (step-0 loss),
    experts left out of a pretrained model's targets, and exports that disagree with the trained model: the
    merged checkpoint, and the whole run as one PEFT ``target_parameters`` LoRA over the saved weights, served by
    the real ``peft``."""
    import peft

    from mora_dist.data import load_tokenizer
    from mora_dist.run.hf import load_hf_run_model

    tok = load_tokenizer("data/shakespeare/tokenizer.json")
    base = tmp_path / "base"
    cfg = transformers.Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                      moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    original = transformers.Qwen3MoeForCausalLM(cfg).eval()
    original.save_pretrained(str(base))
    config = {
        "model": {"pretrained": str(base)},
        "mora": {"r": 8, "mora_type": 1, "target_modules": "all-linear"},
        "remora": {"merge_every": 5, "mora_types": [1, 2]},
        "optimizer": {"lr": 0.01, "torch_adam": True},
        "scheduler": {"name": "jagged_cosine", "warmup_steps": 2, "restart_warmup_steps": 1},
        "deepspeed": {"zero_optimization": {"stage": 2}},
        "data": {"sources": [{"name": "plays", "path": "data/shakespeare/plays.txt.gz", "eval_blocks": 8}],
                 "tokenizer": "data/shakespeare/tokenizer.json", "seq_len": 128},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 15, "micro_batch_size": 4,
                     "global_batch_size": 8, "eval_interval": 15, "save_interval": 15, "cpu_threads": 1},
    }
    (tmp_path / "cpt.json").write_text(json.dumps(config))
    proc = launch.run(2, str(tmp_path / "cpt.json"), [])
    assert "MoRA type 1 on 12 layers" in proc.stdout + proc.stderr  # 4 attention + 2 expert projections, x2
    s = launch.scalars(tmp_path / "run")
    assert abs(s["eval/plays/loss"][0] - launch.held_out_losses(original, 8)["plays"]) < 1e-4
    assert s["remora/merges"][10] == 2.0

    _, trained = load_hf_run_model(tmp_path / "run")
    trained.eval()
    ids = torch.tensor([tok("Shall I compare thee to a summer's day? Thou art more lovely")["input_ids"]])
    with torch.no_grad():
        ours = trained(input_ids=ids).logits
        assert (ours - original(input_ids=ids).logits).abs().max() > 1e-2  # the experts' and attention's updates
    launch.export_in_process("--run", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    launch.export_in_process("--run", str(tmp_path / "run"), "--out", str(tmp_path / "lora"), "--adapter-only",
                             "--format", "peft-lora", "--since-start")
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    start = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    served = peft.PeftModel.from_pretrained(start, str(tmp_path / "lora")).eval()
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["target_parameters"]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, atol=1e-4, rtol=0)
        torch.testing.assert_close(served(input_ids=ids).logits, ours, atol=1e-4, rtol=0)
