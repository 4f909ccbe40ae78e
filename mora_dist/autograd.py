"""Fast execution of MoRA's operators: 0/1 maps as contiguous slices, and hand-written backward passes.

The index tables of :mod:`mora_dist.operators` define every compression and decompression as a 0/1 matrix
``S: (narrow, wide)`` (``u = x S^T`` compresses, ``y + z S`` decompresses). Here such a map runs as a few
slice operations on views (no gathers, no padding copies, no materialised repeats) where its pairs form long
contiguous runs, and as ``index_select``/``index_add`` otherwise. The adjoint of a map is the same map used the
other way: the adjoint of tiling is a stride-sum, of interleaving a block-sum, of wrap-padded stride-sum a wrap
tiling.

Three autograd functions use them:

- ``SharedMatrixFn`` (types 1-4): ``y + D(M C(x))``; saves ``u`` (``r_hat`` wide, at the input's precision at
  most) and ``M``, not the ``k``-wide input.
- ``BlockMatrixFn`` (type 6): the rotation folded into ``P_c = M R_c``, one matmul per (block, slice) from
  ``x`` straight into the output, truncated blocks skipped; saves ``x`` (by reference) and ``M``. Its matmuls
  run in the input's dtype (as under autocast).
- ``MergedWeightFn``: ``x (W + dW)^T + b`` for a frozen fp32 base, one GEMM forward and one for ``dX``.

The first two add into ``y`` in place on request, or compute a frozen base inside (its ``dX`` is then the
buffer the adapter's accumulates into). Dense ``dW`` (:func:`add_delta`) runs on the same slices.

Spec: §2.1, §2.2.
"""

from __future__ import annotations

import torch

MAX_SLICES = 64  # beyond this many slices a gather is cheaper than a Python loop over slices


