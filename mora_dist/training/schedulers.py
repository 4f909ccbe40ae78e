"""Learning-rate schedules that restart where ReMoRA/ReLoRA merge, as plain ``torch`` schedulers.

Each multiplier is a pure function of the scheduler step ``s`` (the number of optimizer steps taken so far), so
``state_dict()`` (which DeepSpeed saves with its checkpoint when the scheduler is passed to
``deepspeed.initialize(lr_scheduler=...)``) holds everything needed to resume. The learning rate used by the
optimizer step number ``n`` (1-based) is ``base_lr * factor(n - 1)``; a merge after step ``n = k T`` is therefore
followed by the step that uses ``factor(k T)``, the start of the restart warmup.

Spec: §3, §3.1.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mora_dist.errors import MoRAConfigError


def _check_positive_int(name: str, value: int, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        bound = "a non-negative" if allow_zero else "a positive"
        raise MoRAConfigError(f"{name}={value!r} must be {bound} integer")


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise MoRAConfigError(f"{name}={value!r} must be in (0, 1]; ReLoRA and MoRA use 0.1")


class RestartScheduler(LRScheduler):
    """Base class: ``lr = base_lr * factor(s)`` with ``factor`` a pure function of the step ``s``.

    ``cycle_length`` and ``restart_warmup`` are what :class:`~mora_dist.training.remora.ReMoRACallback` checks
    against its ``merge_every`` and ``restart_warmup``. Spec: §3 step 5.
    """

    cycle_length: int
    restart_warmup: int

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


class JaggedCosineLR(RestartScheduler):
    """ReLoRA's ``cosine_restarts``: one cosine decay over the run with a linear warmup after every restart.

    With first warmup ``W1``, restart warmup ``Wr``, cycle ``T``, total ``N``, floor ``eta``:
    ``f(s) = s / W1`` for ``s < W1``; else with ``rho = s mod T``, ``kappa = s // T``: if ``rho < Wr`` and
    ``s >= T``, ``f(s) = (rho / Wr) * c(kappa T + Wr)``, otherwise ``f(s) = c(s)``, where
    ``c(t) = eta + (1 - eta) * 0.5 * (1 + cos(pi (t - W1) / (N - W1)))``.

    Args:
        optimizer: the optimizer whose groups' ``lr`` is scaled.
        total_steps: ``N``, the number of optimizer steps of the run (a multiple of ``cycle_length``).
        first_warmup: ``W1`` (at most ``cycle_length``, so the first merge comes after the warmup).
        restart_warmup: ``Wr`` (less than ``cycle_length``).
        cycle_length: ``T``, the merge period.
        min_lr_ratio: ``eta``, the floor of the cosine.
        last_epoch: as for every torch scheduler.

    Spec: §3.1.
    """

    def __init__(self, optimizer: Optimizer, *, total_steps: int, first_warmup: int, restart_warmup: int,
                 cycle_length: int, min_lr_ratio: float = 0.1, last_epoch: int = -1) -> None:
        _check_positive_int("cycle_length", cycle_length)
        _check_positive_int("total_steps", total_steps)
        _check_positive_int("first_warmup", first_warmup, allow_zero=True)
        _check_positive_int("restart_warmup", restart_warmup, allow_zero=True)
        _check_ratio("min_lr_ratio", min_lr_ratio)
        if total_steps % cycle_length:
            raise MoRAConfigError(
                f"total_steps={total_steps} must be a multiple of cycle_length={cycle_length} so that the run "
                f"ends at the end of a cycle; use total_steps={math.ceil(total_steps / cycle_length) * cycle_length}"
            )
        if first_warmup > cycle_length or first_warmup >= total_steps:
            raise MoRAConfigError(
                f"first_warmup={first_warmup} must be at most cycle_length={cycle_length} and below "
                f"total_steps={total_steps}: the first merge would come before the warmup ends"
            )
        if restart_warmup >= cycle_length:
            raise MoRAConfigError(f"restart_warmup={restart_warmup} must be less than cycle_length={cycle_length}")
        self.total_steps, self.first_warmup, self.restart_warmup = total_steps, first_warmup, restart_warmup
        self.cycle_length, self.min_lr_ratio = cycle_length, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def _cosine(self, t: int) -> float:
        progress = (t - self.first_warmup) / max(1, self.total_steps - self.first_warmup)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def factor(self, step: int) -> float:
        if step < self.first_warmup:
            return step / self.first_warmup
        rho, kappa = step % self.cycle_length, step // self.cycle_length
        if rho < self.restart_warmup and step >= self.cycle_length:
            return rho / self.restart_warmup * self._cosine(kappa * self.cycle_length + self.restart_warmup)
        return self._cosine(step)


class RestartedCosineLR(RestartScheduler):
    """The MoRA authors' cyclical cosine (``training_utils.py``, ``scheduler_type="cosine"`` with a cycle):
    every cycle of ``T`` steps warms up linearly over ``W`` steps and decays by a full cosine to the floor.

    With ``rho = s mod T``: if ``rho < W``: ``f(s) = 1e-7`` when ``s >= T`` and ``rho < 2`` (the authors keep
    the first two steps after a restart at a near-zero rate), else ``rho / W``; otherwise
    ``f(s) = eta + (1 - eta) * 0.5 * (1 + cos(pi (rho - W) / (T - W)))``.

    Args:
        optimizer: the optimizer whose groups' ``lr`` is scaled.
        cycle_length: ``T``, the merge period.
        warmup: ``W``, the warmup of every cycle (the first included), less than ``cycle_length``.
        min_lr_ratio: ``eta``, the floor of the cosine.
        last_epoch: as for every torch scheduler.

    Spec: §3 step 5.
    """

    def __init__(self, optimizer: Optimizer, *, cycle_length: int, warmup: int, min_lr_ratio: float = 0.1,
                 last_epoch: int = -1) -> None:
        _check_positive_int("cycle_length", cycle_length)
        _check_positive_int("warmup", warmup, allow_zero=True)
        _check_ratio("min_lr_ratio", min_lr_ratio)
        if warmup >= cycle_length:
            raise MoRAConfigError(f"warmup={warmup} must be less than cycle_length={cycle_length}")
        self.cycle_length, self.restart_warmup, self.min_lr_ratio = cycle_length, warmup, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        rho = step % self.cycle_length
        if rho < self.restart_warmup:
            if step >= self.cycle_length and rho < 2:
                return 1e-7
            return rho / max(1, self.restart_warmup)
        progress = (rho - self.restart_warmup) / max(1, self.cycle_length - self.restart_warmup)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
