"""Save on preemption: a scheduler's signal ends the run at the next step boundary with a complete checkpoint.

A cluster scheduler warns a job before it kills it: SLURM's ``--signal=USR1@90`` (or ``TERM``), Kubernetes'
SIGTERM and its grace period. The launchers pass SIGTERM on to the ranks (``deepspeed``'s to one rank after
another, each given 30 s before SIGKILL; ``torchrun``'s to all ranks, also 30 s), so the ranks learn of it at
different moments, possibly in the middle of a step or of a ReMoRA merge. The handler only records the signal.
After each step (its optimizer step, merges and metrics done) every rank calls :meth:`PreemptionGuard.stop_now`,
one all-reduce over the world: if any rank has been signalled, all of them stop at that same step, save, and the
launcher exits with :data:`EXIT_PREEMPTED`. More signals while saving are recorded and change nothing; the
checkpoint is written to a temporary directory and renamed, so even a SIGKILL cannot leave a half-written one.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

import torch
import torch.distributed as dist

from mora_dist.run.distributed import device

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""The launcher's exit code after a save on a signal (``EX_TEMPFAIL``: try again, e.g. requeue with
``--resume``). ``deepspeed``'s launcher passes it on when the ranks were signalled; a launcher that was signalled
itself exits with its own code."""


class Preempted(Exception):
    """The run stopped on ``signal_name`` after ``step``, with a checkpoint of that step."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"stopped on {signal_name} after step {step}, checkpoint saved; resume with --resume")
        self.step, self.signal_name = step, signal_name


class PreemptionGuard:
    """Records the first of ``signal_names`` (e.g. ``["SIGTERM", "SIGUSR1"]``) this process receives, from
    construction to :meth:`close`. An empty list installs nothing and :meth:`stop_now` never stops (and costs no
    collective)."""

    def __init__(self, signal_names: list[str]) -> None:
        self.received: str | None = None
        self._previous = {}
        for name in signal_names:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._record)

    def _record(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.received is None:
            self.received = name
            logger.warning("received %s: the run saves and stops after the current step", name)
        else:
            logger.warning("received %s again: still saving", name)

    def stop_now(self) -> str | None:
        """Collective over the whole world (call it on every rank at the same point): the name of a signal some
        rank received (the lowest such rank's), or ``None`` to go on."""
        if not self._previous:
            return None
        flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device())
        if self.received:
            flags[dist.get_rank()] = signal.Signals[self.received].value  # a signal number is never 0
        dist.all_reduce(flags)
        hit = flags.nonzero().flatten().tolist()
        return signal.Signals(int(flags[hit[0]])).name if hit else None

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}
