"""Shared setup of the megatron-core worker processes of the tensor-parallel tests (gloo, CPU)."""

from __future__ import annotations

import warnings

import torch


def init_megatron(tp: int, *, seed: int = 1234) -> None:
    """Process group over gloo, megatron-core model parallel state with TP = ``tp``, CPU shim, seeds."""
    warnings.filterwarnings("ignore")
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_seed, enable_cpu_megatron

    enable_cpu_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    cpu_model_parallel_seed(seed)


def close_megatron() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def init_normal(std: float = 0.5):
    """Megatron ``init_method``: a function of the master weight, so every TP size draws the same global weight."""
    return lambda tensor: torch.nn.init.normal_(tensor, std=std)


def portable(obj):
    """Tensors as numpy arrays (pickled by value: torch would pass shared-memory handles that die with the
    worker). Nested dicts/lists/tuples are converted recursively; :func:`restore` undoes it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v) for v in obj)
    return obj


def restore(obj):
    import numpy as np

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: restore(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(restore(v) for v in obj)
    return obj
