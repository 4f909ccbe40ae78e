"""Deterministic split of the global sample stream over data-parallel ranks, and the resume point.

Micro-batch ``k`` of rank ``r`` holds global samples ``(k * dp + r) * micro + e`` for ``e < micro``: the ranks
read interleaved contiguous slices, and after ``n`` optimizer steps exactly ``n * global_batch`` samples (a
prefix of the stream) are consumed. Resuming at that prefix continues with the very next sample.

A map-style source is read at its global sample index (the same at any data-parallel size). A streaming source
is split over the ranks (its reader's ``rank_local``): each rank reads it at the count of that source's samples
*this rank* has taken, which is recomputed from the global resume point, so every rank resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mora_dist.data.mixture import Mixture

_COUNT_CHUNK = 1 << 20  # global samples per step when counting a rank's samples before the resume point


class ShardedBatches:
    """Infinite iterator of this rank's micro-batches ``(input_ids: (micro, seq_len) long, sources: (micro,))``.

    Args:
        mixture: source assignment of the global stream.
        readers: one reader per source (``get(js) -> list of blocks``).
        micro_batch_size: samples per micro-batch and rank.
        dp_rank: this rank's data-parallel index.
        dp_size: data-parallel world size.
        start_sample: global samples already consumed (a multiple of ``dp_size * micro_batch_size``).
    """

    def __init__(self, mixture: Mixture, readers: Sequence, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                 start_sample: int = 0) -> None:
        per_round = dp_size * micro_batch_size
        if start_sample % per_round:
            raise ValueError(f"start_sample={start_sample} is not a multiple of dp_size x micro_batch_size = "
                             f"{per_round}; resume from a checkpoint of a run with the same batch layout")
        self.mixture, self.readers = mixture, readers
        self.micro, self.rank, self.dp = micro_batch_size, dp_rank, dp_size
        self.k = start_sample // per_round
        self._local = [bool(getattr(r, "rank_local", False)) for r in readers]
        self._taken = self._rank_counts(start_sample) if any(self._local) else None

    def _rank_counts(self, end: int) -> np.ndarray:
        """``(num_sources,)``: samples of each source among this rank's global samples ``< end``."""
        counts = np.zeros(self.mixture.num_sources, dtype=np.int64)
        for start in range(0, end, _COUNT_CHUNK):
            n = min(_COUNT_CHUNK, end - start)
            src, _ = self.mixture.assign(start, n)
            mine = (np.arange(start, start + n) // self.micro) % self.dp == self.rank
            counts += np.bincount(src[mine], minlength=self.mixture.num_sources)
        return counts

    def reader_states(self) -> list[dict | None]:
        """Each source's reader position (:meth:`StreamReader.state_dict`; ``None`` for a map-style source, whose
        position follows from the global sample index alone), to resume without re-reading the stream."""
        return [r.state_dict() if local else None for r, local in zip(self.readers, self._local, strict=True)]

    @property
    def samples_consumed(self) -> int:
        """Global samples consumed by all ranks up to this rank's next micro-batch."""
        return self.k * self.dp * self.micro

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = (self.k * self.dp + self.rank) * self.micro
        src, idx = self.mixture.assign(start, self.micro)
        rows: list[list[int] | None] = [None] * self.micro
        for s in range(self.mixture.num_sources):
            where = [e for e in range(self.micro) if src[e] == s]
            if where:
                if self._local[s]:
                    js = [int(self._taken[s]) + n for n in range(len(where))]
                    self._taken[s] += len(where)
                else:
                    js = [int(idx[e]) for e in where]
                for e, block in zip(where, self.readers[s].get(js), strict=True):
                    rows[e] = block
        self.k += 1
        return torch.tensor(rows, dtype=torch.long), torch.as_tensor(src, dtype=torch.long)


def eval_shard(blocks: Sequence[list[int]], *, dp_rank: int, dp_size: int,
               micro_batch_size: int) -> list[tuple[torch.Tensor, bool]]:
    """This rank's share (``blocks[r::dp]``) of a held-out set as ``(batch: (<=micro, seq_len), real)`` pairs,
    padded so that every rank gets the same number of batches.

    Under ZeRO-3 (and tensor parallelism) every forward is a collective, so a rank that stops early leaves the
    others waiting forever. Ranks with fewer blocks get padding batches (one copy of ``blocks[0]``,
    ``real=False``) to run and discard, so the loss stays exact over the real blocks.
    """
    if not blocks:
        return []
    step = micro_batch_size
    mine = list(blocks[dp_rank::dp_size])
    batches = [(torch.tensor(mine[i : i + step], dtype=torch.long), True) for i in range(0, len(mine), step)]
    most = -(-len(blocks[0::dp_size]) // step)  # rank 0 holds the most blocks
    pad = torch.tensor(blocks[:1], dtype=torch.long)
    return batches + [(pad, False)] * (most - len(batches))
