"""ReMoRA with megatron-core's own optimizers (``training/megatron_state.py``): megatron DDP, ``Float16Module``,
``get_megatron_optimizer`` on a tiny GPTModel over gloo, CPU."""

import pytest
import torch

from tests.helpers.parallel_setup import (
    close_megatron,
    gpt_batch,
    init_megatron,
    megatron_mora_training,
    megatron_train_step,
)
from tests.helpers.workers import run_workers

MERGE, BATCH, SEQ, LR = 3, 4, 8, 1e-2


@torch.no_grad()
def _logits(ddp):
    ids, pos, mask, _ = gpt_batch(10**6, BATCH, SEQ)
    return ddp(ids, pos, mask).float()


def _remora(kind, *, mora_dtype="float32"):
    """Train to the merge at step MERGE, merge through ReMoRACallback, take one more step; report every copy."""
    from mora_dist.model import mora_layers
    from mora_dist.training.callbacks import CallbackList, TrainerEngineView
    from mora_dist.training.optimizer_state import megatron as megatron_state
    from mora_dist.training.remora import ReMoRACallback

    ddp, optimizer = megatron_mora_training(kind, lr=LR, mora_dtype=mora_dtype)
    engine = TrainerEngineView(ddp, optimizer, None, 0)
    callbacks = CallbackList([ReMoRACallback(merge_every=MERGE, type_cycle=(1, 2), restart_warmup=0)])
    callbacks.on_train_begin(engine)
    matrices = [layer.mora_M for _, layer in mora_layers(ddp)]
    out = {"M_dtype": {str(M.dtype) for M in matrices},
           "master_dtype": {str(megatron_state._locate(optimizer, M).master.dtype) for M in matrices
                            if megatron_state._locate(optimizer, M).master is not None}}
    metrics = {}
    for step in range(1, MERGE + 1):
        megatron_train_step(ddp, optimizer, step, BATCH, SEQ)
        engine.global_steps = step
        if step == MERGE:
            before = _logits(ddp)
            out["M_before"] = max(float(M.abs().max()) for M in matrices)
        metrics = callbacks.on_step_end(engine)
    out["metrics"] = metrics
    out["jump"] = float((_logits(ddp) - before).abs().max())
    out["logit_scale"] = float(before.abs().max())
    out["M_model"] = max(float(M.abs().max()) for M in matrices)
    out["M_master"] = max(float(megatron_state.get_full(optimizer, M).abs().max()) for M in matrices)
    keys = megatron_state.state_keys(optimizer, matrices[0])
    out["moment_keys"] = keys
    out["moments"] = max(float(megatron_state.get_full(optimizer, M, k).abs().max()) for M in matrices for k in keys)
    megatron_train_step(ddp, optimizer, MERGE + 1, BATCH, SEQ)
    out["M_after_step"] = max(float(M.abs().max()) for M in matrices)
    return out


def _refused(kind):
    """A merge whose optimizer does not hold one M (frozen before the optimizer was built) must change nothing."""
    from mora_dist.errors import MoRAError
    from mora_dist.model import mora_layers
    from mora_dist.training.callbacks import TrainerEngineView
    from mora_dist.training.remora import ReMoRACallback

    ddp, optimizer = megatron_mora_training(kind, lr=LR, freeze_first_M=True)
    engine = TrainerEngineView(ddp, optimizer, None, 0)
    callback = ReMoRACallback(merge_every=MERGE, type_cycle=(1, 2), restart_warmup=0)
    callback.on_train_begin(engine)
    for step in range(1, MERGE + 1):
        megatron_train_step(ddp, optimizer, step, BATCH, SEQ)
    engine.global_steps = MERGE
    layers = [layer for _, layer in mora_layers(ddp)]
    snapshot = [(layer.base_layer.weight.detach().clone(), layer.mora_M.detach().clone()) for layer in layers]
    try:
        callback.on_step_end(engine)
        error = None
    except MoRAError as exc:
        error = str(exc)
    unchanged = all(torch.equal(layer.base_layer.weight, W) and torch.equal(layer.mora_M, M)
                    for layer, (W, M) in zip(layers, snapshot))
    return {"error": error, "unchanged": unchanged, "merges": callback.merges,
            "M_trained": max(float(M.abs().max()) for _, M in snapshot[1:]),
            "type": [layer.mora_type for layer in layers]}


