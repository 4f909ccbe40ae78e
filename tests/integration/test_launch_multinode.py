"""Two nodes on one machine: ``launch/pretrain.py`` started by two launcher invocations (node ranks 0 and 1, one
process each), with torchrun's c10d rendezvous and with the DeepSpeed launcher's multi-node form without ssh,
both writing one shared checkpoint folder."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.launch import RUN_TIMEOUT_S, TINY, env, free_port, scalars

# 2 optimizer steps, a merge and a checkpoint at each: enough to see both nodes train, merge and save together.
SETS = ["training.max_steps=2", "remora.merge_every=1", "scheduler.warmup_steps=1", "scheduler.restart_warmup_steps=0",
        "training.eval_interval=2", "training.save_interval=1", "training.keep_last=2"]


def _args(out) -> list[str]:
    args = ["launch/pretrain.py", "--config", TINY]
    for item in [*SETS, f"training.output_dir={out}"]:
        args += ["--set", item]
    return args


def _torchrun(node_rank: int, port: int, out) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
            "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "mora-two-nodes", *_args(out)]


def _deepspeed(node_rank: int, port: int, out, hostfile) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port), *_args(out)]


def _run_nodes(cmds: list[list[str]]) -> None:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
             for c in cmds]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=RUN_TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"node failed (rc={p.returncode}):\n{log[-5000:]}"


@pytest.fixture(scope="module")
def two_node_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    hostfile = root / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    _run_nodes([_torchrun(r, port, root / "torchrun") for r in (0, 1)])
    port = free_port()
    _run_nodes([_deepspeed(r, port, root / "deepspeed", hostfile) for r in (0, 1)])
    return root / "torchrun", root / "deepspeed"


def test_two_nodes_train_merge_and_save_one_shared_checkpoint(two_node_runs):
    """Catches nodes that each run alone (world size 1: one ZeRO partition, a different loss), a merge on one node
    only, and a checkpoint missing the other node's optimizer shard."""
    for out in two_node_runs:
        s = scalars(out)
        assert sorted(s["remora/merges"].items()) == [(1, 1.0), (2, 2.0)]
        assert set(s["train/loss"]) == {1, 2} and "eval/loss" in s
        ckpt = out / "checkpoints" / "step_0000002"
        assert sorted(p.name for p in ckpt.glob("*optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    a, b = (scalars(out) for out in two_node_runs)
    for step in (1, 2):  # the same 2-rank job under either launcher
        assert a["train/loss"][step] == pytest.approx(b["train/loss"][step], rel=1e-5)
    assert a["eval/loss"][2] == pytest.approx(b["eval/loss"][2], rel=1e-5)
