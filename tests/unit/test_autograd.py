"""The fast execution paths of mora_dist/autograd.py against the float64 oracle (spec §2, §2.4, §4).

Every path the layer can take is checked for output, dX and dM: the adapter added out of place or in place into
``y``, the frozen base fused into the same autograd node, the merged-weight GEMM (normally only from 1024 tokens
on), tensor-parallel shards (contiguous and scattered ids), and the dense dW built from the same slices.
"""

import pytest
import torch
from torch import nn

from mora_dist import MoRALinear, operators
from mora_dist.autograd import SliceMap
from mora_dist.operators import MoRAOperator, compute_r_hat, group_ids
from tests.helpers.reference import dense_delta

TYPES = (1, 2, 3, 4, 6)
# (k, d, r): non-divisible, d < L, d > L (rope tiles), k <= r_hat, r_hat > 2k, and everything divisible.
SHAPES = [(100, 70, 8), (70, 100, 8), (40, 40, 20), (30, 40, 60), (7, 200, 3), (64, 64, 4), (200, 50, 4)]
IDS = [f"{k}to{d}_r{r}" for k, d, r in SHAPES]


def _grads(fn, x, M, y=None):
    x = x.detach().clone().requires_grad_()
    M = M.detach().clone().requires_grad_()
    out = fn(x, M) if y is None else fn(x, M, y)
    out.backward(torch.ones_like(out) + torch.arange(out.shape[-1], dtype=out.dtype) / out.shape[-1])
    return out.detach(), x.grad, M.grad


def _reference(x, M, k, d, t, rows=None, cols=None, W=None):
    def fn(x, M):
        dW = dense_delta(M, k, d, t)
        if rows is not None:
            dW = dW[rows]
        if cols is not None:
            dW = dW[:, cols]
        return x @ (dW if W is None else W + dW).T
    return fn


def _assert_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize(("k", "d", "r"), SHAPES, ids=IDS)
def test_operator_forward_in_and_out_of_place_match_dense_delta(k, d, r, mora_type):
    """Catches a wrong adjoint (tile vs stride-sum, wrap folding) or a lost wrap/gap write in a slice map."""
    r_hat = compute_r_hat(k, d, r, mora_type)
    op = MoRAOperator(k, d, r_hat, mora_type)
    x, M = torch.randn(2, 3, k, dtype=torch.float64), torch.randn(r_hat, r_hat, dtype=torch.float64)
    want = _grads(_reference(x, M, k, d, mora_type), x, M)
    y = torch.zeros(2, 3, d, dtype=torch.float64)
    _assert_close(_grads(lambda x, M: op.forward(x, M, y), x, M), want)
    _assert_close(_grads(lambda x, M: op.forward(x, M, y.clone() * 1.0, inplace=True), x, M), want)
    assert torch.count_nonzero(y) == 0  # out of place leaves the caller's y alone
    torch.testing.assert_close(op.delta_weight(M), dense_delta(M, k, d, mora_type), rtol=0, atol=1e-10)


