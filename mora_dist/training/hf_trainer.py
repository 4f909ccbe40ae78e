"""``transformers.Trainer`` runs the callbacks of :mod:`mora_dist.training.callbacks` through
:class:`TrainerCallbackAdapter`. Apart from the callback protocol because ``transformers.trainer_utils`` is heavy to
import (it loads PEFT): a DeepSpeed or Megatron loop never pays for it.

Spec: §3.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import transformers
from safetensors.torch import load_file, save_file

from mora_dist.errors import MoRAConfigError
from mora_dist.training.callbacks import Callback, CallbackList, TrainerEngineView, join_tensors, split_tensors


class TrainerCallbackAdapter(transformers.TrainerCallback):
    """Runs :class:`Callback` objects inside ``transformers.Trainer``.

    With the Trainer's DeepSpeed integration the callbacks get the real engine (``trainer.model_wrapped``);
    otherwise a :class:`TrainerEngineView` of the model, optimizer, scheduler and ``state.global_step``.
    At every Trainer checkpoint the callbacks' state is written to ``<checkpoint>/mora_callbacks.json``;
    pass ``resume_from`` (the same folder given to ``trainer.train(resume_from_checkpoint=...)``) to restore it.
    The Trainer's own ``ExportableState`` mechanism cannot be used: it rebuilds callbacks from JSON arguments.

    Args:
        callbacks: the callbacks, run in order.
        trainer: the ``Trainer`` (needed to reach its DeepSpeed engine and output folder); or call ``bind``.
        resume_from: a Trainer checkpoint folder to restore the callbacks' state from at ``on_train_begin``.
    """

    STATE_FILE = "mora_callbacks.json"
    TENSORS_FILE = "mora_callbacks.safetensors"  # tensors of the state (kept merge cycles), beside the JSON

    def __init__(self, callbacks: Iterable[Callback] | CallbackList, trainer: Any = None, *,
                 resume_from: str | None = None) -> None:
        self.callbacks = callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks)
        self.trainer = trainer
        self.resume_from = resume_from

    def bind(self, trainer: Any) -> TrainerCallbackAdapter:
        self.trainer = trainer
        return self

    def _engine(self, state: Any, model: Any, optimizer: Any, lr_scheduler: Any) -> Any:
        wrapped = getattr(self.trainer, "model_wrapped", None)
        if wrapped is not None and hasattr(wrapped, "global_steps") and hasattr(wrapped, "optimizer"):
            return wrapped
        return TrainerEngineView(model, optimizer, lr_scheduler, state.global_step)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.resume_from is not None:
            path = os.path.join(self.resume_from, self.STATE_FILE)
            if not os.path.isfile(path):
                raise MoRAConfigError(f"resume_from={self.resume_from!r} has no {self.STATE_FILE}; pass a folder "
                                      "written by a Trainer run that used TrainerCallbackAdapter")
            with open(path) as f:
                saved = json.load(f)
            tensors_path = os.path.join(self.resume_from, self.TENSORS_FILE)
            if os.path.isfile(tensors_path):
                saved = join_tensors(saved, load_file(tensors_path))
            self.callbacks.load_state_dict(saved)
        self.callbacks.on_train_begin(self._engine(state, model, optimizer, lr_scheduler))

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        metrics = self.callbacks.on_step_end(self._engine(state, model, optimizer, lr_scheduler))
        if metrics:
            state.log_history.append({"step": state.global_step, **metrics})

    def on_save(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.callbacks.on_save(self._engine(state, model, optimizer, lr_scheduler), {})
        if not state.is_world_process_zero:
            return
        prefix = transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
        folder = os.path.join(args.output_dir, f"{prefix}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        tensors: dict[str, Any] = {}
        saved = split_tensors(self.callbacks.state_dict(), tensors)
        if tensors:  # written first: the JSON, replaced last, names them
            tmp = os.path.join(folder, self.TENSORS_FILE + ".tmp")
            save_file(tensors, tmp)
            os.replace(tmp, os.path.join(folder, self.TENSORS_FILE))
        tmp = os.path.join(folder, self.STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(saved, f)
        os.replace(tmp, os.path.join(folder, self.STATE_FILE))
