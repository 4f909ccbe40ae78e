"""megatron-core's own optimizers and ``DistributedDataParallel`` on CPU over gloo (``parallel/cpu_shim.py``)."""

import pytest
import torch

from tests.helpers.parallel_setup import (
    close_megatron,
    gpt_batch,
    init_megatron,
    megatron_train_step,
    portable,
    restore,
    tiny_gpt,
)
from tests.helpers.workers import run_workers

STEPS, BATCH, SEQ, LR = 3, 4, 8, 1e-2


def _megatron_train(kind):
    """Train STEPS steps with megatron DDP + ``get_megatron_optimizer``; each DP rank takes its half of the batch."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    bf16, distributed = kind != "fp32", kind == "bf16_distributed"
    torch.manual_seed(0)
    model = tiny_gpt(bf16=bf16)
    if bf16:
        model = Float16Module(model.config, model)
    ddp = DistributedDataParallel(model.config if not bf16 else model.module.config,
                                  DistributedDataParallelConfig(use_distributed_optimizer=distributed), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(lr=LR, weight_decay=0.0, bf16=bf16, use_distributed_optimizer=distributed, clip_grad=1.0),
        [ddp])
    losses, norms = [], []
    for step in range(STEPS):
        loss, norm = megatron_train_step(ddp, optimizer, step, BATCH, SEQ)
        losses.append(loss)
        norms.append(norm)
    inner = model.module if bf16 else model
    return {"losses": losses, "norms": norms, "types": [type(o).__name__ for o in optimizer.chained_optimizers],
            "params": {n: p.detach().float().clone() for n, p in inner.named_parameters()}}


def _reference_fp32():
    """The same model trained on the full batch by plain ``torch.optim.AdamW`` with the same clipping."""
    torch.manual_seed(0)
    model = tiny_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    norms = []
    for step in range(STEPS):
        ids, pos, mask, labels = gpt_batch(step, BATCH, SEQ)
        optimizer.zero_grad()
        model(ids, pos, mask, labels=labels).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
    return {"norms": norms, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _worker():
    init_megatron(1)
    out = {kind: _megatron_train(kind) for kind in ("fp32", "bf16_float16", "bf16_distributed")}
    out["reference"] = _reference_fp32()
    close_megatron()
    return portable(out)


def test_megatron_optimizers_train_on_cpu_at_dp2():
    """``get_megatron_optimizer`` builds and steps ``FP32Optimizer``, ``Float16OptimizerWithFloat16Params`` and
    ``DistributedOptimizer`` (each inside a ``ChainedOptimizer``) on CPU at DP=2. fp32 equals plain AdamW on the
    full batch (catches a grad reduction summed instead of averaged, a clip on a wrong norm); the distributed
    optimizer's sharded update plus all-gather gives every rank the same parameters as the unsharded one."""
    ranks = [restore(r) for r in run_workers(_worker, 2)]
    ref = ranks[0]["reference"]
    for r in ranks:
        assert r["fp32"]["types"] == ["FP32Optimizer"]
        assert r["bf16_float16"]["types"] == ["Float16OptimizerWithFloat16Params"]
        assert r["bf16_distributed"]["types"] == ["DistributedOptimizer"]
        assert r["fp32"]["norms"] == pytest.approx(ref["norms"], rel=1e-5)
        for name, value in ref["params"].items():
            torch.testing.assert_close(r["fp32"]["params"][name], value, rtol=1e-4, atol=1e-5)
            # bf16 weights follow the fp32 run up to rounding; Adam may flip the sign of a near-zero gradient's
            # update, which moves an entry by at most 2 * lr per step.
            diff = (r["bf16_distributed"]["params"][name] - value).abs()
            assert float(diff.max()) <= 2 * STEPS * LR and float(diff.mean()) < 2e-3, (name, diff.max(), diff.mean())
            # Reduce-scatter and all-reduce may round the bf16 gradient sum differently: one bf16 ulp at most.
            torch.testing.assert_close(r["bf16_distributed"]["params"][name],
                                       r["bf16_float16"]["params"][name], rtol=1e-2, atol=1e-6)
            torch.testing.assert_close(r["bf16_distributed"]["params"][name],
                                       ranks[0]["bf16_distributed"]["params"][name], rtol=0, atol=0)
