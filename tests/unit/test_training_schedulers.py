"""Restarting learning-rate schedules: the spec's formulas at the restart points, resume through state_dict."""

import math

import pytest
import torch

from mora_dist.errors import MoRAConfigError
from mora_dist.training.schedulers import JaggedCosineLR, RestartedCosineLR

W1, WR, T, N, ETA = 10, 5, 100, 400, 0.1


def _spec_jagged(s):
    """docs/spec.md §3.1, written out independently of the implementation."""
    if s < W1:
        return s / W1
    rho, kappa = s % T, s // T
    if rho < WR and s >= T:
        return (rho / WR) * (ETA + (1 - ETA) * 0.5 * (1 + math.cos(math.pi * (kappa * T + WR - W1) / (N - W1))))
    return ETA + (1 - ETA) * 0.5 * (1 + math.cos(math.pi * (s - W1) / (N - W1)))


def _optimizer(lr=2.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(scheduler, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_jagged_cosine_matches_spec_at_restart_points():
    """Catches an off-by-one between merges and restarts: the step right after a merge at k*T must use factor 0."""
    sched = JaggedCosineLR(_optimizer(), total_steps=N, first_warmup=W1, restart_warmup=WR, cycle_length=T,
                           min_lr_ratio=ETA)
    lrs = _lrs(sched, N)
    for s in [0, 1, 5, 9, 10, 11, 50, 99, 100, 101, 103, 104, 105, 106, 199, 200, 202, 300, 304, 305, 399]:
        assert lrs[s] == pytest.approx(2.0 * _spec_jagged(s), abs=1e-12), s
    assert lrs[100] == 0.0 and lrs[200] == 0.0 and lrs[300] == 0.0
    assert lrs[10] == pytest.approx(2.0)
    assert lrs[105] == pytest.approx(2.0 * _spec_jagged(105))  # the warmup ends on the cosine it interrupted
    assert min(lrs[W1:]) >= 0.0 and lrs[399] == pytest.approx(2.0 * _spec_jagged(399))
    assert lrs[399] >= 2.0 * ETA


def test_restarted_cosine_matches_authors_cyclical_schedule():
    """The MoRA authors' cyclical cosine: every cycle warms up again; 1e-7 for the first two steps of a restart."""
    sched = RestartedCosineLR(_optimizer(1.0), cycle_length=T, warmup=WR, min_lr_ratio=ETA)
    lrs = _lrs(sched, 3 * T)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1 / WR) and lrs[WR] == pytest.approx(1.0)
    for k in (1, 2):
        assert lrs[k * T] == 1e-7 and lrs[k * T + 1] == 1e-7
        assert lrs[k * T + 2] == pytest.approx(2 / WR) and lrs[k * T + WR] == pytest.approx(1.0)
        end_of_cycle = ETA + (1 - ETA) * 0.5 * (1 + math.cos(math.pi * (T - 1 - WR) / (T - WR)))
        assert lrs[k * T - 1] == pytest.approx(end_of_cycle)


@pytest.mark.parametrize("make", [
    lambda opt: JaggedCosineLR(opt, total_steps=N, first_warmup=W1, restart_warmup=WR, cycle_length=T),
    lambda opt: RestartedCosineLR(opt, cycle_length=T, warmup=WR),
], ids=["jagged", "restarted"])
def test_state_dict_resumes_the_schedule_exactly(make):
    """What DeepSpeed checkpoints: a scheduler rebuilt and loaded at step 150 continues the same values."""
    first = make(_optimizer())
    reference = _lrs(first, 300)
    partial = make(_optimizer())
    _lrs(partial, 150)
    resumed = make(_optimizer())
    resumed.load_state_dict(partial.state_dict())
    assert _lrs(resumed, 150) == pytest.approx(reference[150:], abs=0)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"total_steps": 450}, "total_steps=450"),
    ({"first_warmup": 200}, "first_warmup=200"),
    ({"restart_warmup": 100}, "restart_warmup=100"),
    ({"min_lr_ratio": 0.0}, "min_lr_ratio=0.0"),
    ({"cycle_length": 0}, "cycle_length=0"),
])
def test_jagged_cosine_rejects_bad_settings_naming_them(kwargs, needle):
    args = {"total_steps": N, "first_warmup": W1, "restart_warmup": WR, "cycle_length": T} | kwargs
    with pytest.raises(MoRAConfigError, match=needle):
        JaggedCosineLR(_optimizer(), **args)


def test_restarted_cosine_rejects_warmup_as_long_as_the_cycle():
    with pytest.raises(MoRAConfigError, match="warmup=100"):
        RestartedCosineLR(_optimizer(), cycle_length=100, warmup=100)
