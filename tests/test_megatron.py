"""The Megatron-LM recipe (``mora_dist/megatron.py``): ``examples/megatron_pretrain_hook.py`` runs its three added
lines in megatron-core's pretrain sequence (DDP, ``get_megatron_optimizer``, micro-batches, finalize, step)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from distributed import run_workers

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "megatron_pretrain_hook.py"


def _run_example() -> dict:
    spec = importlib.util.spec_from_file_location("megatron_pretrain_hook", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"history": module.main()}


def _refusal() -> tuple[str, str]:
    """MegatronReMoRA on an optimizer with separate fp32 masters (bf16) is refused, naming the flags."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from mora_dist import MoRAConfig
    from mora_dist.megatron import MegatronReMoRA, mora_model_provider
    from mora_dist.parallel.cpu_shim import cpu_model_parallel_seed, enable_cpu_megatron
    from mora_dist.training import ReMoRACallback

    spec = importlib.util.spec_from_file_location("megatron_pretrain_hook", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dist.init_process_group("gloo")
    enable_cpu_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    cpu_model_parallel_seed(1)
    model = mora_model_provider(module.model_provider, MoRAConfig(r_hat=8, target_modules=["linear_qkv"]))()
    model.config.bf16, model.config.params_dtype = True, torch.bfloat16
    wrapped = Float16Module(model.config, model)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), wrapped)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-3, bf16=True), [ddp])
    try:
        MegatronReMoRA(ReMoRACallback(merge_every=2, restart_warmup=0), [ddp], optimizer)
    except Exception as exc:  # the parent checks type and message
        return type(exc).__name__, str(exc)
    finally:
        parallel_state.destroy_model_parallel()
    return "", ""


def test_pretrain_hook_example_trains_and_merges_every_cycle():
    """The wrapped provider adapts the four projections before DDP; finalize_model_grads is installed and
    called; ``remora.step`` merges at iterations 4, 8, 12 with types 1, 2, 1 (a non-zero dW each time) and the
    loss goes down."""
    history = run_workers(_run_example, 1, timeout_s=240)[0]["history"]
    merges = {h["iteration"]: (h["remora/merges"], h["remora/type"]) for h in history if "remora/merges" in h}
    assert merges == {4: (1.0, 1.0), 8: (2.0, 2.0), 12: (3.0, 1.0)}
    assert all(h["remora/delta_norm"] > 0 for h in history if "remora/merges" in h)
    assert history[-1]["loss"] < history[0]["loss"] - 0.05


def test_remora_with_fp32_masters_is_refused():
    kind, msg = run_workers(_refusal, 1, timeout_s=240)[0]
    assert kind == "MoRAConfigError"
    assert "Float16OptimizerWithFloat16Params" in msg and "--bf16" in msg and "without ReMoRA" in msg
