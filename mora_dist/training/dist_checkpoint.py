"""megatron-core ``dist_checkpointing`` for MoRA models: a checkpoint of the plain base model loads into a MoRA
model, and a MoRA training checkpoint (model, megatron optimizer with its distributed-optimizer shards, callback
state, step) resumes exactly.

megatron-core has no notion of an optional key: under its default strictness (``assume_ok_unexpected``) every
tensor the model's ``sharded_state_dict()`` asks for must be in the checkpoint, so the ``mora_M`` of a MoRA model
made from a base checkpoint cannot load. :func:`load_checkpoint` drops exactly the adapter entries (``mora_*``)
the checkpoint does not hold (``M`` keeps its value, zero for a fresh model) and leaves every other mismatch to
megatron-core's usual errors. A list of model chunks (virtual pipeline) is stored as ``model0``, ``model1``, ...
as Megatron-LM does; a single model as ``model``.

Spec: §4, §5.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mora_dist.errors import MoRAConfigError
from mora_dist.training.callbacks import CLIENT_STATE_KEY, CallbackList
from mora_dist.training.optimizer_state import megatron as megatron_state

logger = logging.getLogger(__name__)

_ADAPTER_PREFIX = "mora_"
# megatron-core 0.16's default distributed-optimizer format ("fully_sharded_model_space") is deprecated and
# refused by its own ShardedTensor checks, and "fully_reshardable" cannot load torch.optim.AdamW's per-parameter
# "step" (megatron's fallback without Apex/TE): "dp_reshardable" (resume at the same DP size) works with both.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _chunks(model: nn.Module | list[nn.Module]) -> dict[str, nn.Module]:
    """Checkpoint key -> the model under megatron's wrappers (as Megatron-LM's ``unwrap_model``)."""
    if isinstance(model, (list, tuple)):
        return {f"model{i}": _unwrap(chunk) for i, chunk in enumerate(model)}
    return {"model": _unwrap(model)}


def _tensor_keys(entry: Any) -> list[str]:
    """Checkpoint keys of a ``ShardedTensor`` or of the tensors a ``ShardedTensorFactory`` builds."""
    if hasattr(entry, "build") and hasattr(entry, "merge_fn"):
        built = entry.build()
        values = built.values() if isinstance(built, dict) else [built]
        return [key for value in values for key in _tensor_keys(value)]
    return [entry.key] if hasattr(entry, "key") else []


def drop_missing_adapter_keys(sharded_state_dict: dict, checkpoint_dir: str | os.PathLike) -> list[str]:
    """Remove from the model's ``sharded_state_dict`` (in place) every adapter entry (``mora_*``) whose tensors
    the checkpoint does not hold; returns the removed state-dict keys. Other entries are left to megatron-core."""
    from megatron.core import dist_checkpointing  # megatron-core is heavy: loaded only where megatron is used

    stored = set(dist_checkpointing.load_tensors_metadata(str(checkpoint_dir)))
    dropped = []
    for name in list(sharded_state_dict):
        if not name.rpartition(".")[2].startswith(_ADAPTER_PREFIX):
            continue
        keys = _tensor_keys(sharded_state_dict[name])
        if keys and not any(key in stored for key in keys):
            del sharded_state_dict[name]
            dropped.append(name)
    if dropped:
        logger.info("checkpoint %s holds no adapter tensors for %d entries (e.g. %s); they keep their values",
                    checkpoint_dir, len(dropped), dropped[0])
    return dropped


def save_checkpoint(checkpoint_dir: str | os.PathLike, engine: Any, callbacks: CallbackList | None = None) -> None:
    """Write ``engine.module`` (a model or list of chunks), ``engine.optimizer`` (a megatron optimizer; its
    ``sharded_state_dict``), ``engine.lr_scheduler`` and ``engine.global_steps``, and the callbacks' state, with
    ``dist_checkpointing.save``; atomically (a temporary folder renamed when every rank has written).
    Collective: call on every rank."""
    from megatron.core import dist_checkpointing  # megatron-core is heavy: loaded only where megatron is used

    state: dict[str, Any] = {}
    for key, chunk in _chunks(engine.module).items():
        state[key] = chunk.sharded_state_dict()
    if engine.optimizer is not None:
        state["optimizer"] = engine.optimizer.sharded_state_dict(_model_state(state),
                                                                metadata=_OPTIMIZER_METADATA)
        state["adam_steps"] = megatron_state.adam_steps(engine.optimizer)
    if getattr(engine, "lr_scheduler", None) is not None:
        state["lr_scheduler"] = engine.lr_scheduler.state_dict()
    state["global_steps"] = int(engine.global_steps)
    if callbacks is not None:
        client_state: dict[str, Any] = {}
        callbacks.on_save(engine, client_state)
        state[CLIENT_STATE_KEY] = {"callbacks": callbacks.state_dict(), **client_state}
    final = os.path.abspath(checkpoint_dir)
    tmp = final + ".tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(state, tmp)
    _barrier()
    if rank0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()


def load_checkpoint(checkpoint_dir: str | os.PathLike, engine: Any, callbacks: CallbackList | None = None,
                    *, load_optimizer: bool = True) -> dict[str, Any]:
    """Load a checkpoint into ``engine.module`` (and, if it holds them, the optimizer, scheduler, step and
    callbacks). A checkpoint of the plain base model loads into a MoRA model: the adapter entries it lacks keep
    their values. Returns the rest of the stored client state. Collective.

    Raises:
        MoRAConfigError: ``callbacks`` given but the checkpoint holds no callback state.
    """
    from megatron.core import dist_checkpointing  # megatron-core is heavy: loaded only where megatron is used

    path = str(checkpoint_dir)
    common = dist_checkpointing.load_common_state_dict(path)
    state: dict[str, Any] = {}
    dropped: dict[str, list[str]] = {}
    for key, chunk in _chunks(engine.module).items():
        state[key] = chunk.sharded_state_dict()
        dropped[key] = drop_missing_adapter_keys(state[key], path)
    with_optimizer = load_optimizer and engine.optimizer is not None and "optimizer" in common
    if with_optimizer:
        megatron_state.prepare_for_load(engine.optimizer)
        state["optimizer"] = engine.optimizer.sharded_state_dict(_model_state(state), is_loading=True,
                                                                metadata=_OPTIMIZER_METADATA)
    loaded = dist_checkpointing.load(state, path)
    for key, chunk in _chunks(engine.module).items():
        result = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if k not in dropped[key] and not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise MoRAConfigError(f"checkpoint {path!r} does not match the model: missing {missing}, "
                                  f"unexpected {result.unexpected_keys}")
    if with_optimizer:
        # megatron-core 0.16 copies into the main shards outside no_grad; an fp32 parameter's shard (M) is a
        # view of a leaf that requires grad, so the copy must not be recorded.
        with torch.no_grad():
            engine.optimizer.load_state_dict(loaded["optimizer"])
        megatron_state.set_adam_steps(engine.optimizer, common["adam_steps"])
    if getattr(engine, "lr_scheduler", None) is not None and "lr_scheduler" in common:
        engine.lr_scheduler.load_state_dict(common["lr_scheduler"])
    if "global_steps" in common:
        engine.global_steps = int(common["global_steps"])
    client_state = dict(common.get(CLIENT_STATE_KEY, {}))
    if callbacks is not None:
        if "callbacks" not in client_state:
            raise MoRAConfigError(f"checkpoint {path!r} holds no callback state; write it with "
                                  "mora_dist.training.dist_checkpoint.save_checkpoint(..., callbacks)")
        callbacks.load_state_dict(client_state.pop("callbacks"))
        callbacks.on_load(engine, client_state)
    return client_state


def _model_state(state: dict[str, Any]) -> dict[str, Any]:
    """What megatron's ``optimizer.sharded_state_dict`` walks to find each parameter's sharded tensor."""
    return {key: value for key, value in state.items() if key.startswith("model")}


def _unwrap(chunk: nn.Module) -> nn.Module:
    """The model under megatron's ``DistributedDataParallel``/``Float16Module`` (DDP would prefix its keys with
    ``module.``; both delegate ``load_state_dict`` without returning the key report)."""
    while isinstance(getattr(chunk, "module", None), nn.Module):
        chunk = chunk.module
    return chunk


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
