"""Metrics: a ``MetricLogger`` protocol, a TensorBoard sink (rank 0 only), and the rank-0 progress line.

Tags: ``train/loss``, ``train/perplexity``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_second``,
``train/tokens_seen``, ``eval/<source>/loss``, ``eval/loss``, ``remora/merges`` and whatever figures the
callbacks report.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

logger = logging.getLogger(__name__)


@runtime_checkable
class MetricLogger(Protocol):
    """Where scalars go. Implementations ignore calls on ranks that do not write."""

    def log(self, tag: str, value: float, step: int) -> None: ...

    def log_dict(self, values: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    """Drops everything (ranks other than 0, or TensorBoard disabled)."""

    def log(self, tag: str, value: float, step: int) -> None:
        return None

    def log_dict(self, values: Mapping[str, float], step: int) -> None:
        return None

    def close(self) -> None:
        return None


def drop_events_after(log_dir: str | os.PathLike, step: int) -> int:
    """Rewrite the event files under ``log_dir`` without the events of steps after ``step`` (each file replaced
    atomically); returns how many events were dropped.

    A run killed after its last checkpoint logged steps that its resumed run logs again; readers would show
    both (``purge_step`` only hides them from readers that honour it).
    """
    # tensorboard: loaded only when event files are written or read
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    # tensorboard: loaded only when event files are written or read
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped = 0
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        keep = [r for r in records if Event.FromString(r).step <= step]
        if len(keep) == len(records):
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as fh:
            writer = RecordWriter(fh)
            for record in keep:
                writer.write(record)
        os.replace(tmp, path)
        dropped += len(records) - len(keep)
    if dropped:
        logger.info("resume at step %d: dropped %d TensorBoard events of later steps from the interrupted run",
                    step, dropped)
    return dropped


class TensorBoardLogger:
    """Scalars to TensorBoard event files in ``log_dir``; flushed after each ``log_dict`` so a killed run keeps
    everything it logged up to its last step. With ``resume_step`` (a resumed run), events of later steps are
    first dropped from the existing files, so every step appears once."""

    def __init__(self, log_dir: str, *, resume_step: int | None = None) -> None:
        # tensorboard: loaded only when event files are written or read
        from torch.utils.tensorboard import SummaryWriter

        purge_step = None
        if resume_step is not None:
            drop_events_after(log_dir, resume_step)
            purge_step = resume_step + 1  # a TensorBoard already watching hides the old steps too
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)

    def log_dict(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_metric_logger(*, rank: int, enabled: bool, log_dir: str, resume_step: int | None = None) -> MetricLogger:
    """TensorBoard on rank 0 when ``enabled`` (continuing after ``resume_step`` when given), else a ``NullLogger``."""
    return TensorBoardLogger(log_dir, resume_step=resume_step) if enabled and rank == 0 else NullLogger()


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped so a diverged loss logs a large finite number."""
    return math.exp(min(loss, 50.0))


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressLine:
    """``step 12/200 | loss 5.231 | lr 1.0e-03 | 3.1k tok/s | ETA 1m02s`` on rank 0 via ``logging``.

    Throughput and ETA count only steps run by this process (a resumed run does not count restored steps).
    """

    def __init__(self, *, total_steps: int, start_step: int, enabled: bool) -> None:
        self.total, self.start, self.enabled = total_steps, start_step, enabled
        self.t0 = time.perf_counter()

    def update(self, step: int, *, loss: float, lr: float, tokens_per_second: float, extra: str = "") -> str:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_second / 1e3:.1f}k tok/s"
                f" | ETA {_duration(eta) if math.isfinite(eta) else '?'}{' | ' + extra if extra else ''}")
        if self.enabled:
            logger.info("%s", line)
        return line