def _runs(wide_ids: torch.Tensor, narrow_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs ``(wide_start, narrow_start, length)`` over which both id lists step by one."""
    if len(wide_ids) == 0:
        return []
    breaks = (((wide_ids.diff() != 1) | (narrow_ids.diff() != 1)).nonzero().flatten() + 1).tolist()
    return [(int(wide_ids[s]), int(narrow_ids[s]), e - s) for s, e in zip([0, *breaks], [*breaks, len(wide_ids)])]


def _gaps(covered: torch.Tensor) -> list[tuple[int, int]]:
    ids = (~covered).nonzero().flatten()
    return [(w, w + length) for w, _, length in _runs(ids, ids)]


class SliceMap:
    """A 0/1 map ``S: (narrow, wide)`` given by pairs ``(wide_ids[i], narrow_ids[i])``, executed on slices.

    Pairs are grouped into ``(wide, narrow, length, count, first, blocked)``: the wide range
    ``[wide, wide + length * count)`` viewed as ``(count, length)`` maps its rows onto the narrow slice
    ``[narrow, narrow + length)`` (a tiling or wrap), or, when ``blocked``, viewed as ``(length, count)`` maps
    row ``i`` (``count`` consecutive ids) onto narrow id ``narrow + i`` (a block-sum or interleave). ``first``
    marks the first write to a wide range (later ones wrap around and accumulate in :meth:`spread`); wide ranges
    no pair touches (``gaps``) keep ``base`` or zero.
    """

    def __init__(self, wide_ids: torch.Tensor, narrow_ids: torch.Tensor, wide: int, narrow: int) -> None:
        self.wide, self.narrow = wide, narrow
        self.wide_ids, self.narrow_ids = wide_ids, narrow_ids
        tiled: list[list[int]] = []  # [wide_start, narrow_start, length, count]
        for w, n, length in _runs(wide_ids, narrow_ids):
            last = tiled[-1] if tiled else None
            if last and last[1] == n and last[2] == length and last[0] + length * last[3] == w:
                last[3] += 1  # the same narrow slice again, right after: one more row of a tiling
            else:
                tiled.append([w, n, length, 1])
        merged = [[*group, False] for group in tiled]  # [wide_start, narrow_start, length, count, blocked]
        blocked = _blocked_groups(wide_ids, narrow_ids) if len(merged) > 2 else None
        if blocked is not None and len(blocked) < len(merged):
            merged = blocked
        covered = torch.zeros(wide, dtype=torch.bool)
        self.groups: list[tuple[int, int, int, int, bool, bool]] = []
        self.sliceable = len(merged) <= MAX_SLICES
        for w, n, length, count, blocked in merged:
            span = covered[w : w + length * count]
            self.sliceable &= bool(span.all()) or not bool(span.any())
            self.groups.append((w, n, length, count, not bool(span.any()), blocked))
            span.fill_(True)
        self.gaps = _gaps(covered)
        self.full_first = bool(self.groups) and self.groups[0][1] == 0 and self.groups[0][2] == narrow

    def to(self, device: torch.device) -> SliceMap:
        clone = object.__new__(SliceMap)
        clone.__dict__.update(self.__dict__)
        clone.wide_ids, clone.narrow_ids = self.wide_ids.to(device), self.narrow_ids.to(device)
        return clone

    @staticmethod
    def _views(t: torch.Tensor, w: int, length: int, count: int, blocked: bool) -> tuple[torch.Tensor, int]:
        """The wide slice of group as ``(T, length, count)`` (blocked) or ``(T, count, length)``, and the
        dimension that repeats."""
        span = t[:, w : w + length * count]
        return (span.unflatten(-1, (length, count)), -1) if blocked else (span.unflatten(-1, (count, length)), -2)

    def sum(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x S^T``: ``(T, wide) -> (T, narrow)`` in ``dtype``, without a ``wide`` copy of ``x`` in ``dtype``
        (a low-precision ``x`` is reduced in its dtype with fp32 accumulation, rounded once per group)."""
        if not self.sliceable:
            picked = x.index_select(-1, self.wide_ids).to(dtype)
            return x.new_zeros(x.shape[0], self.narrow, dtype=dtype).index_add_(-1, self.narrow_ids, picked)
        out = None
        for i, (w, n, length, count, _, blocked) in enumerate(self.groups):
            part, dim = self._views(x, w, length, count, blocked)
            # Mixed-dtype elementwise ops copy whole operands on CPU: reduce in x's dtype (bf16 reductions
            # accumulate in fp32 on CPU and CUDA), then convert the narrow result once.
            total = (part.sum(dim) if count > 1 else part.select(dim, 0).clone()).to(dtype)
            if out is None and i == 0 and self.full_first:
                out = total
                continue
            if out is None:
                out = x.new_zeros(x.shape[0], self.narrow, dtype=dtype)
            out[:, n : n + length] += total
        return out if out is not None else x.new_zeros(x.shape[0], self.narrow, dtype=dtype)

    def spread(self, z: torch.Tensor, base: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """``base + z S``: ``(T, narrow) -> (T, wide)`` in ``dtype`` (``base`` zero when ``None``)."""
        if not self.sliceable:
            out = base.to(dtype, copy=True) if base is not None else z.new_zeros(z.shape[0], self.wide, dtype=dtype)
            return out.index_add_(-1, self.wide_ids, z.index_select(-1, self.narrow_ids).to(dtype))
        out, z = z.new_empty(z.shape[0], self.wide, dtype=dtype), z.to(dtype)  # same-dtype adds: no hidden copies
        for w, n, length, count, first, blocked in self.groups:
            target, dim = self._views(out, w, length, count, blocked)
            source = z[:, n : n + length].unsqueeze(dim)
            if not first:
                target += source
            elif base is not None:
                torch.add(self._views(base, w, length, count, blocked)[0], source, out=target)
            else:
                target.copy_(source)
        for a, b in self.gaps:
            out[:, a:b] = base[:, a:b] if base is not None else 0
        return out

    def add_into(self, out: torch.Tensor, z: torch.Tensor) -> None:
        """``out += z S`` in place, ``out: (T, wide)``."""
        if not self.sliceable:
            out.index_add_(-1, self.wide_ids, z.index_select(-1, self.narrow_ids).to(out.dtype))
            return
        z = z.to(out.dtype)  # same-dtype adds: no hidden copies of out
        for w, n, length, count, _, blocked in self.groups:
            target, dim = self._views(out, w, length, count, blocked)
            target.add_(z[:, n : n + length].unsqueeze(dim))

    def add_rows_into(self, out: torch.Tensor, z: torch.Tensor) -> None:
        """``out += S^T z`` in place along rows, ``out: (wide, K)``, ``z: (narrow, K)``: contiguous row blocks
        (the transposed :meth:`add_into` would walk ``out`` column by column)."""
        if not self.sliceable:
            out.index_add_(0, self.wide_ids, z.index_select(0, self.narrow_ids).to(out.dtype))
            return
        z = z.to(out.dtype)
        for w, n, length, count, _, blocked in self.groups:
            span = out[w : w + length * count]
            if blocked:
                span.unflatten(0, (length, count)).add_(z[n : n + length].unsqueeze(1))
            else:
                span.unflatten(0, (count, length)).add_(z[n : n + length].unsqueeze(0))


def _blocked_groups(wide_ids: torch.Tensor, narrow_ids: torch.Tensor) -> list[list] | None:
    """Groups for consecutive wide ids whose narrow ids step by 0 or 1 (block-sum, interleave): runs of
    equal-size blocks as ``[wide_start, narrow_start, blocks, block_size, True]``; ``None`` otherwise."""
    steps = narrow_ids.diff()
    if len(wide_ids) < 2 or (wide_ids.diff() != 1).any() or ((steps != 0) & (steps != 1)).any():
        return None
    values, sizes = torch.unique_consecutive(narrow_ids, return_counts=True)
    groups: list[list] = []
    w = int(wide_ids[0])
    for n, size in zip(values.tolist(), sizes.tolist()):
        last = groups[-1] if groups else None
        if last and last[3] == size and last[1] + last[2] == n:
            last[2] += 1
        else:
            groups.append([w, n, 1, size, True])
        w += size
    return groups


def _base_output(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, inplace: bool) -> tuple[torch.Tensor, bool]:
    """The tensor the adapter adds into, and whether it is written in place: the frozen base's output computed
    here (``weight`` given), ``y`` itself (``inplace``) or a copy of it."""
    if weight is not None:
        return torch.nn.functional.linear(x, weight, bias), False
    return (y, True) if inplace else (y.clone(), False)


def _base_grad_x(grad: torch.Tensor, weight: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``dX`` of the fused frozen base, ``(T, k)``, that the adapter's ``dX`` then accumulates into."""
    return None if weight is None else grad.reshape(-1, grad.shape[-1]) @ weight.to(x.dtype)


class SharedMatrixFn(torch.autograd.Function):
    """``y + D(M C(x))`` for ``x: (..., k)``, ``M: (rows, cols)``, ``y: (..., d)``; types 1-4.

    With ``weight`` (and ``bias``) of a frozen linear layer instead of ``y``, the base output is computed
    here, and its ``dX`` in backward is the buffer the adapter's ``dX`` accumulates into. Spec: §2.
    """

    @staticmethod
    def forward(ctx, x, M, y, weight, bias, comp: SliceMap, dec: SliceMap, inplace: bool):
        u = comp.sum(x.reshape(-1, x.shape[-1]), M.dtype)  # (T, cols)
        z = u @ M.t()  # (T, rows)
        ctx.comp, ctx.dec, ctx.x_meta = comp, dec, (x.shape, x.dtype)
        # u carries no more than the input's precision into dM; keeping it there halves the saved bytes in bf16.
        ctx.save_for_backward(u.to(x.dtype) if x.dtype.itemsize < u.dtype.itemsize else u, M, weight)
        if weight is None and not inplace:
            return dec.spread(z, y.reshape(-1, y.shape[-1]), y.dtype).view(y.shape)
        out, dirty = _base_output(x, y, weight, bias, inplace)
        dec.add_into(out.view(-1, out.shape[-1]), z)
        if dirty:
            ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        u, M, weight = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        dz = ctx.dec.sum(grad.reshape(-1, grad.shape[-1]), M.dtype)  # (T, rows)
        grad_x = grad_M = None
        if ctx.needs_input_grad[0]:
            grad_x = _base_grad_x(grad, weight, u)
            if grad_x is None:
                grad_x = ctx.comp.spread(dz @ M, None, x_dtype)
            else:
                ctx.comp.add_into(grad_x, dz @ M)
            grad_x = grad_x.view(x_shape)
        if ctx.needs_input_grad[1]:
            grad_M = dz.t() @ u.to(M.dtype)
        return grad_x, grad_M, grad if ctx.needs_input_grad[2] else None, None, None, None, None, None


class BlockPlan:
    """Which matmuls type 6 runs: for each block ``c`` the row ranges of ``P_c`` whose outputs are read
    (``pieces``: ``(row_lo, row_hi, column)``, the column of the target that row ``row_lo`` lands in) and the
    slices of ``x`` its padded block reads (``segments``: ``(x_start, block_column, length, first)``).

    The target is the output itself when every stream position is read at most once (``direct``), else a
    ``(T, n * r_hat)`` buffer spread by ``dec`` (tiling when ``d > n * r_hat``). Spec: §2.1, §2.2.
    """

    def __init__(self, comp: SliceMap, dec: SliceMap, n_blocks: int, r_hat: int, k_local: int) -> None:
        self.dec, self.r_hat = dec, r_hat
        self.direct = dec.sliceable and len(dec.narrow_ids.unique()) == len(dec.narrow_ids)
        stream_groups = dec.groups if self.direct else [(t, t, 1, 1) for t in dec.narrow_ids.unique().tolist()]
        pieces: dict[int, list] = {}
        for w, t, length, count, *_ in stream_groups:
            for start, stop in _split(t, t + length * count, r_hat):
                c = start // r_hat
                lo, hi, col = start - c * r_hat, stop - c * r_hat, (w + start - t if self.direct else start)
                last = pieces.get(c, [])[-1:] or None
                if last and last[0][1] == lo and last[0][2] + (last[0][1] - last[0][0]) == col:
                    pieces[c][-1] = (last[0][0], hi, last[0][2])  # extend a contiguous piece
                else:
                    pieces.setdefault(c, []).append((lo, hi, col))
        covered = torch.zeros(k_local, dtype=torch.bool)
        self.blocks = []
        self.zero_init = False
        for c in sorted(pieces):
            segments = []
            for w, t, length, count, *_ in comp.groups:
                for i in range(count):
                    for start, stop in _split(t, t + length, r_hat):
                        if start // r_hat == c:
                            x0 = w + i * length + start - t
                            span = covered[x0 : x0 + stop - start]
                            self.zero_init |= bool(span.any()) and not bool(span.all())
                            segments.append((x0, start - c * r_hat, stop - start, not bool(span.any())))
                            span.fill_(True)
            self.blocks.append((c, pieces[c], segments))
        self.gaps = _gaps(covered)
        self.num_matmuls = sum(len(p) * len(s) for _, p, s in self.blocks)

    def to(self, device: torch.device) -> BlockPlan:
        clone = object.__new__(BlockPlan)
        clone.__dict__.update(self.__dict__)
        clone.dec = self.dec.to(device)
        return clone


def _split(start: int, stop: int, r_hat: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut at multiples of ``r_hat``."""
    cuts = []
    while start < stop:
        end = min(stop, (start // r_hat + 1) * r_hat)
        cuts.append((start, end))
        start = end
    return cuts


class BlockMatrixFn(torch.autograd.Function):
    """``y + D blockdiag(P_0, ..) C_pad(x)`` for ``x: (..., k)``, ``M: (r_hat, r_hat)``, ``y: (..., d)``; type 6.

    ``fold`` (the operator) gives ``P = fold.rotated_blocks(M): (n, r_hat, r_hat)`` and the adjoint back to
    ``dM``; ``weight``/``bias`` as in :class:`SharedMatrixFn`. Spec: §2.1 rotate-reshape, §2.2.
    """

    @staticmethod
    def forward(ctx, x, M, y, weight, bias, plan: BlockPlan, inplace: bool, fold):
        P = fold.rotated_blocks(M)  # (n, r_hat, r_hat); rebuilt in backward rather than saved
        x2, Pc = x.reshape(-1, x.shape[-1]), P.to(x.dtype)  # (T, k), blocks in the compute dtype
        out, dirty = _base_output(x, y, weight, bias, inplace)
        out2 = out.view(-1, out.shape[-1])
        target = out2 if plan.direct else x2.new_zeros(x2.shape[0], plan.dec.narrow)
        for c, pieces, segments in plan.blocks:
            for lo, hi, col in pieces:
                block_out = target[:, col : col + hi - lo]  # (T, rows)
                for w, n, length, _ in segments:
                    block_out.addmm_(x2[:, w : w + length], Pc[c, lo:hi, n : n + length].t())
        if not plan.direct:
            plan.dec.add_into(out2, target)
        ctx.plan, ctx.fold = plan, fold
        ctx.save_for_backward(x, M, weight)
        if dirty:
            ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, M, weight = ctx.saved_tensors
        plan, P = ctx.plan, ctx.fold.rotated_blocks(M)
        x2, Pc = x.reshape(-1, x.shape[-1]), P.to(x.dtype)
        grad2 = grad.reshape(-1, grad.shape[-1])
        source = grad2 if plan.direct else plan.dec.sum(grad2, x.dtype)  # (T, d) or (T, n * r_hat)
        want_x, want_P = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = _base_grad_x(grad, weight, x) if want_x else None
        accumulate = grad_x is not None or plan.zero_init
        if want_x and grad_x is None:
            grad_x = (x2.new_zeros if plan.zero_init else x2.new_empty)(x2.shape)
        grad_P = torch.zeros_like(P) if want_P else None
        for c, pieces, segments in plan.blocks:
            for w, n, length, first in segments:
                for i, (lo, hi, col) in enumerate(pieces):
                    g = source[:, col : col + hi - lo]  # (T, rows)
                    if want_x:
                        if first and i == 0 and not accumulate:
                            torch.mm(g, Pc[c, lo:hi, n : n + length], out=grad_x[:, w : w + length])
                        else:
                            grad_x[:, w : w + length].addmm_(g, Pc[c, lo:hi, n : n + length])
                    if want_P:
                        grad_P[c, lo:hi, n : n + length] += g.t() @ x2[:, w : w + length]
        if want_x:
            if not accumulate:
                for a, b in plan.gaps:
                    grad_x[:, a:b] = 0
            grad_x = grad_x.view(x.shape)
        grad_M = ctx.fold.rotated_blocks_adjoint(grad_P) if want_P else None
        return grad_x, grad_M, grad if ctx.needs_input_grad[2] else None, None, None, None, None, None


def add_delta(out: torch.Tensor, A: torch.Tensor, fast: tuple, rope: bool) -> torch.Tensor:
    """``out += dW`` in place for ``out: (d_local, k_local)``, with ``A`` = ``M`` (types 1-4, ``fast = (comp,
    dec)``) or the rotated blocks ``P`` (type 6, ``fast = (plan,)``). Slices only, no loop over features.

    Spec: §2.4.
    """
    if not rope:
        comp, dec = fast
        mc = comp.spread(A, None, out.dtype)  # (rows, k_local): M C
        dec.add_rows_into(out, mc)  # row o of dW is row dec(o) of M C
        return out
    plan = fast[0]
    target = out if plan.direct else out.new_zeros(plan.dec.narrow, out.shape[1])  # rows: outputs or stream
    for c, pieces, segments in plan.blocks:
        for lo, hi, col in pieces:
            for w, n, length, _ in segments:
                target[col : col + hi - lo, w : w + length] += A[c, lo:hi, n : n + length]
    if not plan.direct:
        plan.dec.add_rows_into(out, target)
    return out


class MergedWeightFn(torch.autograd.Function):
    """``x (W + dW)^T + b`` for a frozen ``weight: (d, k)`` in fp32 or wider: one GEMM forward and one for
    ``dX``, the merged weight rebuilt in backward rather than saved. ``dM`` (types 1-4, from the saved ``u``)
    or ``dP`` (type 6, from ``x``) as in the unmerged functions, so the gradients are the same linear maps.

    Not for low-precision weights: ``W + dW`` rounded to bf16 would lose most of ``dW``. Spec: §2, §2.4.
    """

    @staticmethod
    def forward(ctx, x, M, weight, bias, fast: tuple, fold):
        rope, A = fold is not None, M if fold is None else fold.rotated_blocks(M)  # P rebuilt in backward
        merged = add_delta(weight.clone(), A.to(weight.dtype), fast, rope)
        out = torch.nn.functional.linear(x, merged, bias)
        ctx.fast, ctx.fold = fast, fold
        saved = x if rope else fast[0].sum(x.reshape(-1, x.shape[-1]), A.dtype)  # x, or u: (T, cols)
        ctx.save_for_backward(saved, M, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved, M, weight = ctx.saved_tensors
        fold = ctx.fold
        A = M if fold is None else fold.rotated_blocks(M)
        grad_x = grad_M = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ add_delta(weight.clone(), A.to(weight.dtype), ctx.fast, fold is not None)
        if ctx.needs_input_grad[1]:
            grad2 = grad.reshape(-1, grad.shape[-1])
            if fold is not None:
                grad_P = _block_grad_P(grad2, saved.reshape(-1, saved.shape[-1]), ctx.fast[0], A)
                grad_M = fold.rotated_blocks_adjoint(grad_P)
            else:
                grad_M = ctx.fast[1].sum(grad2, M.dtype).t() @ saved
        return grad_x, grad_M, None, None, None, None


def _block_grad_P(grad2: torch.Tensor, x2: torch.Tensor, plan: BlockPlan, P: torch.Tensor) -> torch.Tensor:
    """``dP_c = dz_c^T x'_c`` for every used (block, piece, slice); ``(n, r_hat, r_hat)`` in ``P``'s dtype."""
    source = grad2 if plan.direct else plan.dec.sum(grad2, x2.dtype)
    grad_P = torch.zeros_like(P)
    for c, pieces, segments in plan.blocks:
        for lo, hi, col in pieces:
            g_t = source[:, col : col + hi - lo].t()  # (rows, T)
            for w, n, length, _ in segments:
                grad_P[c, lo:hi, n : n + length] += g_t @ x2[:, w : w + length]
    return grad_P
