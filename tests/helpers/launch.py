"""Helpers for the tests that run ``launch/pretrain.py`` through the real ``deepspeed`` launcher on CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mora_dist.run.distributed import free_port

TINY = "configs/remora_tiny.json"
# A shorter tiny job for tests: 4 merges, a checkpoint every 10 steps (all kept), eval every 20.
FAST = [
    "training.max_steps=80", "remora.merge_every=20", "training.eval_interval=20", "training.save_interval=10",
    "training.keep_last=10", "scheduler.warmup_steps=10",
]
RUN_TIMEOUT_S = 600  # a hang guard, not a speed check: CI machines are shared and slow under load


def launch_cmd(nprocs: int, config: str, sets: list[str], *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port",
           str(free_port()), "launch/pretrain.py", "--config", config]
    for item in sets:
        cmd += ["--set", item]
    return cmd + list(extra)


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run(nprocs: int, config: str, sets: list[str], *extra: str) -> subprocess.CompletedProcess:
    """Run to completion; raise with the log tail on failure."""
    proc = subprocess.run(launch_cmd(nprocs, config, sets, *extra), capture_output=True, text=True, env=env(),
                          timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def kill_after_checkpoint(cmd: list[str], run_dir: str | Path, tag: str) -> str:
    """Start ``cmd`` and SIGKILL its whole process group (the launcher and every rank, no clean-up) once the
    checkpoint ``tag`` (or a later one) is complete; returns the newest complete checkpoint left behind."""
    from mora_dist.run.checkpoint import latest_tag

    checkpoints = Path(run_dir) / "checkpoints"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
                            start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while (latest_tag(checkpoints) or "") < tag:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return latest_tag(checkpoints)


def held_out_losses(model, eval_blocks: int) -> dict[str, float]:
    """The causal-LM loss of a Hugging Face ``model`` on each shipped source's held-out blocks (128 tokens, the
    last ``eval_blocks`` of the packed source: what the launcher evaluates on)."""
    import torch

    from mora_dist.data import load_text_source, load_tokenizer, split_eval, tokenize_and_pack

    tok = load_tokenizer("data/shakespeare/tokenizer.json")
    out = {}
    for name in ("plays", "poems"):
        packed = tokenize_and_pack(load_text_source(path=f"data/shakespeare/{name}.txt.gz"), tok, 128)
        ids = torch.tensor(split_eval(packed, eval_blocks)[1])
        with torch.no_grad():
            out[name] = model(input_ids=ids, labels=ids).loss.item()
    return out


def scalars(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """``tag -> {step: value}`` from the run's TensorBoard event files (restarts purge orphaned steps)."""
    ea = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def export_in_process(*args: str) -> None:
    """``launch/export.py`` with these arguments, in this process (the Hugging Face backend needs no process
    group; the Megatron one does, so its test runs the script in a subprocess)."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "launch/export.py"
    spec = importlib.util.spec_from_file_location("mora_export_cli", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(list(args)) == 0


def raw_scalar_steps(run_dir: str | Path) -> dict[str, list[int]]:
    """``tag -> steps`` exactly as written in the event files (no reader-side purging), in file order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[int]] = {}
    for path in sorted((Path(run_dir) / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                out.setdefault(value.tag, []).append(event.step)
    return out



def start(cmd: list[str], log: str | Path) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own, its output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(), start_new_session=True)


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: str | Path, tag: str) -> None:
    """Return once checkpoint ``tag`` (or a later one) of the running ``proc`` is complete."""
    from mora_dist.run.checkpoint import latest_tag

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (latest_tag(Path(run_dir) / "checkpoints") or "") < tag:
        assert proc.poll() is None, f"the run ended (rc={proc.returncode}) before checkpoint {tag}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def rank_processes(proc: subprocess.Popen) -> list:
    """The training ranks under the launcher ``proc`` (psutil processes running the script, not a launcher)."""
    import psutil

    ranks = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:  # gone meanwhile
            continue
        if any(arg.endswith("launch/pretrain.py") for arg in cmdline) and not any("launcher" in a for a in cmdline):
            ranks.append(child)
    return ranks
