"""One rank's data failure stops every rank promptly, reported once, by the rank that met it.

Reading data can fail on one rank while the others go on to a collective and wait for it (a barrier, a gradient
reduction) until the process group's timeout, or die with "Connection closed by peer" once it exits. So the
places where ranks read data end in :func:`agree`: a collective every rank reaches, failed or not, that tells
all of them whether any rank failed. The lowest failing rank raises its own error; every other rank raises
:class:`PeerFailed`, which the launcher turns into a quiet exit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from mora_dist.data.validate import locate_problem
from mora_dist.run.distributed import device

logger = logging.getLogger(__name__)


class PeerFailed(RuntimeError):
    """Another rank failed (and reports why); this rank stops without a message of its own."""

    def __init__(self, rank: int) -> None:
        super().__init__(f"rank {rank} failed; see its message")
        self.rank = rank


def agree(error: BaseException | None) -> None:
    """Collective over the whole world: return when no rank failed; else raise ``error`` on the lowest failing
    rank and :class:`PeerFailed` on every other rank. Every rank must call it at the same point."""
    if not dist.is_initialized():  # one process without a group (tests, tools): nothing to agree with
        if error is not None:
            raise error
        return
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device())
    if error is not None:
        flags[dist.get_rank()] = 1
    dist.all_reduce(flags)
    failed = flags.nonzero().flatten().tolist()
    if not failed:
        return
    if dist.get_rank() == failed[0]:
        raise error
    raise PeerFailed(failed[0])


def explain(exc: Exception, *sources: Any) -> Exception:
    """The error to report for ``exc`` raised while reading config ``DataSource`` ``sources``: the first problem
    a full scan of their files finds (naming file and line), else ``exc`` itself."""
    for source in sources:
        problem = locate_problem(source)
        if problem is not None:
            logger.debug("reading data source %r failed with %r", source.name, exc)
            return problem
    return exc


class GuardedReader:
    """A mixture reader (``get(js) -> blocks``) whose read errors name the source's file and line."""

    def __init__(self, reader: Any, source: Any) -> None:
        self.reader, self.source = reader, source

    def __getattr__(self, name: str) -> Any:  # the reader's other attributes (e.g. ``rank_local``) show through
        return getattr(self.__dict__["reader"], name)

    def get(self, js: Sequence[int]) -> list[list[int]]:
        try:
            return self.reader.get(js)
        except Exception as exc:
            raise explain(exc, self.source) from exc