def _dp1_worker():
    init_megatron(1)
    out = {"float16": _remora("float16"), "fp32": _remora("fp32"), "refused": _refused("float16")}
    close_megatron()
    return out


def _dp2_worker():
    init_megatron(1)
    out = {"distributed": _remora("distributed"), "distributed_bf16_M": _remora("distributed", mora_dtype="bfloat16"),
           "refused": _refused("distributed")}
    close_megatron()
    return out


@pytest.fixture(scope="module")
def runs():
    (dp1,) = run_workers(_dp1_worker, 1)
    dp2 = run_workers(_dp2_worker, 2)
    return {"dp1": dp1, "dp2": dp2}


def _cases(runs):
    yield "float16", runs["dp1"]["float16"]
    yield "fp32", runs["dp1"]["fp32"]
    for rank, r in enumerate(runs["dp2"]):
        yield f"distributed/rank{rank}", r["distributed"]
        yield f"distributed_bf16_M/rank{rank}", r["distributed_bf16_M"]


def test_remora_merge_resets_model_and_main_params(runs):
    """ReMoRA under Float16OptimizerWithFloat16Params (DP=1), DistributedOptimizer (DP=2) and FP32Optimizer: the
    output is continuous across the merge, M and its Adam moments are zero in the model and in the fp32 main
    params (whichever DP shard holds them), and one step later every |M| <= lr (a single Adam update from zero,
    not the old M plus one). Catches a merge that zeroes only the module's M: megatron copies the main params back
    at the next step, counting dW twice (with mora_dtype="bfloat16" M has a separate fp32 main copy)."""
    for name, r in _cases(runs):
        assert r["metrics"]["remora/merges"] == 1.0 and r["metrics"]["remora/zeroed_fraction"] == 1.0, name
        assert r["M_before"] > 2 * LR, (name, r["M_before"])  # trained well past one update
        # bf16 logits: the merged bf16 W differs from W + adapter by rounding only.
        tol = 1e-5 if name == "fp32" else 2e-2 * r["logit_scale"]
        assert r["jump"] <= tol, (name, r["jump"], r["logit_scale"])
        assert r["M_model"] == 0.0 and r["M_master"] == 0.0 and r["moments"] == 0.0, (name, r)
        assert r["moment_keys"] == ["exp_avg", "exp_avg_sq"], name
        assert 0.0 < r["M_after_step"] <= LR * (1 + 1e-6), (name, r["M_after_step"])


def test_m_stays_float32_under_float16module(runs):
    """megatron-core's Float16Module casts the model to bf16; M (mora_dtype float32) and its main copy stay fp32,
    while an explicit mora_dtype="bfloat16" M gets megatron's fp32 main copy like any bf16 parameter."""
    for name, r in _cases(runs):
        expected = "torch.bfloat16" if "bf16_M" in name else "torch.float32"
        assert r["M_dtype"] == {expected}, (name, r["M_dtype"])
        assert r["master_dtype"] <= {"torch.float32"}, (name, r["master_dtype"])
    assert runs["dp2"][0]["distributed"]["master_dtype"] | runs["dp2"][1]["distributed"]["master_dtype"]


def test_refused_merge_changes_nothing(runs):
    """A merge whose optimizer does not hold an adapter matrix fails before it changes anything: W and every M
    are as they were (they were changed first, then the optimizer lookup failed, before this fix)."""
    for r in [runs["dp1"]["refused"], *(x["refused"] for x in runs["dp2"])]:
        assert r["error"] is not None and "decoder.layers.0.self_attention.linear_qkv.mora_M" in r["error"], r
        assert r["unchanged"] and r["merges"] == 0 and r["M_trained"] > 0, r
        assert set(r["type"]) == {1}, r  # the type did not advance either
