"""Run megatron-core on CPU (tests, CPU demos): a CPU RNG tracker, a device lookup and CPU-capable optimizers,
only when CUDA is absent.

megatron-core assumes CUDA in places that matter for small CPU runs: the tensor-parallel RNG tracker
(``get_cuda_rng_tracker().fork()`` around dropout and initialisation saves and restores CUDA RNG states),
``torch.cuda.current_device()`` (e.g. the rotary embedding moves its table there), ``torch.cuda.synchronize()``
(``dist_checkpointing`` saves) and its optimizers: ``MixedPrecisionOptimizer``/``FP32Optimizer`` allocate
their loss-scale and overflow flags with ``device='cuda'``, ``Float16OptimizerWithFloat16Params`` and
``DistributedOptimizer`` sort parameters by ``param.type()`` against ``'torch.cuda.*Tensor'`` names (and refuse
anything else), the grad-norm/clip helpers of ``optimizer/clip_grads.py`` allocate on ``'cuda'`` and the
distributed optimizer's checkpoint gather/scatter moves shards there. Those constructors, helpers and checkpoint
methods run under :class:`_CudaAsCpu`, a ``TorchFunctionMode`` scoped to the call, which
allocates on the CPU and names CPU tensors as their CUDA types; the optimizer step itself (``torch.optim.AdamW``,
megatron's fallback without Apex/Transformer Engine) runs unpatched. Nothing is patched on import;
:func:`enable_cpu_megatron` patches, and only when ``torch.cuda.is_available()`` is false, so it is a no-op on
a GPU machine. The pipeline schedules allocate their token counter with ``device="cuda"`` and the MoE token
:func:`_patch_megatron_schedules` gives them a ``torch`` namespace whose ``zeros`` allocates on the CPU. Build
models with
:func:`cpu_model_parallel_kwargs` (``use_cpu_initialization=True``, ``gradient_accumulation_fusion=False``)
and pass an explicit attention mask (megatron's default causal mask is built on ``"cuda"``).

Spec: §4.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

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
    # megatron-core is heavy: loaded only where megatron is used
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


class _CudaAsCpu(TorchFunctionMode):
    """Inside megatron-core's optimizer code on CPU: ``device='cuda'`` allocates on the CPU, ``t.cuda()`` is ``t``
    and ``t.type()`` names a CPU tensor by its CUDA type (``'torch.cuda.BFloat16Tensor'``), which is what
    megatron's dtype dispatch compares against."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        return func(*args, **kwargs)


def _on_cpu(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _CudaAsCpu():
            return fn(*args, **kwargs)

    wrapper.__mora_cpu_shim__ = True
    return wrapper


def _patch_megatron_optimizers() -> None:
    """Run the CUDA-assuming constructors and grad-norm helpers of megatron-core's optimizers under
    :class:`_CudaAsCpu`. The helpers are patched where ``optimizer.py`` imported them (its callers use that name)."""
    from megatron.core.optimizer import distrib_optimizer  # megatron-core is heavy: loaded only where megatron is used

    # megatron-core is heavy: loaded only where megatron is used
    from megatron.core.optimizer import optimizer as moptimizer

    for owner, name in (
        (moptimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (moptimizer.FP32Optimizer, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "__init__"),
        # checkpoints: the gather/scatter of parameter state moves shards to 'cuda' unless it uses gloo
        (distrib_optimizer.DistributedOptimizer, "sharded_state_dict"),
        (distrib_optimizer.DistributedOptimizer, "load_state_dict"),
        (moptimizer, "get_grad_norm_fp32"),
        (moptimizer, "clip_grad_by_total_norm_fp32"),
        (moptimizer, "count_zeros_fp32"),
    ):
        fn = getattr(owner, name)
        if not getattr(fn, "__mora_cpu_shim__", False):
            setattr(owner, name, _on_cpu(fn))


class _CpuStream:
    """One stream for everything on CPU, where work runs in order: waits and events have nothing to wait for."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _CpuStream:
        return self

    def synchronize(self) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass


class _CudaOnCpu:
    """``torch.cuda`` as the patched megatron modules see it on CPU: streams are :class:`_CpuStream` (the MoE token
    dispatcher copies its split sizes on a side stream; the shared experts may overlap on one); every other name
    is ``torch.cuda``'s own."""

    _stream = _CpuStream()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    def Stream(self, *args: Any, **kwargs: Any) -> _CpuStream:  # noqa: N802 (torch.cuda.Stream's name)
        return self._stream

    def current_stream(self, device: Any = None) -> _CpuStream:
        return self._stream

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class _TorchOnCpu:
    """``torch`` as the patched megatron modules see it on CPU: ``torch.zeros(..., device="cuda")`` (the pipeline
    schedules' token counter, the MoE aux-loss tracker) allocates on the CPU and ``torch.cuda`` is
    :class:`_CudaOnCpu`; every other name is torch's own."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


def _patch_megatron_modules() -> None:
    """Give the pipeline schedules and the MoE modules (and only them) the :class:`_TorchOnCpu` namespace."""
    # megatron-core is heavy: loaded only where megatron is used
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import moe_utils, shared_experts, token_dispatcher

    for module in (schedules, moe_utils, shared_experts, token_dispatcher):
        if not isinstance(module.torch, _TorchOnCpu):
            module.torch = _TorchOnCpu()
    # Without Transformer Engine (never on CPU) moe_utils leaves te_general_gemm undefined, yet its router matmul
    # asks whether it is None: None sends it to torch's matmul.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if not getattr(token_dispatcher.maybe_move_tensor_to_cpu, "__mora_cpu_shim__", False):
        token_dispatcher.maybe_move_tensor_to_cpu = _split_sizes_to_host


def _split_sizes_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """megatron's ``maybe_move_tensor_to_cpu`` for tensors already on the CPU: the all-to-all dispatcher's split
    sizes become numpy arrays, as the device-to-host copy makes them on GPU (``all_to_all_single`` takes a
    sequence of ints, not a tensor)."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


_split_sizes_to_host.__mora_cpu_shim__ = True


def enable_cpu_megatron() -> bool:
    """Let megatron-core run on CPU; returns whether anything was patched (False when CUDA is available).

    Installs a CPU RNG tracker as megatron's tracker, makes ``torch.cuda.current_device()`` answer ``"cpu"`` and
    lets megatron-core's optimizers (``get_megatron_optimizer``: ``FP32Optimizer``,
    ``Float16OptimizerWithFloat16Params``, ``DistributedOptimizer``, ``ChainedOptimizer``) run on CPU tensors over
    gloo. Idempotent. Call it once per process, before building the model.
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    # megatron-core is heavy: loaded only where megatron is used
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = _make_cpu_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # megatron moves tables with .to(device=torch.cuda.current_device()); on CPU that device is "cpu".
    torch.cuda.current_device = lambda: "cpu"
    # dist_checkpointing's writer synchronises the device before copying tensors; on CPU there is nothing to wait for.
    torch.cuda.synchronize = lambda device=None: None
    _patch_megatron_optimizers()
    _patch_megatron_modules()
    _ENABLED = True
    logger.info("megatron-core CPU mode: CPU RNG tracker and device lookup installed")
    return True


def cpu_model_parallel_seed(seed: int) -> None:
    """``model_parallel_cuda_manual_seed`` for CPU: default state ``seed``, tensor-parallel state
    ``seed + 2718 + tp_rank``, as megatron does on GPU."""
    from megatron.core import parallel_state  # megatron-core is heavy: loaded only where megatron is used

    # megatron-core is heavy: loaded only where megatron is used
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(
        mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + parallel_state.get_tensor_model_parallel_rank()
    )
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
