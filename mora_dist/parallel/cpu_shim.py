"""Run megatron-core on CPU (tests, CPU demos): a CPU RNG tracker and a device lookup, only when CUDA is absent.

megatron-core assumes CUDA in three places that matter for small CPU runs: the tensor-parallel RNG tracker
(``get_cuda_rng_tracker().fork()`` around dropout and initialisation saves and restores CUDA RNG states),
``torch.cuda.current_device()`` (e.g. the rotary embedding moves its table there) and ``torch.cuda.synchronize()``
(``dist_checkpointing`` saves). Nothing is patched on import; :func:`enable_cpu_megatron` patches them, and only
when ``torch.cuda.is_available()`` is false, so it is a no-op on a GPU machine. Build models with
:func:`cpu_model_parallel_kwargs` (``use_cpu_initialization=True``, ``gradient_accumulation_fusion=False``)
and pass an explicit attention mask (megatron's default causal mask is built on ``"cuda"``).

Spec: §4.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

_ENABLED = False


def cpu_model_parallel_kwargs() -> dict[str, Any]:
    """``TransformerConfig``/``ModelParallelConfig`` fields megatron-core needs on CPU (no fused CUDA kernels)."""
    return dict(
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )


def _make_cpu_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's named RNG states kept as CPU generator states (same seeds, same ``fork`` contract)."""

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise ValueError(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def enable_cpu_megatron() -> bool:
    """Let megatron-core run on CPU; returns whether anything was patched (False when CUDA is available).

    Installs a CPU RNG tracker as megatron's tracker and makes ``torch.cuda.current_device()`` answer ``"cpu"``.
    Idempotent. Call it once per process, before building the model.
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = _make_cpu_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # megatron moves tables with .to(device=torch.cuda.current_device()); on CPU that device is "cpu".
    torch.cuda.current_device = lambda: "cpu"
    # dist_checkpointing's writer synchronises the device before copying tensors; on CPU there is nothing to wait for.
    torch.cuda.synchronize = lambda device=None: None
    _ENABLED = True
    logger.info("megatron-core CPU mode: CPU RNG tracker and device lookup installed")
    return True


def cpu_model_parallel_seed(seed: int) -> None:
    """``model_parallel_cuda_manual_seed`` for CPU: default state ``seed``, tensor-parallel state
    ``seed + 2718 + tp_rank``, as megatron does on GPU."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(
        mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + parallel_state.get_tensor_model_parallel_rank()
    )
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
