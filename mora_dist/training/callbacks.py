"""A small callback protocol for DeepSpeed training loops (DeepSpeed has none); the ``transformers.Trainer``
adapter that runs the same callbacks is :mod:`mora_dist.training.hf_trainer`.

A raw loop::

    callbacks = CallbackList([ReMoRACallback(merge_every=2000), my_logger])
    callbacks.on_train_begin(engine)
    for batch in data:
        engine.backward(engine(**batch).loss)
        engine.step()
        callbacks.on_step_end(engine)
        if engine.global_steps % save_every == 0:
            callbacks.save_checkpoint(engine, save_dir)

A callback's ``on_step_end`` may return metrics; the list hands them to every callback's ``on_log``, so a
logging callback sees what a ReMoRA callback reports. ``save_checkpoint``/``load_checkpoint`` put every
callback's ``state_dict()`` into DeepSpeed's ``client_state``, so callback state and engine state are always
saved and restored together.

Spec: §3.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mora_dist.errors import MoRAConfigError
from mora_dist.training.residual_shards import load_residual_shards, save_residual_shards

logger = logging.getLogger(__name__)

CLIENT_STATE_KEY = "mora_callbacks"


def split_tensors(value: Any, tensors: dict[str, Any], path: str = "") -> Any:
    """``value`` with every tensor replaced by ``{"__tensor__": key}`` and stored in ``tensors[key]``, so the rest
    is JSON (the ReMoRA/ReLoRA callbacks keep each merged cycle's matrices in their state)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        tensors[path] = value.contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {k: split_tensors(v, tensors, f"{path}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    return value


def join_tensors(value: Any, tensors: dict[str, Any]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


class Callback:
    """Base class of training callbacks; every hook is optional.

    ``engine`` is a ``deepspeed.DeepSpeedEngine`` or anything with the same ``module``, ``optimizer``,
    ``lr_scheduler`` and ``global_steps`` attributes (the ``Trainer`` adapter passes such a view).
    Collective work in a hook must happen on every rank, since every rank runs every hook.
    """

    def on_train_begin(self, engine: Any) -> None:
        """Once, after the engine is built (and after a checkpoint is loaded)."""

    def on_step_end(self, engine: Any) -> dict[str, float] | None:
        """After every ``engine.step()`` that stepped the optimizer; returns metrics to log, or ``None``."""
        return None

    def on_log(self, engine: Any, metrics: dict[str, float]) -> None:
        """Metrics reported by any callback of the list at this step (tags such as ``remora/merges``)."""

    def on_save(self, engine: Any, client_state: dict[str, Any]) -> None:
        """Before a checkpoint is written; ``client_state`` is what DeepSpeed will store."""

    def on_load(self, engine: Any, client_state: dict[str, Any]) -> None:
        """After a checkpoint is loaded and this callback's ``load_state_dict`` ran."""

    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, floats, lists, strings) that resuming needs; stored with the checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class CallbackList(Callback):
    """Runs callbacks in order. Each callback's state is stored under a key made of its class name and its
    position, so two callbacks of the same class keep separate states."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"CallbackList takes Callback instances, got {type(cb).__name__}")

    def _keys(self) -> list[str]:
        return [f"{i}:{type(cb).__name__}" for i, cb in enumerate(self.callbacks)]

    def on_train_begin(self, engine: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(engine)

    def on_step_end(self, engine: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for cb in self.callbacks:
            metrics.update(cb.on_step_end(engine) or {})
        if metrics:
            self.on_log(engine, metrics)
        return metrics

    def on_log(self, engine: Any, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_log(engine, metrics)

    def on_save(self, engine: Any, client_state: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_save(engine, client_state)

    def on_load(self, engine: Any, client_state: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_load(engine, client_state)

    def state_dict(self) -> dict[str, Any]:
        return {key: cb.state_dict() for key, cb in zip(self._keys(), self.callbacks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in self._keys() if key not in state]
        if missing:
            raise MoRAConfigError(
                f"callback state has no entry for {missing} (saved: {sorted(state)}); build the CallbackList with "
                "the same callbacks, in the same order, as the run that wrote the checkpoint"
            )
        for key, cb in zip(self._keys(), self.callbacks):
            cb.load_state_dict(state[key])

    def save_checkpoint(self, engine: Any, save_dir: str, tag: str | None = None,
                        client_state: dict[str, Any] | None = None) -> None:
        """``engine.save_checkpoint`` with every callback's state in ``client_state``. Call on every rank."""
        client_state = dict(client_state or {})
        self.on_save(engine, client_state)
        client_state[CLIENT_STATE_KEY] = self.state_dict()
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state)
        save_residual_shards(engine.module, Path(save_dir) / (tag or f"global_step{engine.global_steps}"))

    def load_checkpoint(self, engine: Any, load_dir: str, tag: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """``engine.load_checkpoint`` then restore every callback; returns the rest of ``client_state``.

        Raises:
            MoRAConfigError: nothing was loaded, or the checkpoint holds no callback state.
        """
        path, client_state = engine.load_checkpoint(load_dir, tag=tag, **kwargs)
        if path is None:
            raise MoRAConfigError(f"load_dir={load_dir!r}, tag={tag!r}: no DeepSpeed checkpoint found there")
        load_residual_shards(engine.module, Path(path).parent if Path(path).is_file() else path)
        client_state = dict(client_state or {})
        if CLIENT_STATE_KEY not in client_state:
            raise MoRAConfigError(
                f"checkpoint {path!r} holds no callback state ({CLIENT_STATE_KEY!r}); save it with "
                "CallbackList.save_checkpoint"
            )
        self.load_state_dict(client_state.pop(CLIENT_STATE_KEY))
        self.on_load(engine, client_state)
        return client_state


class TrainerEngineView:
    """What callbacks read from an engine, for a ``Trainer`` run without DeepSpeed."""

    def __init__(self, module: Any, optimizer: Any, lr_scheduler: Any, global_steps: int) -> None:
        self.module, self.optimizer, self.lr_scheduler = module, optimizer, lr_scheduler
        self.global_steps = global_steps
