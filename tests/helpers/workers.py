"""Run a module-level function on N local processes over gloo and collect each rank's return value.

Uses ``multiprocessing`` spawn directly (not ``elastic_launch``) so that every launch has a hard timeout and a
hung collective kills the workers instead of the test session. DeepSpeed's CPU patch and the free-port helper are
the library's own (:mod:`mora_dist.run.distributed`), re-exported here for the tests.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

from mora_dist.run.distributed import free_port, patch_deepspeed_for_cpu

__all__ = ["DEFAULT_TIMEOUT_S", "patch_deepspeed_for_cpu", "run_workers"]

DEFAULT_TIMEOUT_S = 600  # a hang guard, not a speed check


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: mp.Queue) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        results.put((rank, True, fn(*args)))
    except BaseException:  # report every failure to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_workers(fn: Callable, world_size: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Start ``world_size`` processes running ``fn(*args)`` with RANK/WORLD_SIZE/MASTER_* set; return the
    per-rank results in rank order. ``fn`` must be a module-level function; it initialises its own process
    group (``torch.distributed.init_process_group("gloo")``) and returns picklable CPU data."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    try:
        while len(collected) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks timed out after {timeout_s}s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{value}")
            collected[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [collected[r] for r in range(world_size)]