@pytest.mark.parametrize("merge_min_tokens", [10**9, 0], ids=["fused", "merged"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize(("k", "d", "r"), SHAPES, ids=IDS)
def test_layer_fused_and_merged_paths_match_dense_delta(k, d, r, mora_type, bias, merge_min_tokens, monkeypatch):
    """Catches a fused base whose dX misses the adapter's part, or a merged weight built from the wrong slices
    (the merged path normally runs only from 1024 tokens on, so CI would never reach it otherwise)."""
    monkeypatch.setattr(operators, "MERGE_MIN_TOKENS", merge_min_tokens)
    layer = MoRALinear(nn.Linear(k, d, bias=bias, dtype=torch.float64), r=r, mora_type=mora_type,
                       mora_dtype=torch.float64)
    assert layer._fusable()
    x, M = torch.randn(2, 3, k, dtype=torch.float64), torch.randn(layer.r_hat, layer.r_hat, dtype=torch.float64)
    W, b = layer.base_layer.weight, layer.base_layer.bias if bias else 0
    want = _grads(lambda x, M: _reference(x, M, k, d, mora_type, W=W)(x, M) + b, x, M)

    def run(x, M):
        layer.mora_M.data.copy_(M)
        layer.mora_M.grad = None
        return layer(x)

    out, grad_x, _ = _grads(run, x, M)
    _assert_close((out, grad_x, layer.mora_M.grad), want)


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize(("k", "d", "r"), SHAPES[:4], ids=IDS[:4])
@pytest.mark.parametrize("layout", ["contiguous", "scattered"])
def test_shards_take_the_fast_path_exactly(k, d, r, mora_type, layout):
    """Catches slice maps built from local ids that no longer match the global compression (spec §4)."""
    r_hat = compute_r_hat(k, d, r, mora_type)
    if layout == "contiguous":
        cols, rows = torch.arange(k // 3, k), torch.arange(d // 4, d - d // 4)
    else:
        cols, rows = torch.randperm(k)[: k // 2], torch.randperm(d)[: d // 2]
    op = MoRAOperator(k, d, r_hat, mora_type, in_ids=cols, out_ids=rows)
    x, M = torch.randn(5, len(cols), dtype=torch.float64), torch.randn(r_hat, r_hat, dtype=torch.float64)
    want = _grads(_reference(x, M, k, d, mora_type, rows=rows, cols=cols), x, M)
    y = torch.zeros(5, len(rows), dtype=torch.float64)
    _assert_close(_grads(lambda x, M: op.forward(x, M, y), x, M), want)
    torch.testing.assert_close(op.delta_weight(M), dense_delta(M, k, d, mora_type)[rows][:, cols], rtol=0, atol=1e-10)


@pytest.mark.parametrize(("size", "r_hat"), [(10, 4), (2048, 181), (3, 5), (16, 4)])
def test_block_sum_and_interleave_run_as_at_most_two_blocked_views(size, r_hat):
    """Catches a regression to one gather per feature for types 2-4 (the maps must stay a couple of views)."""
    groups = group_ids(size, r_hat)
    smap = SliceMap(torch.arange(size), groups, size, r_hat)
    assert smap.sliceable and len(smap.groups) <= 2
    S = torch.zeros(r_hat, size, dtype=torch.float64)
    S[groups, torch.arange(size)] = 1
    x, z = torch.randn(4, size, dtype=torch.float64), torch.randn(4, r_hat, dtype=torch.float64)
    torch.testing.assert_close(smap.sum(x, torch.float64), x @ S.T)
    torch.testing.assert_close(smap.spread(z, x, torch.float64), x + z @ S)
    # bf16 input: reduced in bf16 with fp32 accumulation, rounded once to bf16
    torch.testing.assert_close(smap.sum(x.bfloat16(), torch.float32), x.bfloat16().float() @ S.T.float(),
                               rtol=2**-8, atol=2**-8)


@pytest.mark.parametrize("mora_type", [1, 6])
def test_saved_for_backward_is_small(mora_type):
    """Catches an adapter that saves k-wide tensors: types 1-4 keep only u (r_hat wide, not x); rope keeps x by
    reference and M, not its (n, r_hat, r_hat) rotated blocks."""
    layer = MoRALinear(nn.Linear(256, 256).requires_grad_(False), r=8, mora_type=mora_type)
    x = torch.randn(512, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    ptrs = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    keeps_x = x.untyped_storage().data_ptr() in ptrs
    extra = sum(n for p, n in ptrs.items() if p not in params and p != x.untyped_storage().data_ptr())
    assert keeps_x == (mora_type == 6)
    assert extra == (512 * layer.r_hat * 4 if mora_type == 1 else 0)  # rope rebuilds its blocks from M


@pytest.mark.parametrize("tokens", [8, 2048], ids=["adapter_path", "merge_sized"])
@pytest.mark.parametrize("mora_type", TYPES)
def test_autocast_bf16_runs_unfused_and_close_to_fp32(mora_type, tokens):
    """Catches the fused base under autocast: F.linear would autocast inside the function while its backward
    multiplies a bf16 gradient by an fp32 weight (a dtype error), as HF Trainer's bf16 mode uses autocast."""
    layer = MoRALinear(nn.Linear(64, 48), r=4, mora_type=mora_type)
    with torch.no_grad():
        layer.mora_M.normal_(0, 0.1)
    x = torch.randn(tokens, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    want = x.detach() @ (layer.base_layer.weight + layer.delta_weight()).T + layer.base_layer.bias
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert layer.mora_M.grad.dtype == torch.float32 and layer.mora_M.grad.abs().sum() > 0
