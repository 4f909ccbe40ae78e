"""The training loop behind ``launch/pretrain.py``: steps, evaluation per source, metrics, checkpoints, resume.

A back end (:class:`~mora_dist.run.engine.Backend`: Hugging Face in :mod:`mora_dist.run.hf`, megatron-core in
:mod:`mora_dist.run.megatron`) builds the engine and computes the loss of a batch; the loop is the same for all.
Order within a step (the order ReMoRA's exactly-once merge relies on): ``engine.step()`` for every micro-batch,
``callbacks.on_step_end`` (merges), metrics, evaluation, checkpoint, then the preemption check
(:mod:`mora_dist.run.preemption`: a signalled run saves this step and stops). Spec: §3, §5.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mora_dist.data import eval_shard
from mora_dist.run.build import build_data
from mora_dist.run.checkpoint import load_latest, save_step_checkpoint
from mora_dist.run.config import RunConfig
from mora_dist.run.distributed import device
from mora_dist.run.engine import Backend, Engine
from mora_dist.run.failures import agree
from mora_dist.run.hf import HFBackend
from mora_dist.run.megatron.model import MegatronBackend
from mora_dist.run.megatron.native import NativeBackend
from mora_dist.run.preemption import Preempted, PreemptionGuard
from mora_dist.training.callbacks import CLIENT_STATE_KEY
from mora_dist.training.metrics import ProgressLine, make_metric_logger, perplexity

logger = logging.getLogger(__name__)


def make_backend(cfg: RunConfig) -> Backend:
    """The back end the config names: Hugging Face + DeepSpeed, megatron-core + DeepSpeed, or megatron-native."""
    if cfg.model.backend == "megatron" and cfg.deepspeed is None:
        return NativeBackend(cfg)
    if cfg.model.backend == "megatron":
        return MegatronBackend(cfg)
    return HFBackend()


@torch.no_grad()
def evaluate_sets(engine: Engine, backend: Backend, eval_sets: dict[str, list[list[int]]], *,
                  micro_batch_size: int) -> dict[str, float]:
    """Token-weighted loss on every source's held-out blocks, split over data-parallel ranks.

    Every rank runs the same number of forwards (``eval_shard`` pads the shorter shares with batches whose
    result is discarded): under ZeRO-3 each forward gathers parameters collectively. The loss counts the real
    blocks only, so it equals the single-process loss over the same blocks.
    """
    engine.eval()
    sums = []
    for blocks in eval_sets.values():
        loss_sum, count = 0.0, 0
        for batch, real in eval_shard(blocks, dp_rank=backend.dp_rank, dp_size=backend.dp_size,
                                      micro_batch_size=micro_batch_size):
            loss, n = backend.loss(engine, batch)
            if real:
                loss_sum, count = loss_sum + loss.item() * n, count + n
        sums.extend([loss_sum, count])
    engine.train()
    t = torch.tensor(sums, dtype=torch.float64, device=device())
    dist.all_reduce(t, group=backend.dp_group)
    out = {f"eval/{name}/loss": float(t[2 * i] / max(t[2 * i + 1], 1)) for i, name in enumerate(eval_sets)}
    out["eval/loss"] = float(t[0::2].sum() / max(t[1::2].sum(), 1))
    out["eval/perplexity"] = perplexity(out["eval/loss"])
    return out


def eval_at_start(cfg: RunConfig) -> bool:
    """Whether a new run evaluates before its first step (the starting loss): ``training.eval_at_start``, by
    default on for continual pretraining (``model.pretrained``) and whenever ``eval_interval`` is set."""
    t = cfg.training
    return t.eval_at_start if t.eval_at_start is not None else bool(t.eval_interval or cfg.model.pretrained)


class Trainer:
    """Runs ``training.max_steps`` optimizer steps from scratch or from the latest checkpoint."""

    def __init__(self, cfg: RunConfig, engine: Engine, callbacks: Any, backend: Backend, *, resume: bool) -> None:
        self.cfg, self.engine, self.callbacks, self.backend = cfg, engine, callbacks, backend
        out = Path(cfg.training.output_dir)
        self.ckpt_dir = out / "checkpoints"
        self.rank = dist.get_rank()
        self.log_dir = cfg.logging.log_dir or str(out / "tensorboard")
        self.step, self.tokens_seen = 0, 0
        self.stream_states = None  # this rank's streaming readers' positions in the checkpoint resumed from
        if resume:
            state = load_latest(engine, self.ckpt_dir)
            self.stream_states = self._saved_stream_states(state.pop("rank_state"))
            self.callbacks.load_state_dict(state.pop(CLIENT_STATE_KEY))
            self.callbacks.on_load(engine, state)
            self.step = int(state["step"])
            self.tokens_seen = int(state["tokens_seen"])
            if state["samples_consumed"] != self.step * cfg.training.global_batch_size:
                raise RuntimeError(f"checkpoint at step {self.step} consumed {state['samples_consumed']} samples, "
                                   f"not step x global_batch_size; resume with the same training batch sizes")
        # A resumed run first drops what the interrupted one logged after this checkpoint (each step once).
        self.metrics = make_metric_logger(rank=self.rank, enabled=cfg.logging.tensorboard, log_dir=self.log_dir,
                                          resume_step=self.step if resume else None)
        self.start_step = self.step
        self.last: dict[str, float] = {}  # the latest value of every logged figure, for the summary
        self.preemption = PreemptionGuard(cfg.training.exit_signals)

    def _rank_state(self, data) -> dict[str, Any]:
        return {"dp_rank": self.backend.dp_rank, "dp_size": self.backend.dp_size,
                "streams": data.train.reader_states()}

    def _saved_stream_states(self, saved: dict[str, Any] | None) -> list[dict | None] | None:
        """The saved reader positions if they are this rank's (same data-parallel place); otherwise the readers
        fast-forward from the global sample index, as for a checkpoint written without them."""
        if saved is None:
            return None
        if (saved["dp_rank"], saved["dp_size"]) != (self.backend.dp_rank, self.backend.dp_size):
            logger.warning("checkpoint's stream positions were saved at data-parallel rank %s of %s, this rank is "
                           "%s of %s: streaming sources fast-forward instead", saved["dp_rank"], saved["dp_size"],
                           self.backend.dp_rank, self.backend.dp_size)
            return None
        return saved["streams"]

    def _client_state(self) -> dict[str, Any]:
        state = {"step": self.step, "samples_consumed": self.step * self.cfg.training.global_batch_size,
                 "tokens_seen": self.tokens_seen}
        self.callbacks.on_save(self.engine, state)
        state[CLIENT_STATE_KEY] = self.callbacks.state_dict()
        return state

    def _mean_over_dp(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device())  # NCCL reduces device tensors only
        dist.all_reduce(t, group=self.backend.dp_group)
        return (t / self.backend.dp_size).tolist()

    def evaluate(self, eval_sets: dict[str, list[list[int]]]) -> dict[str, float]:
        return evaluate_sets(self.engine, self.backend, eval_sets,
                             micro_batch_size=self.cfg.training.micro_batch_size)

    def run(self, tokenizer) -> None:
        cfg, t, engine = self.cfg, self.cfg.training, self.engine
        data = build_data(cfg, tokenizer, dp_rank=self.backend.dp_rank, dp_size=self.backend.dp_size,
                          start_sample=self.step * t.global_batch_size, stream_states=self.stream_states)
        self.callbacks.on_train_begin(engine)
        accum = engine.gradient_accumulation_steps()
        progress = ProgressLine(total_steps=t.max_steps, start_step=self.step,
                                enabled=self.rank == 0 and cfg.logging.progress == "line")
        if self.step == 0 and eval_at_start(cfg):
            logs = self.evaluate(data.eval_sets)
            self.metrics.log_dict(logs, 0)
            self.last.update(logs)
            logger.info("step 0 | %s", _eval_text(logs, data.eval_sets))
        tokens_per_step = t.global_batch_size * cfg.data.seq_len
        try:
            self._train(data, accum, progress, tokens_per_step)
        except Preempted:
            raise  # the handlers stay: the launcher's own SIGTERM may follow while this process exits
        else:
            self.preemption.close()
        finally:  # also when a rank failed: the event file is complete up to the last logged step
            self.metrics.close()

    def _train(self, data, accum: int, progress: ProgressLine, tokens_per_step: int) -> None:
        t, engine = self.cfg.training, self.engine
        while self.step < t.max_steps:
            start = time.perf_counter()
            losses = []
            batches, error = [], None
            try:
                batches = [next(data.train)[0] for _ in range(accum)]
            except Exception as exc:
                error = exc
            agree(error)  # before any collective of the step: a rank that cannot read stops every rank
            own_step = getattr(self.backend, "train_step", None)  # a pipeline schedule runs all micro-batches
            if own_step is not None:
                losses = own_step(engine, batches)
            else:
                for batch in batches:
                    loss, _ = self.backend.loss(engine, batch)
                    engine.backward(loss)
                    engine.step()
                    losses.append(loss.item())
            self.step = int(engine.global_steps)
            self.tokens_seen += tokens_per_step
            logs = self.callbacks.on_step_end(engine) or {}
            (loss,) = self._mean_over_dp([sum(losses) / len(losses)])
            self.last["train/loss"] = loss  # for the summary, also between log_interval steps
            elapsed = time.perf_counter() - start
            lr = engine.get_lr()[0]
            grad_norm = engine.get_global_grad_norm()
            if self.step % t.log_interval == 0 or logs:
                logs.update({"train/loss": loss, "train/perplexity": perplexity(loss), "train/lr": lr,
                             "train/tokens_per_second": tokens_per_step / elapsed,
                             "train/tokens_seen": self.tokens_seen})
                if grad_norm is not None:
                    logs["train/grad_norm"] = float(grad_norm)
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.max_steps):
                logs.update(self.evaluate(data.eval_sets))
            if logs:
                self.metrics.log_dict(logs, self.step)
                self.last.update(logs)
            merged = "merged" if "remora/merges" in logs or "relora/merges" in logs else ""
            extra = " | ".join(x for x in (_eval_text(logs, data.eval_sets), merged) if x)
            progress.update(self.step, loss=loss, lr=lr, tokens_per_second=tokens_per_step / elapsed, extra=extra)
            stop = self.preemption.stop_now()
            if stop or (t.save_interval and self.step % t.save_interval == 0) or self.step == t.max_steps:
                save_step_checkpoint(engine, self.ckpt_dir, self.step, self._client_state(), keep_last=t.keep_last,
                                     rank_state=self._rank_state(data))
            if stop and self.step < t.max_steps:
                raise Preempted(self.step, stop)

    def summary(self, export_command: str) -> str:
        """What this invocation did and where its results are (printed by the launcher on rank 0)."""
        cfg, out = self.cfg, Path(self.cfg.training.output_dir)
        merges = sum(int(getattr(cb, "merges", 0)) for cb in getattr(self.callbacks, "callbacks", []))
        lines = [f"ran steps {self.start_step + 1}..{self.step} ({self.step - self.start_step} in this run) of "
                 f"{cfg.training.max_steps}" if self.step > self.start_step else
                 f"no steps run: the checkpoint is already at step {self.step} of {cfg.training.max_steps}"]
        if "train/loss" in self.last:
            lines.append(f"last train loss {self.last['train/loss']:.4f}")
        evals = {k.split("/")[1]: v for k, v in self.last.items() if k.startswith("eval/") and k.count("/") == 2}
        if "eval/loss" in self.last:
            lines.append(f"last eval loss {self.last['eval/loss']:.4f} ("
                         + ", ".join(f"{name} {value:.4f}" for name, value in evals.items()) + ")")
        if cfg.remora is not None or cfg.relora is not None:
            lines.append(f"merges done: {merges}")
        lines += [f"config:      {out / 'config.json'}", f"checkpoints: {self.ckpt_dir} (latest: step {self.step})"]
        if cfg.logging.tensorboard:
            lines.append(f"tensorboard: tensorboard --logdir {self.log_dir}")
        lines.append(f"export:      {export_command}")
        return "\n  ".join(["run summary:", *lines])


def _eval_text(logs: dict[str, float], eval_sets: dict) -> str:
    """``eval 5.1234 (plays 5.0012, poems 5.4321)`` when ``logs`` holds an evaluation, else ``""``."""
    if "eval/loss" not in logs:
        return ""
    per_source = ", ".join(f"{name} {logs[f'eval/{name}/loss']:.4f}" for name in eval_sets)
    return f"eval {logs['eval/loss']:.4f}" + (f" ({per_source})" if len(eval_sets) > 1 else "")
