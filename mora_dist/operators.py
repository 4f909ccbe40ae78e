"""MoRA's fixed operators: compression ``R^k -> R^r_hat``, decompression ``R^r_hat -> R^d`` and the dense ``dW``.

Pure tensor math: no ``nn.Module``, no ``torch.distributed``. Everything is defined on the *global* input and
output ids of the TP = 1 weight, so a tensor-parallel rank describes its shard by the global ids it holds
(``in_ids``, ``out_ids``) and the rows/columns of ``M`` it holds (``m_rows``, ``m_cols``), and computes exactly
its part of the TP = 1 function.

Notation (spec §1): ``k`` in_features, ``d`` out_features, ``M: (r_hat, r_hat)`` acting as ``z = M u``,
``n = ceil(k / r_hat)`` blocks of the wrap-padded input, ``L = n * r_hat``.

Spec: §2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mora_dist.autograd import (
    MAX_SLICES,
    BlockMatrixFn,
    BlockPlan,
    MergedWeightFn,
    SharedMatrixFn,
    SliceMap,
    add_delta,
)
from mora_dist.config import resolve_mora_type
from mora_dist.errors import MoRAConfigError, ShardingError

COMPRESSORS = {1: "stride_sum", 2: "block_sum", 3: "block_sum", 4: "stride_sum", 6: "rotate_reshape"}
DECOMPRESSORS = {1: "tile", 2: "interleave", 3: "tile", 4: "interleave", 6: "tile"}
ROPE_BASE = 10000.0
# From this many tokens on, a frozen fp32 base runs merged (x (W + dW)^T): building W + dW costs less than the
# adapter's separate passes over the input and output.
MERGE_MIN_TOKENS = 1024


def compute_r_hat(in_features: int, out_features: int, r: int, mora_type: int | str) -> int:
    """Side of the square matrix for a LoRA-equivalent rank ``r``: ``round(sqrt((k + d) * r))``, even for RoPE.

    Spec: §2.
    """
    r_hat = int(math.sqrt((in_features + out_features) * r) + 0.5)
    if resolve_mora_type(mora_type) == 6:
        r_hat = r_hat // 2 * 2
    return r_hat


def check_r_hat(in_features: int, out_features: int, r_hat: int, mora_type: int, where: str = "") -> None:
    """Raise if ``r_hat`` cannot work for a ``(out_features, in_features)`` layer of this type."""
    place = f" for layer {where!r}" if where else ""
    if r_hat < 1:
        raise MoRAConfigError(f"r_hat={r_hat}{place} must be positive; raise r or give a positive r_hat")
    if mora_type == 6 and (r_hat < 2 or r_hat % 2):
        raise MoRAConfigError(
            f"r_hat={r_hat}{place} must be even and at least 2 for mora_type=6 (rope); use r_hat={max(2, r_hat + 1)}"
        )
    if in_features < 1 or out_features < 1:
        raise MoRAConfigError(f"layer{place} has shape ({out_features}, {in_features}); MoRA needs both >= 1")


def num_blocks(in_features: int, r_hat: int) -> int:
    """``n = ceil(k / r_hat)``: blocks of the wrap-padded input. Spec: §2.1."""
    return -(-in_features // r_hat)


def group_ids(size: int, r_hat: int) -> torch.Tensor:
    """Block/interleave group of each of ``size`` features: the first ``size % r_hat`` groups hold
    ``size // r_hat + 1`` consecutive features, the others ``size // r_hat`` (zero when ``size < r_hat``).

    Returns ``(size,)`` long. Spec: §2.1 block-sum, §2.2 interleave.
    """
    q, m = divmod(size, r_hat)
    j = torch.arange(size)
    big = m * (q + 1)
    if q == 0:
        return j
    return torch.where(j < big, j // (q + 1), m + (j - big) // q)


def rope_tables(n: int, r_hat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin: (n, r_hat)`` with angle ``c * 10000^(-2l/r_hat)`` at ``(c, i)``, ``l = i mod r_hat/2``.

    Block 0 is unrotated. Built in float64. Spec: §2.1 rotate-reshape.
    """
    half = r_hat // 2
    inv_freq = ROPE_BASE ** (-torch.arange(0, r_hat, 2, dtype=torch.float64) / r_hat)  # (half,)
    angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)  # (n, half)
    angles = torch.cat([angles, angles], dim=-1)[:, : 2 * half]  # (n, r_hat)
    return angles.cos(), angles.sin()


