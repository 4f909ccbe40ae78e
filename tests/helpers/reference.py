"""Float64 oracle for MoRA's operators, written from the spec's formulas with explicit 0/1 matrices.

Deliberately independent of ``mora_dist.operators`` (never import it here): a shared bug cannot hide.
Spec: §2.1-§2.4.
"""

import math

import torch


def r_hat_for(k: int, d: int, r: int, mora_type: int) -> int:
    r_hat = math.floor(math.sqrt((k + d) * r) + 0.5)
    return r_hat - r_hat % 2 if mora_type == 6 else r_hat


def _groups(size: int, r_hat: int) -> list[int]:
    """Group of each feature: first size % r_hat groups of size//r_hat + 1, then groups of size//r_hat."""
    q, m = divmod(size, r_hat)
    out = []
    for group in range(r_hat):
        out += [group] * (q + 1 if group < m else q)
    return out


def compression_matrix(k: int, r_hat: int, mora_type: int) -> torch.Tensor:
    """``C: (rows, k)``: ``r_hat`` rows, or ``n * r_hat`` rows (the rotated blocks, stacked) for type 6."""
    n = math.ceil(k / r_hat)
    if mora_type in (2, 3):  # block-sum
        C = torch.zeros(r_hat, k, dtype=torch.float64)
        for j, group in enumerate(_groups(k, r_hat)):
            C[group, j] = 1.0
        return C
    if mora_type in (1, 4):  # stride-sum over the wrap-padded input x'_t = x_(t mod k)
        C = torch.zeros(r_hat, k, dtype=torch.float64)
        for t in range(n * r_hat):
            C[t % r_hat, t % k] += 1.0
        return C
    # rotate-reshape: row c*r_hat + i of C is (R_c x'_c)_i = x'_i cos(phi) + s_i sin(phi)
    C = torch.zeros(n * r_hat, k, dtype=torch.float64)
    half = r_hat // 2
    for c in range(n):
        for i in range(r_hat):
            phi = c * 10000.0 ** (-2 * (i % half) / r_hat)
            t = c * r_hat + i
            partner = c * r_hat + (i + half if i < half else i - half)
            C[t, t % k] += math.cos(phi)
            C[t, partner % k] += (-1.0 if i < half else 1.0) * math.sin(phi)
    return C


def decompression_rows(d: int, r_hat: int, mora_type: int, k: int) -> list[int]:
    """Column of the single 1 in each row of the 0/1 decompression matrix ``D: (d, width)``."""
    if mora_type in (2, 4):  # interleave
        return _groups(d, r_hat)
    width = r_hat if mora_type != 6 else math.ceil(k / r_hat) * r_hat  # tile
    return [o % width for o in range(d)]


def dense_delta(M: torch.Tensor, k: int, d: int, mora_type: int) -> torch.Tensor:
    """``dW = D blockdiag(M, ...) C``, ``(d, k)``, differentiable in ``M``; float64 unless ``M`` is wider."""
    r_hat = M.shape[0]
    M = M.to(torch.float64)
    C = compression_matrix(k, r_hat, mora_type)
    if mora_type == 6:  # blockdiag(M, ..., M) @ C, one block at a time
        Z = torch.cat([M @ C[c * r_hat : (c + 1) * r_hat] for c in range(math.ceil(k / r_hat))])
    else:
        Z = M @ C
    return Z[decompression_rows(d, r_hat, mora_type, k)]
