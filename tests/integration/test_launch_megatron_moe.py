"""``configs/remora_tiny_megatron_moe.json`` (Mixtral-shaped, 4 experts, top-2, bf16) through ``torchrun``: EP = 2 on
2 ranks, killed after a checkpoint and resumed, the adapter export at EP = 1; continual pretraining of a Hugging
Face Qwen3-MoE at TP = 2 x EP = 2 on 4 ranks (sequence parallel), exported back merged and as a PEFT LoRA.

Spec: §3, §4, §5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.launch import RUN_TIMEOUT_S, env, free_port, kill_after_checkpoint, scalars

CONFIG = "configs/remora_tiny_megatron_moe.json"
SETS = ["training.max_steps=4", "remora.merge_every=2", "training.eval_interval=2", "training.save_interval=1",
        "training.keep_last=10", "scheduler.warmup_steps=1", "scheduler.restart_warmup_steps=0",
        "data.sources.0.eval_blocks=4", "data.sources.1.eval_blocks=4"]


def _cmd(out, nprocs: int = 2, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs), "--master-port",
           str(free_port()), "launch/pretrain.py", "--config", CONFIG]
    for item in [*SETS, f"training.output_dir={out}"]:
        cmd += ["--set", item]
    return cmd + list(extra)


def _torchrun(out, nprocs: int = 2, *extra: str) -> None:
    proc = subprocess.run(_cmd(out, nprocs, *extra), capture_output=True, text=True, env=env(),
                          timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")


@pytest.mark.slow
def test_ep2_run_merges_resumes_exactly_and_exports_every_expert(tmp_path):
    """ReMoRA merges at steps 2 and 4 into the experts; a run SIGKILLed after its step-2 checkpoint and resumed
    reproduces the uninterrupted run (losses, merge norm, eval); the adapter export (built at EP = 1) holds a
    trained matrix for every expert of both layers, numbered globally, and for the shared linears; the merged
    export is a Mixtral. Catches an
    expert's optimizer state or merge residual lost on resume (the experts have their own distributed optimizer)
    and experts of the second expert-parallel rank missing from the checkpoint or the export."""
    ref_dir, out = tmp_path / "ref", tmp_path / "run"
    _torchrun(ref_dir)
    ref = scalars(ref_dir)
    assert sorted(ref["remora/merges"].items()) == [(2, 1.0), (4, 2.0)]
    assert set(ref["eval/loss"]) == {0, 2, 4} and ref["eval/loss"][4] < ref["eval/loss"][0]
    killed_at = kill_after_checkpoint(_cmd(out), out, "step_0000002")
    assert killed_at < "step_0000004", killed_at
    _torchrun(out, 2, "--resume")
    got = scalars(out)
    for step in range(1, 5):
        assert got["train/loss"][step] == pytest.approx(ref["train/loss"][step], rel=1e-6), (step, killed_at)
    assert got["eval/loss"][4] == pytest.approx(ref["eval/loss"][4], rel=1e-6)
    assert got["remora/delta_norm"][4] == pytest.approx(ref["remora/delta_norm"][4], rel=1e-6)

    adapter_dir = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, "launch/export.py", "--run", str(out), "--out", str(adapter_dir),
                           "--adapter-only", "--tag", "step_0000003"], capture_output=True, text=True, env=env(),
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    matrices = {k: v for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()
                if k.endswith(".mora_M")}
    experts = {k for k in matrices if ".local_experts." in k}
    assert experts == {f"base_model.model.decoder.layers.{layer}.mlp.experts.local_experts.{e}.{fc}.mora_M"
                       for layer in (0, 1) for e in range(4) for fc in ("linear_fc1", "linear_fc2")}
    assert all(float(m.abs().max()) > 0 for m in matrices.values())  # step 3: one step after the merge
    _export(out, tmp_path / "hf")  # a new Mixtral: written back as one
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixtral"


def _blocks(seq_len: int, eval_blocks: int) -> dict[str, torch.Tensor]:
    """Each shipped source's held-out blocks, as the launcher evaluates them."""
    from mora_dist.data import load_text_source, load_tokenizer, split_eval, tokenize_and_pack

    tok = load_tokenizer("data/shakespeare/tokenizer.json")
    return {name: torch.tensor(split_eval(tokenize_and_pack(load_text_source(path=f"data/shakespeare/{name}.txt.gz"),
                                                            tok, seq_len), eval_blocks)[1])
            for name in ("plays", "poems")}


