"""The process group of a run: NCCL on GPUs, gloo on CPU (DeepSpeed's C++ JIT kept out), one-process runs
without a launcher, and the one free-port helper.
"""

from __future__ import annotations

import importlib
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a one-process or test rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def patch_deepspeed_for_cpu() -> None:
    """On a machine without CUDA, stop DeepSpeed from JIT-compiling its shared-memory comm op (C++, about a
    minute per fresh machine) when the process group starts; gloo does the collectives instead.

    Call before ``deepspeed.init_distributed``. Patches one module attribute of ``deepspeed.comm.torch`` (which
    ``import deepspeed.comm.torch`` cannot reach: ``deepspeed.comm`` re-exports ``torch`` under that name).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None



def init_distributed(*, cpu_threads: int | None = None) -> bool:
    """``deepspeed.init_distributed`` with NCCL on GPUs, gloo on CPU with ``cpu_threads`` intra-op threads per
    rank (default: ``$OMP_NUM_THREADS``, else the cores divided among the local ranks).

    Started without a launcher (plain ``python``, no ``RANK``/``WORLD_SIZE`` and no MPI job around it), it runs
    as one process, as ``deepspeed`` with one process does, instead of DeepSpeed's MPI discovery.

    Returns:
        Whether it started that way (the caller logs it once its logging is set up).
    """
    import deepspeed  # DeepSpeed is heavy: loaded when a run starts, not when its config is checked

    single = _single_process_env()

    if torch.cuda.is_available():
        deepspeed.init_distributed(dist_backend="nccl")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return single
    patch_deepspeed_for_cpu()
    if cpu_threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        cpu_threads = int(os.environ["OMP_NUM_THREADS"])
    if cpu_threads is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        cpu_threads = max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(cpu_threads)
    deepspeed.init_distributed(dist_backend="gloo")
    return single



def _single_process_env() -> bool:
    """Set a one-process rendezvous when no launcher set one; whether it did."""
    launched = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID")
    if any(key in os.environ for key in launched):
        return False
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    return True



def device() -> torch.device:
    """This rank's CUDA device, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """A barrier over the whole world (nothing without a process group)."""
    if dist.is_initialized():
        dist.barrier()
