"""Mixture: the source of every global sample is a pure function of its index, in the configured proportions."""

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
