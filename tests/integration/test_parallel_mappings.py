"""Autograd collectives on the square matrix, on 2 gloo processes (no megatron import). Spec: §4."""

from __future__ import annotations

import torch

from tests.helpers.workers import run_workers

R_HAT = 8


def _mappings_worker() -> dict:
    import torch.distributed as dist

    from mora_dist.parallel.layouts import partition_ids
    from mora_dist.parallel.mappings import gather_matrix_shards, reduce_replicated_grad

    dist.init_process_group("gloo")
    rank, group = dist.get_rank(), dist.group.WORLD
    M = torch.arange(R_HAT * R_HAT, dtype=torch.float32).view(R_HAT, R_HAT).requires_grad_(True)
    weight = torch.full((R_HAT, R_HAT), float(rank + 1))  # a different partial gradient on each rank
    (reduce_replicated_grad(M, group) * weight).sum().backward()
    out = {"grad": M.grad.clone()}
    for dim, stride in ((0, 1), (0, 2), (1, 1)):
        ids = [partition_ids(R_HAT, 2, t, stride=stride) for t in range(2)]
        shard = M.detach().index_select(dim, ids[rank])
        out[f"gather{dim}{stride}"] = gather_matrix_shards(shard, ids, dim, group)
    solo = torch.ones(2, 2, requires_grad=True)
    assert reduce_replicated_grad(solo, None) is solo
    return {k: v.numpy() for k, v in out.items()}


def test_replicated_grad_is_summed_and_shards_gather_to_the_global_matrix():
    """Backward of ``reduce_replicated_grad`` holds the SUM of the ranks' partial gradients on every rank (a
    missing or averaging reduction fails), and row/column/stride-2 shards gather back to the global ``M``."""
    M = torch.arange(R_HAT * R_HAT, dtype=torch.float32).view(R_HAT, R_HAT)
    for result in run_workers(_mappings_worker, 2, timeout_s=60):
        assert torch.equal(torch.from_numpy(result["grad"]), torch.full((R_HAT, R_HAT), 3.0))
        for key in ("gather01", "gather02", "gather11"):
            assert torch.equal(torch.from_numpy(result[key]), M), key