def _losses(model, blocks: dict[str, torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        return {name: model(input_ids=ids, labels=ids).loss.item() for name, ids in blocks.items()}


def _export(run_dir, out, *extra: str) -> None:
    proc = subprocess.run([sys.executable, "launch/export.py", "--run", str(run_dir), "--out", str(out), *extra],
                          capture_output=True, text=True, env=env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_tp2_ep2_continual_pretraining_of_a_hf_qwen3_moe_exports_back(tmp_path):
    """The config's model replaced by a tiny Hugging Face Qwen3-MoE (q/k norms, ``norm_topk_prob``), trained in
    fp32 at TP 2 x EP 2 x expert TP 2 on 4 ranks (sequence parallel) with a merge at step 2:
    - the loss evaluated before the first step is the checkpoint's own transformers loss on the same blocks, so
      every rank received its dense shards and its experts' shards exactly;
    - the merged export is a Qwen3-MoE whose held-out losses are the ones the run logged at its last step;
    - the PEFT LoRA of the whole run (both cycles, experts as fused ``target_parameters``), served by the real
      ``PeftModel`` on the starting checkpoint, gives the same losses.
    Catches an expert-parallel rank loading another rank's experts, an expert's fc1 split without its [gate; up]
    stride, an expert cycle missing from the PEFT file, and experts stacked in the wrong order."""
    import peft
    import transformers

    from tests.helpers.models import save_tiny_checkpoint

    base = save_tiny_checkpoint(tmp_path / "base", "qwen3_moe", norm_topk_prob=True)
    config = json.loads(Path(CONFIG).read_text())
    config["model"] = {"backend": "megatron", "pretrained": str(base), "dtype": "float32",
                       "tensor_model_parallel_size": 2, "expert_model_parallel_size": 2,
                       "expert_tensor_parallel_size": 2, "moe_token_dispatcher_type": "allgather",
                       "router_aux_loss_coef": 0.01}
    # sequence parallel splits the 64 predicted positions over TP; gloo's all_gather takes equal sizes only, which
    # the alltoall dispatcher's uneven gather over expert TP is not
    config["data"]["seq_len"] = 65
    (tmp_path / "cpt.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
           str(free_port()), "launch/pretrain.py", "--config", str(tmp_path / "cpt.json")]
    for item in [*SETS, f"training.output_dir={out}"]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    s = scalars(out)
    assert sorted(s["remora/merges"].items()) == [(2, 1.0), (4, 2.0)]
    blocks = _blocks(65, 4)
    start = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    for name, loss in _losses(start, blocks).items():
        assert s[f"eval/{name}/loss"][0] == pytest.approx(loss, rel=1e-5), name
    assert s["eval/loss"][4] < s["eval/loss"][0]

    _export(out, tmp_path / "hf")
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(merged).__name__ == "Qwen3MoeForCausalLM"
    for name, loss in _losses(merged, blocks).items():
        assert loss == pytest.approx(s[f"eval/{name}/loss"][4], rel=1e-4), name

    _export(out, tmp_path / "lora", "--adapter-only", "--format", "peft-lora", "--since-start")
    lora = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")} <= \
        set(lora["target_parameters"])
    served = peft.PeftModel.from_pretrained(start, str(tmp_path / "lora")).eval()
    for name, loss in _losses(served, blocks).items():
        assert loss == pytest.approx(s[f"eval/{name}/loss"][4], rel=1e-4), name
