"""megatron-core ``dist_checkpointing`` of MoRA models (``parallel/checkpointing.py``): a base checkpoint into a
MoRA model, and an exact resume under the distributed optimizer with ReMoRA merges (gloo, 2 ranks, CPU)."""

import os

import torch

from tests.helpers.parallel_setup import (
    MORA_TARGETS,
    close_megatron,
    gpt_batch,
    init_megatron,
    megatron_mora_training,
    megatron_train_step,
    tiny_gpt,
)
from tests.helpers.workers import run_workers

MERGE, SAVE_AT, STEPS = 2, 3, 6


@torch.no_grad()
def _logits(model):
    ids, pos, mask, _ = gpt_batch(10**6, 4, 8)
    return model(ids, pos, mask).float()


def _base_into_mora(folder):
    """A plain GPTModel checkpoint, loaded into a MoRA model built from other weights."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from mora_dist import MoRAConfig, apply_mora
    from mora_dist.model import mora_layers
    from mora_dist.training.callbacks import TrainerEngineView
    from mora_dist.training.dist_checkpoint import load_checkpoint

    torch.manual_seed(0)
    base = tiny_gpt()
    os.makedirs(folder, exist_ok=True)
    dist_checkpointing.save(base.sharded_state_dict(), folder)  # megatron's own save: no adapter keys
    torch.manual_seed(1)
    model = tiny_gpt()
    apply_mora(model, MoRAConfig(r=4, target_modules=MORA_TARGETS, mora_type=6))
    try:
        dist_checkpointing.load(model.sharded_state_dict(), folder)
        plain_error = None
    except CheckpointException as exc:  # wrapping megatron's KeyError; a BaseException, not an Exception
        plain_error = f"{type(exc).__name__}: {exc}"
    load_checkpoint(folder, TrainerEngineView(model, None, None, 0))
    return {"plain_error": plain_error, "diff": float((_logits(model) - _logits(base)).abs().max()),
            "M_max": max(float(layer.mora_M.abs().max()) for _, layer in mora_layers(model))}


def _run(folder=None, *, resume=False):
    """ReMoRA (merges every MERGE steps) under bf16 + DistributedOptimizer; save at SAVE_AT or resume from it."""
    from mora_dist.training.callbacks import CallbackList, TrainerEngineView
    from mora_dist.training.dist_checkpoint import load_checkpoint, save_checkpoint
    from mora_dist.training.optimizer_state import megatron as megatron_state
    from mora_dist.training.remora import ReMoRACallback

    ddp, optimizer = megatron_mora_training("distributed", seed=7 if resume else 0)
    engine = TrainerEngineView(ddp, optimizer, None, 0)
    callbacks = CallbackList([ReMoRACallback(merge_every=MERGE, type_cycle=(1, 2), restart_warmup=0)])
    callbacks.on_train_begin(engine)
    out = {"losses": {}}
    if resume:
        load_checkpoint(folder, engine, callbacks)
        out["loaded_step"] = engine.global_steps
        out["adam_steps"] = megatron_state.adam_steps(optimizer)
    for step in range(engine.global_steps + 1, STEPS + 1):
        out["losses"][step] = megatron_train_step(ddp, optimizer, step)[0]
        engine.global_steps = step
        callbacks.on_step_end(engine)
        if step == SAVE_AT and folder is not None and not resume:
            save_checkpoint(folder, engine, callbacks)
    out["logits"] = _logits(ddp).sum().item()
    out["merged_steps"] = list(callbacks.callbacks[0].merged_steps)
    return out


def _worker(folder):
    init_megatron(1)
    out = {"base": _base_into_mora(f"{folder}/base"), "straight": _run(f"{folder}/resume"),
           "resumed": _run(f"{folder}/resume", resume=True)}
    close_megatron()
    return out


def test_base_checkpoint_loads_into_mora_and_resume_is_exact(tmp_path):
    """A base GPTModel checkpoint (no adapter keys) loads into a MoRA model: megatron-core's own load refuses the
    missing mora_M, ours leaves M at zero and the MoRA model computes the base model's logits. A checkpoint written
    at step 3 (after the merge at 2) under bf16 + DistributedOptimizer at DP=2 resumes to the uninterrupted run's
    losses bit for bit through the merges at 4 and 6: catches lost Adam moments or steps (megatron 0.16 restores
    torch AdamW's step from a placeholder, and shares one step tensor between parameters), a lost callback state
    (a merge replayed or skipped) and a lost ReMoRA type."""
    ranks = run_workers(_worker, 2, str(tmp_path))
    for r in ranks:
        assert r["base"]["plain_error"] is not None and "mora_M" in r["base"]["plain_error"]
        assert r["base"]["diff"] == 0.0 and r["base"]["M_max"] == 0.0, r["base"]
        straight, resumed = r["straight"], r["resumed"]
        assert straight["merged_steps"] == resumed["merged_steps"] == [2, 4, 6]
        assert resumed["loaded_step"] == SAVE_AT and resumed["adam_steps"] == [float(SAVE_AT)]
        assert straight["losses"][SAVE_AT + 1] != straight["losses"][SAVE_AT]
        assert {s: straight["losses"][s] for s in resumed["losses"]} == resumed["losses"]
        assert resumed["logits"] == straight["logits"]
