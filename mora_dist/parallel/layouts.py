"""Rank-local <-> TP = 1 feature ids of Megatron's partitions, and where the square matrix lives (shard plans).

Pure index math (no megatron, no ``torch.distributed``): every function takes ``tp_size``/``tp_rank`` explicitly.

Megatron's layouts, read from megatron-core 0.16:
- ``ColumnParallelLinear`` splits output rows like ``_initialize_affine_weight_cpu``: the ``d`` rows form
  ``stride * tp`` equal chunks and rank ``t`` holds chunks ``t, t + tp, ...`` (``stride`` is the weight's
  ``partition_stride``). Fused ``linear_qkv`` is per query group ``[q_g, k_g, v_g]`` at TP = 1 and split
  contiguously (``stride = 1``; ``attention.py``: "q1 q2 k1 v1 | q3 q4 k2 v2"), so its local rows are a contiguous
  slice of the TP = 1 rows. Gated ``linear_fc1`` holds ``[gate_t; up_t]`` locally (``mlp.py`` chunks the local
  output in two), i.e. TP = 1 rows ``[gate; up]`` with ``stride = 2``.
- ``RowParallelLinear`` splits input columns contiguously.

A shard plan says which global rows (column-parallel) or columns (row-parallel) of ``M`` a rank holds. ``M`` is
sharded when the ranks' needed rows/columns partition ``range(r_hat)`` in Megatron's chunk pattern (so the
parameter is split exactly like a base weight, with the same ``partition_stride``); otherwise it is replicated.

Spec: §4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mora_dist.errors import ShardingError
from mora_dist.operators import compress_pairs, decompress_sources

SHARDABLE = {
    "column": "interleave decompression (mora_type 2 or 4)",
    "row": "block-sum compression (mora_type 2 or 3)",
}


def partition_ids(size: int, tp_size: int, tp_rank: int, *, stride: int = 1) -> torch.Tensor:
    """Global ids of the features rank ``tp_rank`` holds of a ``size``-long partitioned dim. ``(size / tp,)``.

    Raises:
        ShardingError: ``size`` is not divisible by ``stride * tp_size``.
    """
    if size % (stride * tp_size):
        raise ShardingError(
            f"a dimension of size {size} cannot be split into {stride} x {tp_size} (partition_stride x TP) "
            f"equal chunks; choose a TP size that divides {size // stride if size % stride == 0 else size}"
        )
    chunk = size // (stride * tp_size)
    starts = [(c * tp_size + tp_rank) * chunk for c in range(stride)]
    return torch.cat([torch.arange(s, s + chunk) for s in starts])


@dataclass(frozen=True)
class ShardPlan:
    """How one rank holds a MoRA layer: global feature ids of its base shard and its part of ``M``.

    Attributes:
        in_ids: global input ids of the local input features, or None for all (column-parallel).
        out_ids: global output ids of the local output rows, or None for all (row-parallel).
        m_dim: 0 if ``M``'s rows are sharded, 1 if its columns are, None if ``M`` is replicated.
        m_ids: global rows (``m_dim=0``) or columns (``m_dim=1``) of ``M`` held here; None when replicated.
        m_stride: chunks per rank of the sharded dim (Megatron's ``partition_stride``).
        reason: why ``M`` is replicated (empty when sharded).
    """

    in_ids: torch.Tensor | None
    out_ids: torch.Tensor | None
    m_dim: int | None
    m_ids: torch.Tensor | None
    m_stride: int
    reason: str

    @property
    def m_rows(self) -> torch.Tensor | None:
        return self.m_ids if self.m_dim == 0 else None

    @property
    def m_cols(self) -> torch.Tensor | None:
        return self.m_ids if self.m_dim == 1 else None

    def same_matrix_layout(self, other: ShardPlan) -> bool:
        """Whether both plans hold the same part of ``M`` (so the parameter can stay as it is)."""
        if self.m_dim != other.m_dim:
            return False
        return self.m_dim is None or torch.equal(self.m_ids, other.m_ids)


def _chunk_stride(needed: list[torch.Tensor], r_hat: int) -> int | None:
    """The stride ``s`` if rank ``t`` needs exactly chunks ``t, t + tp, ...`` of ``s * tp`` equal chunks of
    ``range(r_hat)`` (Megatron's pattern, so the ranks' sets partition ``M``); else None."""
    tp = len(needed)
    for stride in (1, 2):
        if r_hat % (stride * tp):
            continue
        if all(torch.equal(ids, partition_ids(r_hat, tp, t, stride=stride)) for t, ids in enumerate(needed)):
            return stride
    return None


def _needed(layer: str, in_features: int, out_features: int, r_hat: int, mora_type: int, ids: torch.Tensor):
    """Sorted global rows (column) / columns (row) of ``M`` that a shard with these feature ids reads."""
    if layer == "column":
        return torch.unique(decompress_sources(out_features, r_hat, mora_type, in_features)[ids])
    src, dst = compress_pairs(in_features, r_hat, mora_type)
    mask = torch.zeros(in_features, dtype=torch.bool)
    mask[ids] = True
    return torch.unique(dst[mask[src]])


def plan_shard(
    layer: str,
    in_features: int,
    out_features: int,
    r_hat: int,
    mora_type: int,
    *,
    tp_size: int,
    tp_rank: int,
    stride: int = 1,
    sharding: str = "auto",
    where: str = "",
) -> ShardPlan:
    """The shard plan of rank ``tp_rank`` for a ``layer`` (``"column"`` or ``"row"``) parallel base.

    Args:
        layer: ``"column"`` (output rows split) or ``"row"`` (input columns split).
        in_features: ``k`` of the TP = 1 weight.
        out_features: ``d`` of the TP = 1 weight.
        r_hat: side of ``M``.
        mora_type: resolved type number.
        tp_size: tensor-parallel size; tp_rank: this rank in the tensor-parallel group.
        stride: the base weight's ``partition_stride`` (2 for gated ``linear_fc1``).
        sharding: ``"auto"`` (shard when possible), ``"replicate"``, or ``"shard"`` (raise if impossible).
        where: module name for error messages.

    Raises:
        ShardingError: ``sharding="shard"`` and ``M`` cannot be split like the base (the message says what to change).

    Spec: §4.
    """
    size = out_features if layer == "column" else in_features
    ids_all = [partition_ids(size, tp_size, t, stride=stride if layer == "column" else 1) for t in range(tp_size)]
    in_ids = ids_all[tp_rank] if layer == "row" and tp_size > 1 else None
    out_ids = ids_all[tp_rank] if layer == "column" and tp_size > 1 else None
    if tp_size == 1:
        return ShardPlan(in_ids, out_ids, None, None, 1, "TP = 1")
    reason = ""
    if sharding == "replicate":
        reason = "tensor_parallel_sharding='replicate'"
    elif mora_type == 6:
        reason = "mora_type=6 (rope) applies all of M to every block"
    else:
        needed = [_needed(layer, in_features, out_features, r_hat, mora_type, ids) for ids in ids_all]
        m_stride = _chunk_stride(needed, r_hat)
        if m_stride is not None:
            return ShardPlan(in_ids, out_ids, 0 if layer == "column" else 1, needed[tp_rank], m_stride, "")
        reason = f"the {layer}-parallel shards of this shape need overlapping parts of M"
    if sharding == "shard":
        raise ShardingError(
            _shard_error(layer, in_features, out_features, r_hat, mora_type, tp_size, stride, where, reason)
        )
    return ShardPlan(in_ids, out_ids, None, None, 1, reason)


def _shard_error(layer, in_features, out_features, r_hat, mora_type, tp_size, stride, where, reason) -> str:
    place = f"{where}: " if where else ""
    msg = (
        f"{place}tensor_parallel_sharding='shard' but M ({r_hat} x {r_hat}) of this {layer}-parallel layer "
        f"(in_features={in_features}, out_features={out_features}, mora_type={mora_type}) cannot be split over "
        f"TP={tp_size}: {reason}. Sharding needs {SHARDABLE[layer]}"
    )
    if mora_type != 6 and mora_type in ((2, 4) if layer == "column" else (2, 3)):
        good = suggest_r_hat(layer, in_features, out_features, r_hat, mora_type, tp_size=tp_size, stride=stride)
        if good is not None:
            msg += f"; r_hat={good} would shard (a multiple of TP that aligns M's groups with the base shards)"
    return msg + "; or use tensor_parallel_sharding='auto' to replicate M where it cannot be sharded"


def suggest_r_hat(
    layer: str, in_features: int, out_features: int, r_hat: int, mora_type: int, *, tp_size: int, stride: int = 1
) -> int | None:
    """The ``r_hat`` nearest to ``r_hat`` (within a factor 2) whose ``M`` shards over ``tp_size``; None if none."""
    candidates = sorted(range(max(tp_size, r_hat // 2), 2 * r_hat + 1), key=lambda c: (abs(c - r_hat), c))
    for cand in candidates:
        if cand % tp_size:
            continue
        plan = plan_shard(layer, in_features, out_features, cand, mora_type, tp_size=tp_size, tp_rank=0, stride=stride)
        if plan.m_dim is not None:
            return cand
    return None
