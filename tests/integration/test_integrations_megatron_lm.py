"""The Megatron-LM recipe (``mora_dist/megatron.py``): ``examples/megatron_pretrain_hook.py`` runs its three added
lines in megatron-core's pretrain sequence (DDP, ``get_megatron_optimizer``, micro-batches, finalize, step)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.helpers.workers import run_workers

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "megatron_pretrain_hook.py"


def _run_example() -> dict:
    spec = importlib.util.spec_from_file_location("megatron_pretrain_hook", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"history": module.main()}


def _bf16_run() -> dict:
    """The recipe under ``--bf16``: Float16Module, Megatron's Float16 optimizer with fp32 masters; ReMoRA every
    2 steps. Returns M (module and master) after the merge step."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from mora_dist import MoRAConfig, mora_layers
    from mora_dist.integrations.megatron_lm import MegatronReMoRA, mora_model_provider
    from mora_dist.parallel.cpu_shim import cpu_model_parallel_seed, enable_cpu_megatron
    from mora_dist.training import ReMoRACallback
    from mora_dist.training.optimizer_state import megatron as megatron_state

    spec = importlib.util.spec_from_file_location("megatron_pretrain_hook", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dist.init_process_group("gloo")
    enable_cpu_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    cpu_model_parallel_seed(1)
    model = mora_model_provider(module.model_provider, MoRAConfig(r_hat=8, mora_type=1,
                                                                  target_modules=["linear_qkv", "linear_fc2"]))()
    model.config.bf16, model.config.params_dtype = True, torch.bfloat16
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), Float16Module(model.config, model))
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-2, bf16=True), [ddp])
    remora = MegatronReMoRA(ReMoRACallback(merge_every=2, type_cycle=(1, 2), restart_warmup=0), [ddp], optimizer)
    data, out = module.batches(), {"merges": []}
    matrices = [layer.mora_M for _, layer in mora_layers(model)]
    for iteration in (1, 2):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        output, loss_func = module.forward_step(data, ddp)
        loss_func(output)[0].backward()
        model.config.finalize_model_grads_func([ddp])
        optimizer.step()
        out["before" if iteration == 1 else "after"] = max(float(M.abs().max()) for M in matrices)
        out["merges"].append((remora.step(iteration) or {}).get("remora/merges"))
    out["module_M"] = max(float(M.abs().max()) for M in matrices)
    out["master_M"] = max(float(megatron_state.get_full(optimizer, M).abs().max()) for M in matrices)
    out["M_dtype"] = str(matrices[0].dtype)
    parallel_state.destroy_model_parallel()
    return out


def test_pretrain_hook_example_trains_and_merges_every_cycle():
    """The wrapped provider adapts the four projections before DDP; finalize_model_grads is installed and
    called; ``remora.step`` merges at iterations 4, 8, 12 with types 1, 2, 1 (a non-zero dW each time) and the
    loss goes down."""
    history = run_workers(_run_example, 1, timeout_s=240)[0]["history"]
    merges = {h["iteration"]: (h["remora/merges"], h["remora/type"]) for h in history if "remora/merges" in h}
    assert merges == {4: (1.0, 1.0), 8: (2.0, 2.0), 12: (3.0, 1.0)}
    assert all(h["remora/delta_norm"] > 0 for h in history if "remora/merges" in h)
    assert history[-1]["loss"] < history[0]["loss"] - 0.05


def test_remora_under_bf16_zeroes_m_in_the_module_and_the_fp32_master():
    """``--bf16``: Float16Module and Megatron's Float16 optimizer (fp32 masters). The merge at iteration 2 leaves
    M = 0 in the module and in the optimizer's master (a master left alone would copy the old M back at the next
    step); M itself stays fp32 under Float16Module."""
    out = run_workers(_bf16_run, 1, timeout_s=240)[0]
    assert out["merges"] == [None, 1.0]
    assert out["after"] > 0 and out["module_M"] == 0.0 and out["master_M"] == 0.0
    assert out["M_dtype"] == "torch.float32"
