"""The callback protocol (ordering, metrics to loggers, state in checkpoints) and the transformers.Trainer adapter."""

import json
import os

import pytest
import torch
import transformers

from mora_dist import MoRAConfig, apply_mora, mora_layers
from mora_dist.errors import MoRAConfigError
from mora_dist.training.callbacks import Callback, CallbackList, TrainerEngineView
from mora_dist.training.hf_trainer import TrainerCallbackAdapter
from mora_dist.training.remora import ReMoRACallback
from tests.helpers.models import TINY_VOCAB, tiny_llama
from tests.helpers.workers import run_workers


class Recorder(Callback):
    """Records hook calls into a shared list; reports a metric every ``every`` steps."""

    def __init__(self, name, calls, every=0):
        self.name, self.calls, self.every, self.count = name, calls, every, 0

    def on_train_begin(self, engine):
        self.calls.append((self.name, "begin"))

    def on_step_end(self, engine):
        self.count += 1
        self.calls.append((self.name, "step", engine.global_steps))
        if self.every and engine.global_steps % self.every == 0:
            return {f"{self.name}/count": float(self.count)}
        return None

    def on_log(self, engine, metrics):
        self.calls.append((self.name, "log", dict(metrics)))

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_callback_list_runs_in_order_and_hands_metrics_to_every_callback():
    calls = []
    callbacks = CallbackList([Recorder("a", calls, every=2), Recorder("b", calls)])
    engine = TrainerEngineView(None, None, None, 0)
    callbacks.on_train_begin(engine)
    for step in (1, 2):
        engine.global_steps = step
        callbacks.on_step_end(engine)
    assert calls == [
        ("a", "begin"), ("b", "begin"),
        ("a", "step", 1), ("b", "step", 1),
        ("a", "step", 2), ("b", "step", 2), ("a", "log", {"a/count": 2.0}), ("b", "log", {"a/count": 2.0}),
    ]


def test_callback_list_state_keeps_two_callbacks_of_one_class_apart():
    first = CallbackList([Recorder("a", []), Recorder("b", [])])
    first.callbacks[0].count, first.callbacks[1].count = 3, 5
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores must be plain data
    second = CallbackList([Recorder("a", []), Recorder("b", [])])
    second.load_state_dict(state)
    assert [cb.count for cb in second.callbacks] == [3, 5]
    with pytest.raises(MoRAConfigError, match="2:Recorder"):
        CallbackList([Recorder("a", []), Recorder("b", []), Recorder("c", [])]).load_state_dict(state)


def test_callback_list_rejects_non_callbacks():
    with pytest.raises(TypeError, match="function"):
        CallbackList([lambda engine: None])


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, TINY_VOCAB, (n, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(output_dir, callbacks, max_steps, resume_from=None):
    torch.manual_seed(0)
    model = apply_mora(tiny_llama(), MoRAConfig(r=4, target_modules="all-linear", mora_type=1))
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
        weight_decay=0.0, lr_scheduler_type="constant", optim="adamw_torch", save_strategy="steps", save_steps=2,
        report_to=[], use_cpu=True, logging_steps=100, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    adapter = TrainerCallbackAdapter(callbacks, trainer, resume_from=resume_from)
    trainer.add_callback(adapter)
    return trainer, model


def test_trainer_adapter_merges_logs_and_resumes_callback_state(tmp_path):
    """The same ReMoRA callback inside transformers.Trainer: merges at steps 2 and 4 land in the log history, M is
    zero after the last merge, the state is written with each checkpoint and a run resumed from checkpoint-2
    continues the cycle (type 2 after one merge, the second merge at 4) and ends with the same weights."""
    cb = ReMoRACallback(merge_every=2, type_cycle=(1, 2), restart_warmup=0)
    trainer, model = _trainer(tmp_path / "a", [cb], max_steps=4)
    trainer.train()
    merges = [h for h in trainer.state.log_history if "remora/merges" in h]
    assert [(h["step"], h["remora/merges"], h["remora/zeroed_fraction"]) for h in merges] == [(2, 1.0, 1.0),
                                                                                          (4, 2.0, 1.0)]
    assert cb.merged_steps == [2, 4]
    for _, layer in mora_layers(model):
        assert layer.mora_M.abs().max() == 0 and layer.mora_type == 1
    with open(os.path.join(tmp_path, "a", "checkpoint-2", TrainerCallbackAdapter.STATE_FILE)) as f:
        saved = json.load(f)
    assert saved["0:ReMoRACallback"]["merged_steps"] == [2] and saved["0:ReMoRACallback"]["type_index"] == 1

    resumed_cb = ReMoRACallback(merge_every=2, type_cycle=(1, 2), restart_warmup=0)
    checkpoint = str(tmp_path / "a" / "checkpoint-2")
    trainer2, model2 = _trainer(tmp_path / "b", [resumed_cb], max_steps=4, resume_from=checkpoint)
    trainer2.train(resume_from_checkpoint=checkpoint)
    assert resumed_cb.merged_steps == [2, 4]
    weights = dict(model.named_parameters())
    for name, p in model2.named_parameters():
        torch.testing.assert_close(p, weights[name], atol=1e-6, rtol=0, msg=name)


def test_trainer_adapter_refuses_a_missing_state_file(tmp_path):
    trainer, _ = _trainer(tmp_path, [ReMoRACallback(merge_every=2, restart_warmup=0)], max_steps=1,
                          resume_from=str(tmp_path))
    with pytest.raises(MoRAConfigError, match="mora_callbacks.json"):
        trainer.train()


def _deepspeed_trainer_worker(output_dir):
    from mora_dist.training.optimizer_state import deepspeed as zero_state
    from tests.helpers.workers import patch_deepspeed_for_cpu

    patch_deepspeed_for_cpu()
    torch.manual_seed(0)
    model = apply_mora(tiny_llama(), MoRAConfig(r=4, target_modules="all-linear", mora_type=1))
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
    }
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.0,
        lr_scheduler_type="constant", save_strategy="no", report_to=[], logging_steps=100, seed=0,
        disable_tqdm=True, deepspeed=ds_config, use_cpu=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    cb = ReMoRACallback(merge_every=2, type_cycle=(1, 2), restart_warmup=0)
    trainer.add_callback(TrainerCallbackAdapter([cb], trainer))
    trainer.train()
    engine = trainer.model_wrapped
    matrices = [layer.mora_M for _, layer in mora_layers(engine.module)]
    return {
        "engine": type(engine).__name__,
        "merged": cb.merged_steps,
        "master_max": max(float(zero_state.get_full(engine.optimizer, M).abs().max()) for M in matrices),
        "module_max": max(float(M.abs().max()) for M in matrices),
        "fractions": [h["remora/zeroed_fraction"] for h in trainer.state.log_history if "remora/merges" in h],
    }


def test_trainer_adapter_with_deepspeed_zero2_resets_the_master(tmp_path):
    """Inside transformers.Trainer with its DeepSpeed integration (ZeRO-2, 2 ranks) the callbacks get the real
    engine (``trainer.model_wrapped``) and the merge zeroes M's fp32 master and moments too. Catches an adapter
    that hands the callbacks the Trainer's wrapped optimizer instead of the engine, and a merge at the wrong
    Trainer step (DeepSpeed's and the Trainer's step counters both read 2 and 4 here)."""
    for r in run_workers(_deepspeed_trainer_worker, 2, str(tmp_path)):
        assert r["engine"] == "DeepSpeedEngine"
        assert r["merged"] == [2, 4] and r["fractions"] == [1.0, 1.0]
        assert r["master_max"] == 0.0 and r["module_max"] == 0.0
