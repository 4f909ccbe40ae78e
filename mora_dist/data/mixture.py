"""Weighted mixtures of packed sources, as a pure function of the global sample index.

Sample ``i`` of the training stream comes from source ``s(i)``, drawn with the mixture weights from a generator
seeded by ``(seed, i // BLOCK)``, and is the ``j``-th sample that source has given, ``j = #{i' < i: s(i') = s}``.
A map-style source yields its samples in a seeded per-epoch permutation, read by sample index ``j``: the order is
fixed by the config and independent of the data-parallel size, so resuming at global sample ``i`` needs only ``i``.

A streaming source is split over the data-parallel ranks (:class:`StreamReader`): rank ``r`` reads only its part
of the stream (shuffled in chunks), and ``j`` counts the samples *this rank* has taken from it. The resume point of
each rank follows from ``i`` and the batch layout (:class:`~mora_dist.data.sharding.ShardedBatches`), so it is
exact for the same data-parallel size; a reader rebuilt from its saved :meth:`StreamReader.state_dict` gets there
by reading one chunk instead of the rank's whole part up to it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

BLOCK = 4096


class Mixture:
    """Source assignment of global sample indices. ``weights`` need not sum to 1."""

    def __init__(self, weights: Sequence[float], *, seed: int) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or (w <= 0).any():
            raise ValueError(f"mixture weights {list(weights)} must be positive")
        self.p = w / w.sum()
        self.seed = seed
        # _cum[b] = per-source counts of samples before block b (grown on demand).
        self._cum: list[np.ndarray] = [np.zeros(len(w), dtype=np.int64)]

    @property
    def num_sources(self) -> int:
        return len(self.p)

    def _block(self, b: int) -> np.ndarray:
        if self.num_sources == 1:
            return np.zeros(BLOCK, dtype=np.int64)
        return np.random.default_rng([self.seed, b]).choice(self.num_sources, size=BLOCK, p=self.p)

    def _counts_before_block(self, b: int) -> np.ndarray:
        while len(self._cum) <= b:
            n = len(self._cum) - 1
            self._cum.append(self._cum[n] + np.bincount(self._block(n), minlength=self.num_sources))
        return self._cum[b]

    def assign(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``(source, index_in_source)`` of global samples ``start .. start+count-1``, each ``(count,)``."""
        b0, off = divmod(start, BLOCK)
        blocks = [self._block(b) for b in range(b0, (start + count - 1) // BLOCK + 1)]
        src = np.concatenate(blocks)[off : off + count]
        before = self._counts_before_block(b0) + np.bincount(blocks[0][:off], minlength=self.num_sources)
        idx = np.empty(count, dtype=np.int64)
        for s in range(self.num_sources):
            mask = src == s
            idx[mask] = before[s] + np.arange(mask.sum())
        return src, idx


class MapReader:
    """Sample ``j`` of a map-style source: epoch ``j // n`` in a permutation seeded by ``(seed, epoch)``.

    ``ds`` is a ``datasets.Dataset`` with an ``input_ids`` column or anything indexed the same way
    (``len``, ``ds[rows]["input_ids"]``), such as :class:`~mora_dist.data.indexed.IndexedBlocks`.
    """

    rank_local = False  # j is an index into the whole source, the same on every data-parallel rank

    def __init__(self, ds: datasets.Dataset, *, seed: int, shuffle: bool = True) -> None:
        if len(ds) == 0:
            raise ValueError("a data source has no training blocks after the held-out split: give it more text, "
                             "a shorter data.seq_len or fewer eval_blocks")
        self.ds, self.seed, self.shuffle = ds, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            n = len(self.ds)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perms = {epoch: perm}  # keep one epoch: indices only move forward
        return self._perms[epoch]

    def get(self, js: Sequence[int]) -> list[list[int]]:
        n = len(self.ds)
        rows = [int(self._perm(j // n)[j % n]) for j in js]
        return self.ds[rows]["input_ids"]


class StreamReader:
    """Sample ``j`` of this data-parallel rank's part of a streaming source, read forward; restarts with the next
    epoch when the stream ends. ``j`` must not decrease between calls.

    With ``shard_files`` the split is ``datasets.distributed.split_dataset_by_node``: a source with a multiple of
    ``dp_size`` files gives each rank its own files (rank ``r`` reads files ``r, r + dp, ...``), otherwise every
    rank walks the stream and keeps samples ``r, r + dp, ...``. Without it (a stream whose first blocks are held
    out for eval: ``datasets`` would split that skip over the files) every rank walks the stream and keeps samples
    ``r, r + dp, ...``. Either way no sample goes to two ranks.

    Shuffling (``shuffle``) is by chunks: the rank's part is read in consecutive chunks of ``buffer`` blocks, each
    given out in a permutation seeded by ``(seed, epoch, chunk)``. That keeps the reader's position small
    (:meth:`state_dict`: the ``datasets`` state at the start of its chunk and its place in it), so a reader built
    with ``state`` reads that one chunk again and goes on exactly where the saved reader was: a resume costs one
    chunk, however far the run got (``datasets``' own buffer shuffle cannot be resumed exactly: its buffer is lost).
    """

    rank_local = True  # j counts this rank's samples of the source (ShardedBatches keeps that count)

    def __init__(self, ds: datasets.IterableDataset, *, seed: int, shuffle: bool = True, buffer: int = 10_000,
                 dp_rank: int = 0, dp_size: int = 1, shard_files: bool = True,
                 state: dict[str, Any] | None = None):
        from datasets.distributed import split_dataset_by_node  # only streamed sources are split by node

        self.stride, self.offset = 1, 0
        if dp_size > 1 and shard_files:
            ds = split_dataset_by_node(ds, rank=dp_rank, world_size=dp_size)
        elif dp_size > 1:
            self.stride, self.offset = dp_size, dp_rank
        self.ds, self.seed, self.shuffle, self.buffer = ds, seed, shuffle, buffer
        self._epoch, self._cursor, self._it = 0, 0, None
        # The state at an epoch's start, loaded back when a resumed epoch ends: datasets 3.x re-applies a loaded
        # state at every iter() (later versions only within its epoch), which would start the next epoch mid-way.
        self._origin, self._resumed = copy.deepcopy(ds.state_dict()), False
        self._chunk: list[list[int]] = []
        self._chunk_index, self._pos, self._chunk_start = 0, 0, None
        if state is not None:
            self._restore(state)

    def state_dict(self) -> dict[str, Any]:
        """Where this reader is: samples given (``cursor``), epoch, chunk, place in the chunk and the ``datasets``
        state at the chunk's start (``None`` at an epoch's start). JSON-serialisable."""
        return {"cursor": self._cursor, "epoch": self._epoch, "chunk": self._chunk_index - 1, "pos": self._pos,
                "chunk_start": self._chunk_start}

    def _restore(self, state: dict[str, Any]) -> None:
        self._epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        if state["chunk"] < 0:  # nothing read yet
            return
        self.ds.set_epoch(self._epoch)
        if state["chunk_start"] is not None:
            self.ds.load_state_dict(state["chunk_start"])
            self._resumed = True
        self._it, self._chunk_index = iter(self.ds), int(state["chunk"])
        self._fill(start=state["chunk_start"])
        self._pos = int(state["pos"])

    def _fill(self, start: dict[str, Any] | None = None) -> None:
        """Read the next chunk (starting the next epoch at the end of the stream) and permute it. ``start``: the
        ``datasets`` state the chunk begins at when the iterator was just restored to it."""
        while True:
            if self._it is None:
                if self._resumed:
                    self.ds.load_state_dict(self._origin)
                    self._resumed = False
                self.ds.set_epoch(self._epoch)
                self._it, self._chunk_index = iter(self.ds), 0
            if start is None and self._chunk_index > 0:  # the state after the previous chunk's last block
                start = self.ds.state_dict()
            rows = [row["input_ids"] for row in itertools.islice(self._it, self.buffer)]
            if rows:
                break
            if self._epoch == 0 and self._chunk_index == 0:
                raise ValueError("a streaming data source gave no training blocks")
            self._epoch, self._it, start = self._epoch + 1, None, None
        order = (np.random.default_rng([self.seed, self._epoch, self._chunk_index]).permutation(len(rows))
                 if self.shuffle else range(len(rows)))
        self._chunk, self._chunk_start, self._pos = [rows[i] for i in order], start, 0
        self._chunk_index += 1

    def _next_row(self) -> list[int]:
        if self._pos == len(self._chunk):
            self._fill()
        self._pos += 1
        return self._chunk[self._pos - 1]

    def _next(self) -> list[int]:
        """This rank's next sample: skip the other ranks' ones in stride mode."""
        for _ in range(self.offset):
            self._next_row()
        row = self._next_row()
        for _ in range(self.stride - 1 - self.offset):
            self._next_row()
        return row

    def get(self, js: Sequence[int]) -> list[list[int]]:
        out = []
        for j in js:
            if j < self._cursor:
                raise ValueError(f"StreamReader reads forward only: asked for sample {j} after {self._cursor}")
            while self._cursor < j:
                self._next()
                self._cursor += 1
            out.append(self._next())
            self._cursor += 1
        return out


def head_blocks(ds: datasets.Dataset | datasets.IterableDataset, n: int, source: str = "?") -> list[list[int]]:
    """The first ``n`` packed blocks of ``ds`` (a held-out split), as lists.

    Raises ``ValueError`` when it has fewer than ``n``.
    """
    if isinstance(ds, datasets.IterableDataset):
        blocks = [row["input_ids"] for row in ds.take(n)]
    else:
        blocks = ds[list(range(min(n, len(ds))))]["input_ids"]
    if len(blocks) < n:
        raise ValueError(f"data source {source!r}: its eval split holds {len(blocks)} packed blocks, fewer than "
                         f"eval_blocks={n}; set data.sources.<i>.eval_blocks to at most {len(blocks)}")
    return blocks


def split_eval(ds, eval_blocks: int, source: str = "?"):
    """``(train, eval_list)``: the first ``eval_blocks`` packed blocks are held out (materialised as lists).

    ``ds`` is a ``datasets`` dataset (map-style or streaming) or a map-style stand-in with ``select``.
    Raises ``ValueError`` when a map-style source has no blocks left for training.
    """
    if isinstance(ds, datasets.IterableDataset):
        return ds.skip(eval_blocks), [row["input_ids"] for row in ds.take(eval_blocks)]
    if eval_blocks >= len(ds):
        raise ValueError(
            f"data source {source!r}: eval_blocks={eval_blocks} holds out all {len(ds)} packed blocks; "
            f"set data.sources.<i>.eval_blocks below {len(ds)} (e.g. {max(1, len(ds) // 20)})"
        )
    return ds.select(range(eval_blocks, len(ds))), ds[list(range(eval_blocks))]["input_ids"]
