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
    """``(rows, k)``: ``r_hat`` rows, or ``n * r_hat`` rows (rotated blocks) for type 6."""
    n = math.ceil(k / r_hat)
    if mora_type in (2, 3):
        C = torch.zeros(r_hat, k, dtype=torch.float64)
        for j, group in enumerate(_groups(k, r_hat)):
            C[group, j] = 1.0
        return C
    pad = torch.zeros(n * r_hat, k, dtype=torch.float64)  # x'_t = x_(t mod k)
    for t in range(n * r_hat):
        pad[t, t % k] = 1.0
    if mora_type in (1, 4):
        S = torch.zeros(r_hat, n * r_hat, dtype=torch.float64)
        for t in range(n * r_hat):
            S[t % r_hat, t] = 1.0
        return S @ pad
    R = torch.zeros(n * r_hat, n * r_hat, dtype=torch.float64)
    half = r_hat // 2
    for c in range(n):
        for i in range(r_hat):
            phi = c * 10000.0 ** (-2 * (i % half) / r_hat)
            row = c * r_hat + i
            R[row, row] += math.cos(phi)
            partner = c * r_hat + (i + half if i < half else i - half)
            R[row, partner] += (-1.0 if i < half else 1.0) * math.sin(phi)
    return R @ pad


def decompression_matrix(d: int, r_hat: int, mora_type: int, k: int) -> torch.Tensor:
    """``(d, cols)`` with ``cols = r_hat``, or ``n * r_hat`` for type 6."""
    if mora_type in (2, 4):
        D = torch.zeros(d, r_hat, dtype=torch.float64)
        for o, group in enumerate(_groups(d, r_hat)):
            D[o, group] = 1.0
        return D
    width = r_hat if mora_type != 6 else math.ceil(k / r_hat) * r_hat
    D = torch.zeros(d, width, dtype=torch.float64)
    for o in range(d):
        D[o, o % width] = 1.0
    return D


def dense_delta(M: torch.Tensor, k: int, d: int, mora_type: int) -> torch.Tensor:
    """``dW = D blockdiag(M, ...) C`` in float64, ``(d, k)``."""
    r_hat = M.shape[0]
    M = M.to(torch.float64)
    C = compression_matrix(k, r_hat, mora_type)
    if mora_type == 6:
        M = torch.block_diag(*[M] * math.ceil(k / r_hat))
    return decompression_matrix(d, r_hat, mora_type, k) @ M @ C
