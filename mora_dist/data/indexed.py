"""Megatron indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``, as Megatron-LM's ``preprocess_data.py`` writes
them) as packed-block sources, read in place through megatron-core's ``IndexedDataset`` (memory-mapped, no copy).

Documents are packed exactly as text sources are (:mod:`mora_dist.data.packing`): in groups of
``MAP_BATCH_SIZE`` documents, each group's tokens concatenated and cut into full blocks of ``seq_len``, the
group's tail dropped. Tokens are taken as stored: write the corpus with ``--append-eod`` (one EOS after every
document), as Megatron's GPT recipe does, and with the tokenizer the run uses (``data.tokenizer``). A block is
located from the index alone (sequence pointers and document boundaries), so nothing is tokenised or copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mora_dist.data.packing import MAP_BATCH_SIZE
from mora_dist.errors import MoRAConfigError


class IndexedBlocks:
    """Blocks ``[start, stop)`` of the packed stream of one Megatron indexed dataset, indexed like a
    ``datasets.Dataset`` with an ``input_ids`` column: ``len(blocks)``, ``blocks[rows]["input_ids"]``,
    ``blocks.select(range(a, b))``.

    Args:
        prefix: path prefix of the ``.bin`` / ``.idx`` pair.
        seq_len: tokens per block.
    """

    def __init__(self, prefix: str, seq_len: int, *, _view: tuple | None = None) -> None:
        if _view is not None:
            self.prefix, self.seq_len, self._ds, self._tok, self._group_tok, self._group_blocks = _view[:6]
            self.start, self.stop = _view[6:]
            return
        # megatron-core is heavy: loaded only where megatron is used
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if not IndexedDataset.exists(prefix):
            raise MoRAConfigError(f"data source path={prefix!r} (format 'megatron'): {prefix}.bin / {prefix}.idx "
                                  "not found: give the prefix of a Megatron indexed dataset")
        self.prefix, self.seq_len = prefix, seq_len
        self._ds = IndexedDataset(prefix, mmap=True)
        index = self._ds.index
        itemsize = np.dtype(index.dtype).itemsize
        # _tok[i] = token offset of sequence i in the .bin (the writer stores sequences back to back): (n + 1,)
        pointers = np.asarray(index.sequence_pointers, dtype=np.int64)
        lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
        self._tok = np.append((pointers - pointers[0]) // itemsize if len(pointers) else pointers,
                              (pointers[-1] - pointers[0]) // itemsize + lengths[-1] if len(pointers) else 0)
        docs = np.asarray(self._ds.document_indices, dtype=np.int64)  # (num_docs + 1,) sequence boundaries
        bounds = docs[np.append(np.arange(0, len(docs) - 1, MAP_BATCH_SIZE), len(docs) - 1)]
        self._group_tok = self._tok[bounds]  # (num_groups + 1,) token offset where each group starts
        per_group = np.diff(self._group_tok) // seq_len
        self._group_blocks = np.concatenate([[0], np.cumsum(per_group)])  # (num_groups + 1,)
        self.start, self.stop = 0, int(self._group_blocks[-1])

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def num_tokens(self) -> int:
        """Tokens in the packed blocks of this view (``len * seq_len``)."""
        return len(self) * self.seq_len

    def select(self, rows: range) -> IndexedBlocks:
        """A view of blocks ``rows`` (a contiguous ``range`` with step 1)."""
        if rows.step != 1 or rows.start < 0 or rows.stop > len(self):
            raise ValueError(f"IndexedBlocks.select takes a contiguous range within {len(self)} blocks, got {rows}")
        state = (self.prefix, self.seq_len, self._ds, self._tok, self._group_tok, self._group_blocks,
                 self.start + rows.start, self.start + rows.stop)
        return IndexedBlocks(self.prefix, self.seq_len, _view=state)

    def _block(self, b: int) -> list[int]:
        g = int(np.searchsorted(self._group_blocks, b, side="right")) - 1
        a = int(self._group_tok[g]) + (b - int(self._group_blocks[g])) * self.seq_len
        first = int(np.searchsorted(self._tok, a, side="right")) - 1
        last = int(np.searchsorted(self._tok, a + self.seq_len, side="left"))  # sequences [first, last)
        tokens = np.concatenate(self._ds[first:last])
        offset = a - int(self._tok[first])
        return tokens[offset : offset + self.seq_len].astype(np.int64).tolist()

    def __getitem__(self, rows: Sequence[int]) -> dict[str, list[list[int]]]:
        out = []
        for r in rows:
            if not 0 <= r < len(self):
                raise IndexError(f"block {r} of {len(self)}")
            out.append(self._block(self.start + int(r)))
        return {"input_ids": out}
