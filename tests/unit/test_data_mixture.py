"""Mixture: the source of every global sample is a pure function of its index, in the configured proportions."""

import json

import datasets
import numpy as np
import pytest

from mora_dist.data import MapReader, Mixture, StreamReader, split_eval
from mora_dist.data.mixture import BLOCK


def test_assign_is_a_pure_function_of_the_index_across_block_boundaries():
    """Catches a resume bug: per-source counters rebuilt from the start index must equal the counts of a run
    that went through every earlier sample (here across a BLOCK boundary)."""
    mix = Mixture([0.7, 0.2, 0.1], seed=3)
    src_all, idx_all = mix.assign(0, 3 * BLOCK)
    start = BLOCK - 5
    src, idx = Mixture([0.7, 0.2, 0.1], seed=3).assign(start, 17)
    np.testing.assert_array_equal(src, src_all[start : start + 17])
    np.testing.assert_array_equal(idx, idx_all[start : start + 17])
    for s in range(3):
        np.testing.assert_array_equal(idx_all[src_all == s], np.arange((src_all == s).sum()))


def test_proportions_follow_the_weights():
    src, _ = Mixture([3.0, 1.0], seed=0).assign(0, 20_000)
    assert abs((src == 1).mean() - 0.25) < 0.015


def test_single_source_uses_every_index_in_order():
    src, idx = Mixture([1.0], seed=0).assign(10, 5)
    assert src.tolist() == [0] * 5 and idx.tolist() == [10, 11, 12, 13, 14]


def test_nonpositive_weight_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        Mixture([1.0, 0.0], seed=0)


def _blocks(n):
    return datasets.Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(n)]})


def test_map_reader_visits_every_block_once_per_epoch_in_a_new_order():
    reader = MapReader(_blocks(10), seed=1)
    first = [b[0] for b in reader.get(range(10))]
    second = [b[0] for b in reader.get(range(10, 20))]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second


def test_stream_reader_reads_forward_across_epochs_and_matches_a_fresh_reader():
    """Catches a resume bug for streaming corpora: a reader started at sample j must give what a reader that
    read everything before j gives."""
    ds = _blocks(7).to_iterable_dataset(num_shards=1)
    a = StreamReader(ds, seed=2, buffer=4)
    seq = [b[0] for b in a.get(range(0, 16))]
    assert sorted(seq[:7]) == list(range(7)) and sorted(seq[7:14]) == list(range(7))
    b = StreamReader(_blocks(7).to_iterable_dataset(num_shards=1), seed=2, buffer=4)
    assert [x[0] for x in b.get([9, 12, 15])] == [seq[9], seq[12], seq[15]]
    with pytest.raises(ValueError, match="forward"):
        b.get([3])


def test_holding_out_every_block_is_a_clear_error():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4], [5, 6]]})
    train, held = split_eval(ds, 1, "c4")
    assert len(train) == 2 and held == [[1, 2]]
    with pytest.raises(ValueError, match=r"data source 'c4': eval_blocks=3 holds out all 3 packed blocks"):
        split_eval(ds, 3, "c4")


class _Counted:
    """A streamed source of ``n`` blocks across 4 files that counts the records it gives out."""

    def __init__(self, n, *, batched=False):
        self.read = 0
        rows = datasets.Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(n)]})
        self.ds = rows.to_iterable_dataset(num_shards=4).map(self._count, batched=batched, batch_size=16)

    def _count(self, row):
        self.read += len(row["input_ids"]) if isinstance(row["input_ids"][0], list) else 1
        return row


@pytest.mark.parametrize("batched", [False, True], ids=["rows", "batched-map"])
def test_stream_reader_resumes_from_its_state_reading_one_chunk_whatever_the_position(batched):
    """Catches a resume whose cost grows with the run (re-reading the rank's part up to the position) and one that
    is not exact: a reader rebuilt from the state saved after sample 10 or after sample 1000 (stride 2, the
    other rank's samples skipped) reads the records of one shuffle chunk before its first sample (the same count
    at both positions; behind a batched map, as packing is, up to one map batch more, where ``datasets`` restarts
    the batch), then gives exactly what the uninterrupted reader gives, across an epoch boundary."""
    buffer, reads = 32, []
    for position in (10, 1000):
        source = _Counted(1500, batched=batched)
        whole = StreamReader(source.ds, seed=5, buffer=buffer, dp_rank=1, dp_size=2, shard_files=False)
        ahead = [b[0] for b in whole.get(range(position + 900))]  # past the end of the stream: epoch 1
        source = _Counted(1500, batched=batched)
        first = StreamReader(source.ds, seed=5, buffer=buffer, dp_rank=1, dp_size=2, shard_files=False)
        assert [b[0] for b in first.get(range(position))] == ahead[:position]
        state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
        source = _Counted(1500, batched=batched)
        resumed = StreamReader(source.ds, seed=5, buffer=buffer, dp_rank=1, dp_size=2, shard_files=False, state=state)
        reads.append(source.read)
        assert [b[0] for b in resumed.get(range(position, position + 900))] == ahead[position:]
    assert all(buffer <= n <= buffer + 16 for n in reads), reads
    assert batched or reads[0] == reads[1], reads


def test_stream_reader_shuffles_within_chunks_differently_each_epoch():
    ds = _blocks(64).to_iterable_dataset(num_shards=1)
    seq = [b[0] for b in StreamReader(ds, seed=3, buffer=16).get(range(128))]
    first, second = seq[:64], seq[64:]
    assert sorted(first) == list(range(64)) and sorted(second) == list(range(64)) and first != second
    assert all(sorted(first[c:c + 16]) == list(range(c, c + 16)) for c in range(0, 64, 16))  # chunk by chunk
    assert first != list(range(64))
