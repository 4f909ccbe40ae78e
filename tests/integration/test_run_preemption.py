"""The preemption guard (``mora_dist/run/preemption.py``) over 2 gloo ranks: one rank's signal stops both at the
same check, later signals change nothing, and an empty signal list installs nothing."""

from __future__ import annotations

from tests.helpers.workers import run_workers


def _guard_worker() -> dict:
    import os
    import signal

    import torch.distributed as dist

    from mora_dist.run.preemption import PreemptionGuard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    before = signal.getsignal(signal.SIGUSR1)
    guard = PreemptionGuard(["SIGTERM", "SIGUSR1"])
    out = {"quiet": guard.stop_now()}
    work = 0
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # mid-work (as during a merge): the work goes on
        work = sum(range(1000))
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: still the first one's name
    out["work"] = work
    out["stop"] = guard.stop_now()
    guard.close()
    out["restored"] = signal.getsignal(signal.SIGUSR1) == before
    off = PreemptionGuard([])
    out["off_handler"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    out["off"] = off.stop_now()
    return out


def test_one_ranks_signal_stops_every_rank_at_the_same_check():
    """Rank 1 receives SIGUSR1 and then SIGTERM in the middle of its work, rank 0 nothing: the work finishes, and
    the next check tells both ranks to stop, naming SIGUSR1. Closing restores the previous handlers; an empty
    list installs no handler and never stops."""
    for rank, out in enumerate(run_workers(_guard_worker, 2, timeout_s=120)):
        assert out["quiet"] is None
        assert out["stop"] == "SIGUSR1", rank
        assert out["work"] == (499500 if rank == 1 else 0)
        assert out["restored"] and out["off_handler"] and out["off"] is None
