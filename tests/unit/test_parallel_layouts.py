"""Rank-local <-> TP = 1 ids and shard plans of ``M`` (pure index math, no processes). Spec: §4."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

from mora_dist.errors import ShardingError
from mora_dist.parallel.layouts import partition_ids, plan_shard, suggest_r_hat


@pytest.mark.parametrize("size,tp,stride", [(64, 2, 1), (96, 4, 2), (48, 4, 1), (24, 2, 2)])
def test_partition_ids_match_megatron_weight_split(size, tp, stride):
    """Our global ids of each rank's rows are the rows megatron-core's own initialisation gives that rank
    (``_initialize_affine_weight_cpu``, the TP-resharding reference): catches a wrong gated-fc1 stride layout."""
    master = torch.arange(size, dtype=torch.float32)[:, None].expand(size, 3).contiguous()
    for rank in range(tp):
        local = torch.empty(size // tp, 3)
        _initialize_affine_weight_cpu(
            local, size, 3, size // tp, 0, lambda w: w.copy_(master), stride=stride, rank=rank, world_size=tp
        )
        assert torch.equal(partition_ids(size, tp, rank, stride=stride), local[:, 0].long())


def test_partition_ids_rejects_indivisible_size():
    with pytest.raises(ShardingError, match="size 50"):
        partition_ids(50, 4, 0)


def _plans(kind, k, d, r_hat, mora_type, tp, stride=1, sharding="auto"):
    return [
        plan_shard(kind, k, d, r_hat, mora_type, tp_size=tp, tp_rank=t, stride=stride, sharding=sharding)
        for t in range(tp)
    ]


@pytest.mark.parametrize(
    "kind,k,d,r_hat,mora_type,tp,stride,m_dim",
    [
        ("column", 32, 64, 8, 2, 2, 1, 0),  # interleave, aligned groups: rows of M split
        ("column", 32, 64, 8, 4, 4, 1, 0),
        ("column", 32, 96, 8, 2, 2, 2, 0),  # gated fc1: [gate_t; up_t] needs rows [chunk t; chunk t + tp]
        ("column", 32, 64, 8, 1, 2, 1, None),  # tile: every rank reads every row of M
        ("column", 32, 60, 8, 2, 2, 1, None),  # interleave groups straddle the shard boundary
        ("column", 32, 64, 8, 6, 2, 1, None),  # rope: never
        ("row", 64, 32, 8, 2, 2, 1, 1),  # block-sum, aligned: columns of M split
        ("row", 64, 32, 8, 3, 4, 1, 1),
        ("row", 64, 32, 8, 1, 2, 1, None),  # stride-sum mixes every rank's inputs in every slot
        ("row", 64, 32, 6, 2, 4, 1, None),  # r_hat not divisible by TP
    ],
)
def test_plan_shards_exactly_where_the_type_allows(kind, k, d, r_hat, mora_type, tp, stride, m_dim):
    """Sharded plans partition range(r_hat) across ranks (no replication, nothing missing)."""
    plans = _plans(kind, k, d, r_hat, mora_type, tp, stride)
    assert {p.m_dim for p in plans} == {m_dim}
    if m_dim is None:
        assert all(p.reason for p in plans)
        return
    held = torch.cat([p.m_ids for p in plans])
    assert torch.equal(held.sort().values, torch.arange(r_hat))
    assert all(p.m_stride == stride for p in plans)


def test_plan_ids_are_global_shard_ids():
    (p0, p1) = _plans("row", 64, 32, 8, 2, 2)
    assert p0.out_ids is None and torch.equal(p1.in_ids, torch.arange(32, 64))
    (q0, q1) = _plans("column", 32, 96, 8, 2, 2, stride=2)
    assert torch.equal(q1.out_ids, torch.cat([torch.arange(24, 48), torch.arange(72, 96)]))
    assert torch.equal(q1.m_ids, torch.tensor([2, 3, 6, 7]))


def test_replicate_setting_and_tp1_never_shard():
    assert _plans("column", 32, 64, 8, 2, 2, sharding="replicate")[0].m_dim is None
    (solo,) = _plans("column", 32, 64, 8, 2, 1)
    assert solo.m_dim is None and solo.in_ids is None and solo.out_ids is None


def test_shard_setting_raises_with_a_fix():
    """The error names the layer, shape, type, TP and an r_hat that would shard (or the 'auto' escape)."""
    with pytest.raises(ShardingError) as info:
        plan_shard("column", 32, 60, 8, 2, tp_size=2, tp_rank=0, sharding="shard", where="layers.3.linear_qkv")
    msg = str(info.value)
    for part in ("layers.3.linear_qkv", "out_features=60", "mora_type=2", "TP=2", "r_hat=", "would shard", "'auto'"):
        assert part in msg
    with pytest.raises(ShardingError, match="rope"):
        plan_shard("row", 64, 32, 8, 6, tp_size=2, tp_rank=0, sharding="shard")


def test_suggest_r_hat_returns_a_shardable_neighbour():
    good = suggest_r_hat("column", 32, 60, 8, 2, tp_size=2)
    assert good is not None and good % 2 == 0
    assert all(p.m_dim == 0 for p in _plans("column", 32, 60, good, 2, 2))
