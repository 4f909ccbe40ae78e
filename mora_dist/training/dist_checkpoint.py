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



def _chunks(model: nn.Module | list[nn.Module]) -> dict[str, nn.Module]:
    """Checkpoint key -> the model under megatron's wrappers (as Megatron-LM's ``unwrap_model``)."""
    chunks = list(model) if isinstance(model, (list, tuple, nn.ModuleList)) else [model]
    if len(chunks) == 1:  # Megatron-LM's keys: "model" for one chunk, "model0", "model1", ... under VPP
        return {"model": _unwrap(chunks[0])}
    return {f"model{i}": _unwrap(chunk) for i, chunk in enumerate(chunks)}


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


def _trainable_sharded(engine: Any, model_state: dict[str, Any]) -> list[tuple[str, nn.Parameter, Any]]:
    """``(name, parameter, its ShardedTensor or factory)`` of every trainable parameter, in model order.

    Raises:
        MoRAConfigError: a trainable parameter the model's ``sharded_state_dict`` does not declare.
    """
    # megatron-core is heavy: loaded only where megatron is used
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    sharded, _ = extract_sharded_tensors_and_factories(model_state)
    by_data = {id(entry.data): entry for entry in nested_values(sharded)}
    out = []
    for key, chunk in _chunks(engine.module).items():
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) not in by_data:
                raise MoRAConfigError(f"trainable parameter {key}.{name} is not in the model's sharded_state_dict; "
                                      "its optimizer state cannot be checkpointed")
            out.append((f"{key}.{name}", param, by_data[id(param)]))
    return out


_STATE_PREFIX = "optimizer_model_space"
_MASTER = "master"
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")  # megatron's Adam (no AMSGrad)


def _optimizer_state(engine: Any, model_state: dict[str, Any], *, placeholders: bool) -> dict[str, Any]:
    """Each trainable parameter's fp32 master and Adam moments as sharded tensors laid out like the parameter
    itself (megatron's ``make_sharded_optimizer_tensor``), whatever the optimizer (FP32, Float16, distributed):
    the checkpoint is then independent of TP, PP and DP, which a resume at another layout reshards like the
    model. Values are full over the data-parallel group (:func:`get_full`, collective); ``placeholders``: empty
    tensors to load into."""
    # megatron-core is heavy: loaded only where megatron is used
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    out = {}
    for name, param, sharded in _trainable_sharded(engine, model_state):
        for key in (_MASTER, *_ADAM_KEYS):
            if placeholders:
                value = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            else:
                value = megatron_state.get_full(engine.optimizer, param, None if key == _MASTER else key)
                if value is None:  # before the first step: no moments yet
                    value = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            out[f"{name}.{key}"] = make_sharded_optimizer_tensor(sharded, value, prefix=f"{_STATE_PREFIX}.{key}")
    return out


def save_checkpoint(checkpoint_dir: str | os.PathLike, engine: Any, callbacks: CallbackList | None = None, *,
                    client_state: dict[str, Any] | None = None) -> None:
    """Write ``engine.module`` (a model or list of chunks), the optimizer state of its trainable parameters in
    model space (:func:`_optimizer_state`), ``engine.lr_scheduler``, ``engine.global_steps``, and the callbacks'
    state or ``client_state``, with ``dist_checkpointing.save``; atomically (a temporary folder renamed when every
    rank has written). The checkpoint loads at any TP / PP / DP layout. Collective: call on every rank."""
    from megatron.core import dist_checkpointing  # megatron-core is heavy: loaded only where megatron is used

    state: dict[str, Any] = {}
    for key, chunk in _chunks(engine.module).items():
        state[key] = chunk.sharded_state_dict()
    if engine.optimizer is not None:
        state["optimizer"] = _optimizer_state(engine, _model_state(state), placeholders=False)
        state["adam_steps"] = megatron_state.adam_steps(engine.optimizer)
    if getattr(engine, "lr_scheduler", None) is not None:
        state["lr_scheduler"] = engine.lr_scheduler.state_dict()
    state["global_steps"] = int(engine.global_steps)
    extra = dict(client_state or {})
    if callbacks is not None:
        callbacks.on_save(engine, extra)
        extra["callbacks"] = callbacks.state_dict()
    if extra:
        state[CLIENT_STATE_KEY] = extra
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
    callbacks), at any TP / PP / DP layout. A checkpoint of the plain base model loads into a MoRA model: the
    adapter entries it lacks keep their values. Returns the rest of the stored client state. Collective.

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
    with_optimizer = load_optimizer and engine.optimizer is not None and "adam_steps" in common
    trainable = _trainable_sharded(engine, _model_state(state)) if with_optimizer else []
    if with_optimizer:
        state["optimizer"] = _optimizer_state(engine, _model_state(state), placeholders=True)
    loaded = dist_checkpointing.load(state, path)
    for key, chunk in _chunks(engine.module).items():
        result = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if k not in dropped[key] and not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise MoRAConfigError(f"checkpoint {path!r} does not match the model: missing {missing}, "
                                  f"unexpected {result.unexpected_keys}")
    if with_optimizer:
        megatron_state.ensure_adam_state(engine.optimizer)
        values = loaded["optimizer"]
        for name, param, _ in trainable:
            megatron_state.set_full(engine.optimizer, param, values[f"{name}.{_MASTER}"])
            for key in _ADAM_KEYS:
                megatron_state.set_full(engine.optimizer, param, values[f"{name}.{key}"], key)
        megatron_state.set_adam_steps(engine.optimizer, common["adam_steps"])
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and "lr_scheduler" in common:
        scheduler.load_state_dict(common["lr_scheduler"])
        # a torch scheduler's current rate lives in its optimizer's param groups, which are not stored here
        if hasattr(scheduler, "get_last_lr") and hasattr(getattr(scheduler, "optimizer", None), "param_groups"):
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
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


def read_client_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The client state :func:`save_checkpoint` stored in ``checkpoint_dir``, read without a model or a process
    group (what an export needs of the run: the MoRA type reached, the kept merge cycles)."""
    from megatron.core import dist_checkpointing  # megatron-core is heavy: loaded only where megatron is used

    return dict(dist_checkpointing.load_common_state_dict(str(checkpoint_dir)).get(CLIENT_STATE_KEY, {}))


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
