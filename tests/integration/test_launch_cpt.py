"""Continual pretraining: a tiny Hugging Face checkpoint saved here is adapted with MoRA on a JSONL domain corpus
mixed with replay text, then exported merged and as an adapter alone."""

from __future__ import annotations

import gzip
import json

import torch
import transformers

from mora_dist.adapters.mora import load_mora
from mora_dist.data import load_tokenizer
from mora_dist.run.hf import load_hf_run_model
from tests.helpers.launch import export_in_process, run, scalars


def test_continual_pretraining_of_a_local_checkpoint_adapts_and_exports(tmp_path):
    """Catches: a pretrained checkpoint re-initialised instead of loaded, the mixture ignoring a JSONL source,
    gradient accumulation (1 rank, 2 micro-batches) not stepping, and exports that disagree with training."""
    tok = load_tokenizer("data/shakespeare/tokenizer.json")
    base = tmp_path / "base"
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    paragraphs = gzip.open("data/shakespeare/poems.txt.gz", "rt").read().split("\n\n")
    (tmp_path / "domain.jsonl").write_text("\n".join(json.dumps({"body": p}) for p in paragraphs if p.strip()))
    config = {
        "model": {"pretrained": str(base)},
        "mora": {"r": 16, "mora_type": "rope", "target_modules": "all-linear"},
        "optimizer": {"lr": 0.02, "torch_adam": True},
        "scheduler": {"name": "cosine", "warmup_steps": 2},
        "data": {"sources": [{"name": "domain", "path": str(tmp_path / "domain.jsonl"), "text_field": "body",
                              "weight": 0.7, "eval_blocks": 8},
                             {"name": "replay", "path": "data/shakespeare/plays.txt.gz", "weight": 0.3,
                              "eval_blocks": 8}],
                 "tokenizer": str(base), "seq_len": 64},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 16, "micro_batch_size": 4,
                     "global_batch_size": 8, "eval_interval": 8, "save_interval": 8},
    }
    (tmp_path / "cpt.json").write_text(json.dumps(config))
    run(1, str(tmp_path / "cpt.json"), [])
    s = scalars(tmp_path / "run")
    assert s["eval/domain/loss"][16] < s["eval/domain/loss"][0] - 0.05
    assert "eval/replay/loss" in s and "remora/merges" not in s
    # The pretrained weights were loaded (the step-0 loss is the saved model's, not a fresh init's).
    original = transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    _, model = load_hf_run_model(tmp_path / "run")
    ids = torch.tensor([tok("Shall I compare thee to a summer's day?")["input_ids"]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        assert not torch.allclose(trained, original(input_ids=ids).logits, atol=1e-3)

    export_in_process("--run", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    export_in_process("--run", str(tmp_path / "run"), "--out", str(tmp_path / "adapter"), "--adapter-only")
    adapted = load_mora(transformers.AutoModelForCausalLM.from_pretrained(str(base)), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(adapted(input_ids=ids).logits, trained, atol=1e-5, rtol=1e-5)
