"""``configs/remora_tiny_megatron_moe.json`` (Mixtral-shaped, 4 experts, top-2, bf16) through ``torchrun``: EP = 2 on
2 ranks, killed after a checkpoint and resumed; TP = 2 x EP = 2 on 4 ranks (sequence parallel) on the same data
split; the adapter export at EP = 1.

Spec: §3, §4, §5.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
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
    trained matrix for every expert of both layers, numbered globally, and for the shared linears. Catches an
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
    merged = subprocess.run([sys.executable, "launch/export.py", "--run", str(out), "--out", str(tmp_path / "hf")],
                            capture_output=True, text=True, env=env(), timeout=180)
    assert merged.returncode != 0 and "--adapter-only" in merged.stderr, merged.stderr[-2000:]


@pytest.mark.slow
def test_tp2_ep2_run_follows_the_ep2_run(tmp_path):
    """TP = 2 x EP = 2 (4 ranks, sequence parallel, expert TP 1) has the same data-parallel size as EP = 2 on 2
    ranks, so it trains on the same batches: its bf16 losses and merge norms follow the 2-rank run's."""
    ep2, tp2 = tmp_path / "ep2", tmp_path / "tp2"
    seq = ("--set", "data.seq_len=129")  # sequence parallel splits the 128 predicted positions over TP
    _torchrun(ep2, 2, *seq)
    _torchrun(tp2, 4, *seq, "--set", "model.tensor_model_parallel_size=2")
    a, b = scalars(ep2), scalars(tp2)
    for step in range(1, 5):
        assert b["train/loss"][step] == pytest.approx(a["train/loss"][step], rel=2e-2), step
    assert b["remora/delta_norm"][2] == pytest.approx(a["remora/delta_norm"][2], rel=5e-2)
