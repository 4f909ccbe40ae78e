"""``configs/remora_tiny_megatron_native.json`` through ``torchrun`` (4 ranks: TP = 2, PP = 2, bf16, megatron-core's
DDP, distributed optimizer and pipeline schedule, no DeepSpeed), killed mid-run and resumed, and exported.

Spec: §3, §4, §5.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import transformers
from safetensors.torch import load_file

from tests.helpers.launch import RUN_TIMEOUT_S, env, free_port, held_out_losses, kill_after_checkpoint, scalars

CONFIG = "configs/remora_tiny_megatron_native.json"
SETS = ["training.max_steps=4", "remora.merge_every=2", "training.eval_interval=2", "training.save_interval=1",
        "training.keep_last=10", "scheduler.warmup_steps=1", "scheduler.restart_warmup_steps=0",
        "data.sources.0.eval_blocks=4", "data.sources.1.eval_blocks=4"]


def _cmd(out, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port()),
           "launch/pretrain.py", "--config", CONFIG]
    for item in [*SETS, f"training.output_dir={out}"]:
        cmd += ["--set", item]
    return cmd + list(extra)


def _torchrun(out, *extra: str) -> None:
    proc = subprocess.run(_cmd(out, *extra), capture_output=True, text=True, env=env(), timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")


def _export(run, out, *extra: str) -> None:
    proc = subprocess.run([sys.executable, "launch/export.py", "--run", str(run), "--out", str(out), *extra],
                          capture_output=True, text=True, env=env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _torchrun_killed(out) -> str:
    """Run, and SIGKILL torchrun and the 4 ranks once the step-2 checkpoint exists; the newest checkpoint left."""
    return kill_after_checkpoint(_cmd(out), out, "step_0000002")


def test_native_tp2_pp2_killed_run_resumes_exactly_and_exports(tmp_path):
    """ReMoRA merges at steps 2 and 4 are logged with the usual tags; a run SIGKILLed (process group) after its
    step-2 checkpoint and resumed with --resume reproduces the uninterrupted run's steps (losses, the merge, eval);
    the adapter export holds every layer's matrix (both pipeline stages) and the merged export computes the logged
    eval loss. Catches optimizer state restored wrongly (megatron's shared Adam step counter, the distributed
    optimizer's shards), a checkpoint half-written by the kill, a stage's layers missing from the checkpoint or the
    export, and a merge replayed twice or lost."""
    ref_dir, out = tmp_path / "ref", tmp_path / "run"
    _torchrun(ref_dir)
    ref = scalars(ref_dir)
    assert sorted(ref["remora/merges"].items()) == [(2, 1.0), (4, 2.0)]
    assert {"remora/delta_norm", "remora/type", "train/lr", "train/grad_norm", "eval/plays/loss"} <= set(ref)
    assert set(ref["eval/loss"]) == {0, 2, 4} and ref["eval/loss"][4] < ref["eval/loss"][0]
    killed_at = _torchrun_killed(out)
    assert killed_at < "step_0000004", killed_at
    _torchrun(out, "--resume")
    got = scalars(out)
    assert sorted(got["train/loss"]) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert got["train/loss"][step] == pytest.approx(ref["train/loss"][step], rel=1e-6), (step, killed_at)
    assert got["eval/loss"][4] == pytest.approx(ref["eval/loss"][4], rel=1e-6)
    assert got["remora/merges"][4] == 2.0 and got["remora/delta_norm"][4] == pytest.approx(ref["remora/delta_norm"][4])
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]

    _export(out, tmp_path / "adapter", "--adapter-only", "--tag", "step_0000003")
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    matrices = {k: v for k, v in adapter.items() if k.endswith(".mora_M")}
    assert len(matrices) == 4 * 4  # 4 layers over 2 stages, 4 linear layers each
    assert all(float(m.abs().max()) > 0 for m in matrices.values())  # step 3: one step after the merge
    _export(out, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).float().eval()
    for name, loss in held_out_losses(hf, 4).items():
        assert loss == pytest.approx(got[f"eval/{name}/loss"][4], rel=2e-2), name  # the run computes in bf16


def _torchrun_at(out, nprocs: int, tp: int, pp: int, *extra: str) -> None:
    cmd = _cmd(out, "--set", "model.dtype=float32", "--set", f"model.tensor_model_parallel_size={tp}",
               "--set", f"model.pipeline_model_parallel_size={pp}", *extra)
    cmd[cmd.index("--nproc-per-node") + 1] = str(nprocs)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")


@pytest.fixture(scope="module")
def fp32_tp2_pp2_run(tmp_path_factory):
    """The float32 run at TP = 2 x PP = 2 both layout changes resume from (trained once)."""
    ref_dir = tmp_path_factory.mktemp("fp32_tp2_pp2") / "ref"
    _torchrun_at(ref_dir, 4, 2, 2)
    return ref_dir


@pytest.mark.parametrize("nprocs, tp, pp", [(2, 1, 1), (4, 4, 1)], ids=["tp1-pp1-dp2", "tp4-pp1-dp1"])
def test_native_checkpoint_resumes_at_another_layout(fp32_tp2_pp2_run, tmp_path, nprocs, tp, pp):
    """A float32 run saved at TP = 2 x PP = 2 x DP = 1 (after the step-2 merge) resumes at another layout with the
    same next steps as the uninterrupted run (1e-5): the base weights with the merged dW, every M and its Adam
    moments and step, the schedule and the ReMoRA state are resharded. Catches optimizer state kept per rank
    (it cannot follow a new layout), a stage's layers lost, and M resharded into the wrong rows."""
    import shutil

    ref_dir, out = fp32_tp2_pp2_run, tmp_path / "run"
    ref = scalars(ref_dir)
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_dir / "checkpoints" / "step_0000002", out / "checkpoints" / "step_0000002")
    shutil.copy(ref_dir / "config.json", out / "config.json")
    _torchrun_at(out, nprocs, tp, pp, "--resume")
    got = scalars(out)
    assert sorted(got["train/loss"]) == [3, 4]
    for step in (3, 4):
        assert abs(got["train/loss"][step] - ref["train/loss"][step]) < 1e-5, (step, got["train/loss"], ref)
    assert got["remora/merges"][4] == 2.0
    assert got["remora/delta_norm"][4] == pytest.approx(ref["remora/delta_norm"][4], rel=1e-5)
