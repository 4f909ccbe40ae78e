"""Hugging Face <-> megatron-core weights (``mora_dist/run/megatron/hf_weights.py``) and continual pretraining on the
Megatron backend: a tiny local HF checkpoint loads into a ``GPTModel`` that computes the same logits, maps back
unchanged, and the shipped ``configs/mora_cpt_biomed_megatron.json`` runs at toy size at TP = 2.
Spec: §4.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from mora_dist.data import load_tokenizer
from tests.helpers.launch import env, free_port, run, scalars
from tests.helpers.models import SHAKESPEARE_VOCAB as VOCAB
from tests.helpers.models import save_tiny_checkpoint


@pytest.fixture
def single_process_megatron(monkeypatch):
    """A one-rank gloo group and megatron's parallel state in this process, torn down afterwards (so later tests
    and their subprocesses see neither)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mora_dist.run.megatron.export import _single_process_group
    from mora_dist.run.megatron.model import init_model_parallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # recorded, so it is removed again afterwards
    _single_process_group()
    init_model_parallel(1, 0)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.parametrize("kind,tie,extra", [
    ("llama", False, {}), ("qwen2", True, {}), ("mixtral", False, {}),
    ("qwen3_moe", False, {"norm_topk_prob": False}), ("qwen3_moe", True, {"norm_topk_prob": True})],
    ids=["llama-untied", "qwen2-tied-qkv-bias", "mixtral", "qwen3-moe", "qwen3-moe-norm-topk-tied"])
def test_hf_checkpoint_loads_into_gpt_and_maps_back_unchanged(tmp_path, kind, tie, extra, single_process_megatron):
    """TP = 1: the imported GPTModel's logits equal the Hugging Face model's (fp32, 1e-5), and the export mapping
    gives back the same HF model. Catches q/k/v interleaved per head instead of per query group, [up; gate],
    a dropped q/k/v bias, a tied head loaded twice, the wrong norm eps or RoPE base; for a mixture of experts,
    experts permuted, gate and up swapped, Qwen3's q/k norms dropped, and routing by the wrong softmax (Mixtral
    and Qwen3-MoE with ``norm_topk_prob`` renormalise the top-k weights, Qwen3-MoE without it does not)."""
    from mora_dist.run.config import RunConfig
    from mora_dist.run.megatron.export import megatron_to_hf
    from mora_dist.run.megatron.model import build_gpt, gpt_loss

    base = save_tiny_checkpoint(tmp_path / "base", kind, tie, **extra)
    cfg = RunConfig.model_validate({
        "model": {"backend": "megatron", "pretrained": str(base)}, "optimizer": {"lr": 1e-3},
        "data": {"sources": [{"name": "x", "path": "data/shakespeare/poems.txt.gz"}], "tokenizer": str(base),
                 "seq_len": 32},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "micro_batch_size": 1,
                     "global_batch_size": 1},
        **({"deepspeed": None} if kind in ("mixtral", "qwen3_moe") else {}),  # experts train megatron-native
    })
    gpt = build_gpt(cfg, VOCAB).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        position_ids = torch.arange(17).expand(2, 17)
        mask = torch.triu(torch.ones(17, 17, dtype=torch.bool), 1)[None, None]
        torch.testing.assert_close(gpt(ids, position_ids, mask), ref, rtol=1e-5, atol=1e-5)
        loss, n = gpt_loss(gpt, ids)
        assert n == 2 * 16
        torch.testing.assert_close(loss, hf(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-5)
        back = megatron_to_hf(gpt, cfg)
        assert type(back) is type(hf)
        torch.testing.assert_close(back(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_checkpoint_is_refused_naming_the_field(tmp_path):
    from mora_dist.errors import MoRAConfigError
    from mora_dist.run.model_shape import GPTShape

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_act": "gelu", "hidden_size": 8,
                                                   "num_attention_heads": 2, "num_hidden_layers": 1,
                                                   "intermediate_size": 8, "vocab_size": 8}))
    with pytest.raises(MoRAConfigError, match="hidden_act='gelu'.*model.backend='hf'"):
        GPTShape.from_pretrained(base)


