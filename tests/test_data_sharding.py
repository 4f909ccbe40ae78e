"""Data-parallel sharding: after n steps exactly the first n * global_batch samples are consumed, once each."""

import datasets
import pytest
import torch

from mora_dist.data import MapReader, Mixture, ShardedBatches, eval_shard


def _readers():
    # Block j of source s is [s, j, j, ...]: the batch says which sample it holds.
    return [MapReader(datasets.Dataset.from_dict({"input_ids": [[s, j, j] for j in range(50)]}), seed=s,
                      shuffle=False) for s in range(2)]


def _take(dp_rank, dp_size, micro, n, start=0):
    it = ShardedBatches(Mixture([0.5, 0.5], seed=7), _readers(), micro_batch_size=micro, dp_rank=dp_rank,
                        dp_size=dp_size, start_sample=start)
    return [next(it) for _ in range(n)]


def test_ranks_split_the_global_stream_without_overlap_or_gap():
    """Catches ranks reading the same samples (or skipping some) under data parallelism."""
    mix = Mixture([0.5, 0.5], seed=7)
    src, idx = mix.assign(0, 24)
    expected = [(int(s), int(i)) for s, i in zip(src, idx)]
    got = {}
    for rank in range(2):
        for k, (batch, sources) in enumerate(_take(rank, 2, 3, 4)):
            for e, row in enumerate(batch.tolist()):
                got[(k * 2 + rank) * 3 + e] = (row[0], row[1])
                assert sources[e] == row[0]
    assert [got[i] for i in range(24)] == expected


def test_resume_continues_at_the_exact_next_sample():
    """Catches a resumed run repeating or skipping samples: batches after a restart at sample 12 equal the
    batches an uninterrupted run reads from there."""
    full = _take(1, 2, 3, 5)
    resumed = _take(1, 2, 3, 3, start=12)
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a[0], b[0])


def test_misaligned_resume_point_is_rejected():
    with pytest.raises(ValueError, match="multiple of dp_size x micro_batch_size"):
        _take(0, 2, 3, 1, start=5)


def test_eval_shard_splits_blocks_over_ranks():
    blocks = [[i] * 4 for i in range(7)]
    r0 = eval_shard(blocks, dp_rank=0, dp_size=2, micro_batch_size=3)
    r1 = eval_shard(blocks, dp_rank=1, dp_size=2, micro_batch_size=3)
    seen = sorted(int(x) for b in r0 + r1 for x in b[:, 0])
    assert seen == list(range(7)) and [b.shape[0] for b in r0] == [3, 1]