def rotate_half(v: torch.Tensor) -> torch.Tensor:
    """``s = [-v[h:], v[:h]]`` on the last dim (the public code's pairing ``i <-> i + r_hat/2``)."""
    half = v.shape[-1] // 2
    return torch.cat([-v[..., half:], v[..., :half]], dim=-1)


def compress_pairs(in_features: int, r_hat: int, mora_type: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global compression as (source input id, target slot) pairs, one per (padded) position.

    Stride-sum: position ``t < n*r_hat`` reads input ``t mod k`` into slot ``t mod r_hat``.
    Block-sum: input ``j`` goes into slot ``g(j)``. Rotate-reshape: position ``t`` reads input ``t mod k`` into
    slot ``t`` of the ``(n * r_hat)``-long stream (blocks are rotated afterwards).
    Returns two ``(P,)`` long tensors. Spec: §2.1.
    """
    compressor = COMPRESSORS[mora_type]
    if compressor == "block_sum":
        return torch.arange(in_features), group_ids(in_features, r_hat)
    t = torch.arange(num_blocks(in_features, r_hat) * r_hat)
    return t % in_features, (t % r_hat if compressor == "stride_sum" else t)


def decompress_sources(out_features: int, r_hat: int, mora_type: int, in_features: int) -> torch.Tensor:
    """For each global output row, the slot of the ``M``-output stream it reads. ``(d,)`` long. Spec: §2.2."""
    o = torch.arange(out_features)
    if DECOMPRESSORS[mora_type] == "interleave":
        return group_ids(out_features, r_hat)
    period = r_hat if mora_type != 6 else num_blocks(in_features, r_hat) * r_hat
    return o % period


def lora_factors(M: torch.Tensor, in_features: int, out_features: int, mora_type: int | str) -> tuple[
    torch.Tensor, torch.Tensor
]:
    """The exact LoRA form of types 1-4: ``dW = D M C = B A`` with ``A = C``, ``B = D M``.

    ``C: (r_hat, k)`` is the compressor of :func:`compress_pairs` as a matrix (wrap-padding folded in, so an
    entry counts how often input ``j`` lands in slot ``a``); ``D: (d, r_hat)`` the 0/1 decompressor of
    :func:`decompress_sources`, so ``B`` is rows of ``M``. ``M: (r_hat, r_hat)`` global; returns
    ``A: (r_hat, k)``, ``B: (d, r_hat)`` in ``M``'s dtype (at least fp32).

    Raises:
        MoRAConfigError: ``mora_type=6``, whose block-rotary ``dW`` has no rank-``r_hat`` form.

    Spec: §2.5.
    """
    mora_type = resolve_mora_type(mora_type)
    if mora_type == 6:
        raise MoRAConfigError(
            "mora_type=6 (rope) has a block-diagonal dW of rank up to min(k, d): it has no exact low-rank LoRA "
            "form; export the merged model instead (launch/export.py without --adapter-only, or merge_mora)"
        )
    r_hat = M.shape[0]
    M = M.to(torch.promote_types(M.dtype, torch.float32))
    src, dst = compress_pairs(in_features, r_hat, mora_type)
    A = M.new_zeros(r_hat, in_features).index_put_((dst, src), M.new_ones(len(src)), accumulate=True)
    B = M.index_select(0, decompress_sources(out_features, r_hat, mora_type, in_features))
    return A, B


def _inverse(ids: torch.Tensor, size: int) -> torch.Tensor:
    inverse = torch.full((size,), -1, dtype=torch.long)
    inverse[ids] = torch.arange(len(ids))
    return inverse


@dataclass
class _Tables:
    """Index and RoPE tables of one operator on one device."""

    comp_src: torch.Tensor  # (P_local,) local input position of each kept compression pair
    comp_dst: torch.Tensor  # (P_local,) slot in u (local M column, or stream position for rope)
    dec_src: torch.Tensor  # (d_local,) slot of z read by each local output row
    full_src: torch.Tensor | None  # (n*r_hat,) global gather for non-divisible stride/rotate compression
    cos: torch.Tensor | None  # (n, r_hat)
    sin: torch.Tensor | None


class MoRAOperator:
    """The fixed compression/decompression pair of one MoRA layer (or of one tensor-parallel shard of it).

    Computes ``delta(x) = D(M C(x))`` for ``x: (..., k_local)``, returning ``(..., d_local)``, where ``C``, ``D``
    are defined on global ids (spec §4) and ``M: (len(m_rows), len(m_cols))`` is this rank's part of the
    global ``(r_hat, r_hat)`` matrix (all of it unless sharded; rope always uses all of it).

    Args:
        in_features: ``k`` of the TP = 1 weight.
        out_features: ``d`` of the TP = 1 weight.
        r_hat: side of the global square matrix.
        mora_type: 1, 2, 3, 4 or 6 (or a name).
        in_ids: global input ids of the local input features, ``(k_local,)``; default all, in order.
        out_ids: global output ids of the local output features, ``(d_local,)``; default all, in order.
        m_rows: global rows of ``M`` held locally (sharded column-parallel layers); default all.
        m_cols: global columns of ``M`` held locally (sharded row-parallel layers); default all.

    Spec: §2, §4.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r_hat: int,
        mora_type: int | str,
        *,
        in_ids: torch.Tensor | None = None,
        out_ids: torch.Tensor | None = None,
        m_rows: torch.Tensor | None = None,
        m_cols: torch.Tensor | None = None,
    ) -> None:
        self.mora_type = resolve_mora_type(mora_type)
        check_r_hat(in_features, out_features, r_hat, self.mora_type)
        self.in_features, self.out_features, self.r_hat = in_features, out_features, r_hat
        self.compressor = COMPRESSORS[self.mora_type]
        self.decompressor = DECOMPRESSORS[self.mora_type]
        self.n_blocks = num_blocks(in_features, r_hat)
        self.rope = self.mora_type == 6
        if self.rope and (m_rows is not None or m_cols is not None):
            raise ShardingError("mora_type=6 (rope) applies all of M to every block: M cannot be sharded")
        self.global_input = in_ids is None
        self.global_output = out_ids is None
        self.in_ids = torch.arange(in_features) if in_ids is None else torch.as_tensor(in_ids, dtype=torch.long)
        self.out_ids = torch.arange(out_features) if out_ids is None else torch.as_tensor(out_ids, dtype=torch.long)
        self.m_rows = torch.arange(r_hat) if m_rows is None else torch.as_tensor(m_rows, dtype=torch.long)
        self.m_cols = torch.arange(r_hat) if m_cols is None else torch.as_tensor(m_cols, dtype=torch.long)
        self.full_m = m_rows is None and m_cols is None
        self._cpu = self._build_tables()
        self._cache: dict[torch.device, _Tables] = {}
        self._fast_cpu = self._build_fast_plan()
        self._fast_cache: dict[torch.device, tuple] = {}

    @property
    def m_shape(self) -> tuple[int, int]:
        """Shape of the local part of ``M``."""
        return len(self.m_rows), len(self.m_cols)

    @property
    def stream_width(self) -> int:
        """Width of ``u`` (local ``M`` columns, or ``n * r_hat`` for rope)."""
        return self.n_blocks * self.r_hat if self.rope else len(self.m_cols)

    def _build_tables(self) -> _Tables:
        src, dst = compress_pairs(self.in_features, self.r_hat, self.mora_type)
        local_src = _inverse(self.in_ids, self.in_features)[src]
        keep = local_src >= 0
        comp_src, comp_dst = local_src[keep], dst[keep]
        dec_src = decompress_sources(self.out_features, self.r_hat, self.mora_type, self.in_features)[self.out_ids]
        if not self.rope:
            comp_dst = _inverse(self.m_cols, self.r_hat)[comp_dst]
            dec_src = _inverse(self.m_rows, self.r_hat)[dec_src]
            if (comp_dst < 0).any() or (dec_src < 0).any():
                raise ShardingError(
                    "the local rows/columns of M do not cover this shard's inputs and outputs; "
                    "use tensor_parallel_sharding='replicate'"
                )
        full_src = None
        if self.global_input and self.compressor != "block_sum" and self.in_features % self.r_hat:
            full_src = src
        cos = sin = None
        if self.rope:
            cos, sin = rope_tables(self.n_blocks, self.r_hat)
        return _Tables(comp_src, comp_dst, dec_src, full_src, cos, sin)

    def _build_fast_plan(self) -> tuple | None:
        """The compression and decompression as slice maps, plus the per-block matmul plan for rope; ``None``
        when rope's maps do not reduce to few matmuls (the index path of :meth:`compress` then runs)."""
        tab = self._cpu
        comp = SliceMap(tab.comp_src, tab.comp_dst, len(self.in_ids), self.stream_width)
        d_local = len(self.out_ids)
        z_width = self.stream_width if self.rope else len(self.m_rows)
        dec = SliceMap(torch.arange(d_local), tab.dec_src, d_local, z_width)
        if not self.rope:
            return comp, dec
        if not comp.sliceable or any(group[5] for group in comp.groups + dec.groups):
            return None  # the block plan reads tilings and wraps only
        plan = BlockPlan(comp, dec, self.n_blocks, self.r_hat, len(self.in_ids))
        return (plan,) if plan.num_matmuls <= 4 * MAX_SLICES else None

    def _fast(self, device: torch.device) -> tuple | None:
        if self._fast_cpu is None:
            return None
        device = torch.device(device)
        if device not in self._fast_cache:
            self._fast_cache[device] = tuple(part.to(device) for part in self._fast_cpu)
        return self._fast_cache[device]

    def tables(self, device: torch.device) -> _Tables:
        """The index/RoPE tables on ``device`` (built once per device; derived from shapes, never saved)."""
        device = torch.device(device)
        if device not in self._cache:
            self._cache[device] = _Tables(
                *(None if t is None else t.to(device) for t in vars(self._cpu).values())
            )
        return self._cache[device]

    # ---- compression ----
    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., k_local) -> u``: ``(..., r_hat_cols)``, or ``(..., n, r_hat)`` rotated blocks for rope."""
        tab = self.tables(x.device)
        k, r_hat = self.in_features, self.r_hat
        if self.global_input and self.full_m:
            if self.compressor == "block_sum":
                return _block_sum(x, k, r_hat)
            padded = x if tab.full_src is None else x.index_select(-1, tab.full_src)  # (..., n*r_hat)
            blocks = padded.unflatten(-1, (self.n_blocks, r_hat))  # (..., n, r_hat)
            if self.compressor == "stride_sum":
                return blocks.sum(-2)
            return self._rotate(blocks, tab)
        # A tensor-parallel shard: scatter the local inputs into their global slots.
        u = x.new_zeros(*x.shape[:-1], self.stream_width)
        u = u.index_add(-1, tab.comp_dst, x.index_select(-1, tab.comp_src))
        if self.rope:
            return self._rotate(u.unflatten(-1, (self.n_blocks, r_hat)), tab)
        return u

    def _rotate(self, blocks: torch.Tensor, tab: _Tables) -> torch.Tensor:
        cos, sin = tab.cos.to(blocks.dtype), tab.sin.to(blocks.dtype)
        return blocks * cos + rotate_half(blocks) * sin  # (..., n, r_hat)

    # ---- the square matrix ----
    def apply_matrix(self, u: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """``z = M u`` per token (and per block for rope); returns ``(..., z_width)``."""
        z = u @ M.t()
        return z.flatten(-2) if self.rope else z

    # ---- decompression ----
    def decompress_add(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``y + D z`` for ``y: (..., d_local)``, ``z: (..., z_width)``. Broadcasts instead of repeating where
        the output divides evenly."""
        d = self.out_features
        if self.global_output and self.full_m:
            width = z.shape[-1]
            if self.decompressor == "tile" and d % width == 0:
                return (y.unflatten(-1, (d // width, width)) + z.unsqueeze(-2)).flatten(-2)
            if self.decompressor == "interleave" and d % self.r_hat == 0:
                return (y.unflatten(-1, (self.r_hat, d // self.r_hat)) + z.unsqueeze(-1)).flatten(-2)
        return y + z.index_select(-1, self.tables(z.device).dec_src)

    def forward(self, x: torch.Tensor, M: torch.Tensor, y: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """``y + D(M C(x))``: the adapter's contribution added to the base output ``y``.

        Runs the slice-based autograd functions of :mod:`mora_dist.autograd` (no ``k``-wide copies, little
        saved for backward); falls back to the index path when the maps are scattered. With ``inplace`` the
        result is written into ``y`` (which must be a fresh output nobody else reads, e.g. the base layer's).
        """
        # An in-place autograd function on a view (F.linear returns one for 3-D inputs) gets its gradients
        # mis-routed by autograd's CopySlices, which assumes the written tensor is the function's first input.
        inplace = inplace and not y._is_view()
        out = self.forward_fused(x, M, y=y, inplace=inplace)
        if out is None:
            z = self.apply_matrix(self.compress(x.to(M.dtype)), M)
            out = self.decompress_add(y, z.to(y.dtype))
        return out

    def forward_fused(self, x: torch.Tensor, M: torch.Tensor, *, y: torch.Tensor | None = None,
                      weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      inplace: bool = False) -> torch.Tensor | None:
        """``y + D(M C(x))``, or ``x W^T + b + D(M C(x))`` for a frozen ``weight: (d, k)`` (whose ``dX`` the
        adapter's then accumulates into, saving a ``k``-wide pass); ``None`` where no fast path applies."""
        fast = self._fast(x.device)
        if fast is None:
            return None
        if weight is not None and weight.dtype.itemsize >= 4 and x.shape[:-1].numel() >= MERGE_MIN_TOKENS:
            return MergedWeightFn.apply(x, M, weight, bias, fast, self if self.rope else None)
        if self.rope:
            if x.dtype != (y if weight is None else weight).dtype:
                return None
            return BlockMatrixFn.apply(x, M, y, weight, bias, fast[0], inplace, self)
        return SharedMatrixFn.apply(x, M, y, weight, bias, fast[0], fast[1], inplace)

    def rotated_blocks(self, M: torch.Tensor) -> torch.Tensor:
        """``P_c = M R_c`` for every block: ``(n, r_hat, r_hat)``; column ``b`` of ``P_c`` is
        ``M[:, b] cos(phi_(c,b)) + Mtilde[:, b] sin(phi_(c,b))``. Spec: §2.4 (type 6)."""
        tab = self.tables(M.device)
        half = self.r_hat // 2
        m_tilde = torch.cat([M[:, half:], -M[:, :half]], dim=1)  # (r_hat, r_hat)
        return M * tab.cos.to(M.dtype)[:, None, :] + m_tilde * tab.sin.to(M.dtype)[:, None, :]

    def rotated_blocks_adjoint(self, grad_P: torch.Tensor) -> torch.Tensor:
        """The transpose of :meth:`rotated_blocks`: ``dM: (r_hat, r_hat)`` from ``dP: (n, r_hat, r_hat)``, so the
        autograd functions save ``M`` instead of the ``n`` blocks."""
        tab = self.tables(grad_P.device)
        half = self.r_hat // 2
        through_m = (grad_P * tab.cos.to(grad_P.dtype)[:, None, :]).sum(0)  # (r_hat, r_hat)
        through_tilde = (grad_P * tab.sin.to(grad_P.dtype)[:, None, :]).sum(0)  # dL/dMtilde
        # Mtilde[:, b] = M[:, b + half] (b < half), -M[:, b - half] (b >= half)
        first = through_m[:, :half] - through_tilde[:, half:]
        second = through_m[:, half:] + through_tilde[:, :half]
        return torch.cat([first, second], dim=1)

    # ---- dense delta ----
    def delta_weight(self, M: torch.Tensor) -> torch.Tensor:
        """Dense ``dW: (d_local, k_local)`` with ``delta(x) == x @ dW.T``; built by slice adds (or gathers and
        index_add where the maps are scattered) in at least fp32, no loop over features.

        Spec: §2.4.
        """
        tab = self.tables(M.device)
        M = M.to(torch.promote_types(M.dtype, torch.float32))
        k_local = len(self.in_ids)
        fast = self._fast(M.device)
        if fast is not None:  # the same slices the forward runs
            out = M.new_zeros(len(self.out_ids), k_local)
            return add_delta(out, self.rotated_blocks(M) if self.rope else M, fast, self.rope)
        if not self.rope:
            # (M C)[:, j] = sum over pairs (j, a) of M[:, a]; then row o of dW is row dec_src[o] of M C.
            mc = M.new_zeros(M.shape[0], k_local).index_add(1, tab.comp_src, M.index_select(1, tab.comp_dst))
            return mc.index_select(0, tab.dec_src)
        n, r_hat = self.n_blocks, self.r_hat
        blocks = self.rotated_blocks(M)  # (n, r_hat, r_hat)
        block_of, col_of = tab.comp_dst // r_hat, tab.comp_dst % r_hat
        values = blocks.permute(0, 2, 1)[block_of, col_of]  # (P, r_hat): column col_of of P_block
        full = M.new_zeros(n * k_local, r_hat).index_add(0, block_of * k_local + tab.comp_src, values)
        full = full.view(n, k_local, r_hat).permute(0, 2, 1).reshape(n * r_hat, k_local)  # (n*r_hat, k_local)
        return full.index_select(0, tab.dec_src)


def _block_sum(x: torch.Tensor, k: int, r_hat: int) -> torch.Tensor:
    """Uneven block sums by two views: ``m`` blocks of ``q + 1`` then ``r_hat - m`` blocks of ``q``
    (zero-extension when ``k < r_hat``). ``(..., k) -> (..., r_hat)``."""
    q, m = divmod(k, r_hat)
    if m == 0:
        return x.unflatten(-1, (r_hat, q)).sum(-1)
    big = m * (q + 1)
    head = x[..., :big].unflatten(-1, (m, q + 1)).sum(-1)  # (..., m)
    tail = x[..., big:].unflatten(-1, (r_hat - m, q)).sum(-1)  # (..., r_hat - m), zeros when q == 0
    return torch.cat([head, tail], dim=-1)