def test_megatron_continual_pretraining_config_runs_at_toy_size(tmp_path):
    """``configs/mora_cpt_biomed_megatron.json`` at toy size: a tiny local Llama, TP = 2 over 2 ranks. The loss
    evaluated before the first step equals the checkpoint's own (Hugging Face) loss on the same eval blocks, so
    the checkpoint was imported into the TP = 2 shards exactly; training lowers it; ``launch/export.py`` gives
    a Hugging Face model whose held-out losses are the ones the run logged at its last step."""
    base = save_tiny_checkpoint(tmp_path / "base", "llama", False)
    paragraphs = gzip.open("data/shakespeare/poems.txt.gz", "rt").read().split("\n\n")
    (tmp_path / "domain.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in paragraphs if p.strip()))
    config = json.loads(Path("configs/mora_cpt_biomed_megatron.json").read_text())
    config["model"].update(pretrained=str(base), dtype="float32")
    config["mora"].update(r=8)
    config["optimizer"].update(lr=0.02, torch_adam=True)
    config["scheduler"].update(warmup_steps=2)
    config.pop("deepspeed", None)
    config["data"].update(tokenizer=str(base), seq_len=64, streaming=False, num_proc=1, sources=[
        {"name": "biomed", "path": str(tmp_path / "domain.jsonl"), "format": "jsonl", "weight": 0.8, "eval_blocks": 4},
        {"name": "replay", "path": "data/shakespeare/plays.txt.gz", "weight": 0.2, "eval_blocks": 4}])
    config["training"].update(output_dir=str(tmp_path / "run"), max_steps=8, micro_batch_size=2, global_batch_size=4,
                              eval_interval=8, save_interval=8, log_interval=1)
    (tmp_path / "cpt.json").write_text(json.dumps(config))
    run(2, str(tmp_path / "cpt.json"), [])
    s = scalars(tmp_path / "run")
    assert s["eval/biomed/loss"][8] < s["eval/biomed/loss"][0] - 0.05

    # The Hugging Face backend's starting loss: the checkpoint's loss on the same held-out blocks.
    from mora_dist.data import load_text_source, split_eval, tokenize_and_pack

    tok = load_tokenizer(str(base))
    blocks = {name: torch.tensor(split_eval(tokenize_and_pack(load_text_source(path=path), tok, 64), 4)[1])
              for name, path in (("biomed", str(tmp_path / "domain.jsonl")),
                                 ("replay", "data/shakespeare/plays.txt.gz"))}
    original = transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    with torch.no_grad():
        for name, ids in blocks.items():
            start = original(input_ids=ids, labels=ids).loss.item()
            assert s[f"eval/{name}/loss"][0] == pytest.approx(start, rel=1e-5), name

    proc = subprocess.run([sys.executable, "launch/export.py", "--run", str(tmp_path / "run"), "--out",
                           str(tmp_path / "hf")], capture_output=True, text=True, env=env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        for name, ids in blocks.items():
            loss = exported(input_ids=ids, labels=ids).loss.item()
            assert loss == pytest.approx(s[f"eval/{name}/loss"][8], rel=2e-5), name


def test_hf_to_megatron_tp2_to_hf_round_trip_keeps_logits(tmp_path):
    """HF -> Megatron at TP = 2 (2 ranks) -> ``launch/export.py`` -> HF, weights unchanged (one step at lr 1e-30,
    below fp32 resolution): the exported model's logits equal the original's (fp32, 1e-5). Catches a TP = 2
    gather that is not the inverse of the import's split (e.g. [gate; up] gathered without partition stride 2,
    a shard order swapped, a merge that changes weights with a zero M). A split wrong the same way at import and
    export cancels here; the toy continual-pretraining test's step-0 loss catches that."""
    base = save_tiny_checkpoint(tmp_path / "base", "llama", False)
    config = json.loads(Path("configs/mora_cpt_biomed_megatron.json").read_text())
    config["model"].update(pretrained=str(base), dtype="float32")
    config["mora"].update(r=8)
    config["optimizer"].update(lr=1e-30, torch_adam=True)
    config["scheduler"].update(warmup_steps=0)
    config.pop("deepspeed", None)
    config["data"].update(tokenizer=str(base), seq_len=32, streaming=False, num_proc=1,
                          sources=[{"name": "poems", "path": "data/shakespeare/poems.txt.gz"}])
    config["training"].update(output_dir=str(tmp_path / "run"), max_steps=1, micro_batch_size=1, global_batch_size=1,
                              eval_interval=0, save_interval=1, log_interval=1)
    (tmp_path / "rt.json").write_text(json.dumps(config))
    run(2, str(tmp_path / "rt.json"), [])
    proc = subprocess.run([sys.executable, "launch/export.py", "--run", str(tmp_path / "run"), "--out",
                           str(tmp_path / "hf")], capture_output=True, text=True, env=env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(str(base)).eval()
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, original(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
