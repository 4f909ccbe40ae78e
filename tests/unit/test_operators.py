"""Operators against the float64 oracle in tests/reference.py (spec §2). Shapes include k, d not multiples of
r_hat, d < r_hat, k <= r_hat and r_hat > 2k, where the public code crashes."""

import pytest
import torch

from mora_dist.errors import MoRAConfigError, ShardingError
from mora_dist.operators import MoRAOperator, compute_r_hat, group_ids
from tests.helpers.reference import dense_delta, r_hat_for

TYPES = (1, 2, 3, 4, 6)
# (in_features k, out_features d, r): the shapes.
SHAPES = {
    "64x64_r8": (64, 64, 8),
    "100to70_r8": (100, 70, 8),
    "70to100_r8": (70, 100, 8),
    "40x40_r20_k_le_rhat": (40, 40, 20),
    "30to40_r60_rhat_gt_2k": (30, 40, 60),
    "4096x4096_r8": (4096, 4096, 8),
    "4096to1024_r256_rhat_gt_d": (4096, 1024, 256),
}
SMALL = [name for name in SHAPES if not name.startswith("4096")]


def _case(name, mora_type):
    k, d, r = SHAPES[name]
    r_hat = compute_r_hat(k, d, r, mora_type)
    M = torch.randn(r_hat, r_hat, dtype=torch.float64) / r_hat**0.5
    return k, d, r_hat, M


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_r_hat_follows_spec_formula(name, mora_type):
    k, d, r = SHAPES[name]
    assert compute_r_hat(k, d, r, mora_type) == r_hat_for(k, d, r, mora_type)


def test_shapes_cover_the_crash_cases():
    assert compute_r_hat(40, 40, 20, 1) >= 40  # k <= r_hat
    assert compute_r_hat(30, 40, 60, 1) > 60  # r_hat > 2k
    assert compute_r_hat(4096, 1024, 256, 1) > 1024  # r_hat > d


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_forward_equals_dense_reference(name, mora_type):
    k, d, r_hat, M = _case(name, mora_type)
    op = MoRAOperator(k, d, r_hat, mora_type)
    reference = dense_delta(M, k, d, mora_type)
    x = torch.randn(3, 2, k, dtype=torch.float64)
    y0 = torch.randn(3, 2, d, dtype=torch.float64)
    torch.testing.assert_close(op.delta_weight(M), reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(op.forward(x, M, y0), y0 + x @ reference.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("name", SMALL)
def test_gradients_match_autograd_through_dense_reference(name, mora_type):
    k, d, r_hat, M = _case(name, mora_type)
    op = MoRAOperator(k, d, r_hat, mora_type)
    x = torch.randn(5, k, dtype=torch.float64)
    upstream = torch.randn(5, d, dtype=torch.float64)
    M1, x1 = M.clone().requires_grad_(), x.clone().requires_grad_()
    (op.forward(x1, M1, torch.zeros(5, d, dtype=torch.float64)) * upstream).sum().backward()
    M2, x2 = M.clone().requires_grad_(), x.clone().requires_grad_()
    ((x2 @ dense_delta(M2, k, d, mora_type).T) * upstream).sum().backward()
    assert M1.grad.abs().sum() > 0
    torch.testing.assert_close(M1.grad, M2.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("name", SMALL)
def test_shards_compose_to_the_global_function(name, mora_type):
    """A shard described by global ids computes exactly its part of the TP = 1 function (spec §4)."""
    k, d, r_hat, M = _case(name, mora_type)
    reference = dense_delta(M, k, d, mora_type)
    x = torch.randn(4, k, dtype=torch.float64)
    cols = torch.randperm(k).chunk(2)
    rows = torch.randperm(d).chunk(3)
    # Row-parallel: partial outputs of input shards sum to the full output.
    partial = sum(
        MoRAOperator(k, d, r_hat, mora_type, in_ids=c).forward(x[:, c], M, torch.zeros(4, d, dtype=torch.float64))
        for c in cols
    )
    torch.testing.assert_close(partial, x @ reference.T, rtol=0, atol=1e-10)
    for r in rows:  # column-parallel: each output shard is its rows of the full output
        op = MoRAOperator(k, d, r_hat, mora_type, out_ids=r, in_ids=cols[0])
        torch.testing.assert_close(op.delta_weight(M), reference[r][:, cols[0]], rtol=0, atol=1e-10)


def test_sharded_matrix_rows_and_columns():
    """Interleave rows / block-sum columns of M split like the base partition when everything divides."""
    k, d, r_hat, tp = 96, 64, 16, 2
    M = torch.randn(r_hat, r_hat, dtype=torch.float64)
    reference = dense_delta(M, k, d, 2)
    x = torch.randn(3, k, dtype=torch.float64)
    out = torch.zeros(3, d, dtype=torch.float64)
    for t in range(tp):
        rows = torch.arange(t * d // tp, (t + 1) * d // tp)
        m_rows = torch.arange(t * r_hat // tp, (t + 1) * r_hat // tp)
        op = MoRAOperator(k, d, r_hat, 2, out_ids=rows, m_rows=m_rows)
        out[:, rows] = op.forward(x, M[m_rows], torch.zeros(3, len(rows), dtype=torch.float64))
        cols = torch.arange(t * k // tp, (t + 1) * k // tp)
        m_cols = torch.arange(t * r_hat // tp, (t + 1) * r_hat // tp)
        op_row = MoRAOperator(k, d, r_hat, 2, in_ids=cols, m_cols=m_cols)
        torch.testing.assert_close(op_row.delta_weight(M[:, m_cols]), reference[:, cols], rtol=0, atol=1e-10)
    torch.testing.assert_close(out, x @ reference.T, rtol=0, atol=1e-10)


def test_shard_of_matrix_that_misses_inputs_is_rejected():
    with pytest.raises(ShardingError, match="replicate"):
        MoRAOperator(64, 64, 16, 1, in_ids=torch.arange(32), m_cols=torch.arange(8))


def test_group_ids_are_uneven_contiguous_blocks():
    assert group_ids(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert group_ids(3, 5).tolist() == [0, 1, 2]  # fewer features than groups: zero extension


@pytest.mark.parametrize("mora_type", TYPES)
def test_float32_matrix_matches_float64(mora_type):
    k, d, r_hat, M = _case("100to70_r8", mora_type)
    op = MoRAOperator(k, d, r_hat, mora_type)
    x = torch.randn(4, k, dtype=torch.float64)
    out32 = op.forward(x.float(), M.float(), torch.zeros(4, d))
    torch.testing.assert_close(out32.double(), x @ dense_delta(M, k, d, mora_type).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("r_hat", "mora_type", "message"),
    [(7, 6, "r_hat=7.*even.*r_hat=8"), (0, 1, "r_hat=0.*positive")],
)
def test_bad_r_hat_names_value_and_fix(r_hat, mora_type, message):
    with pytest.raises(MoRAConfigError, match=message):
        MoRAOperator(32, 32, r_hat, mora_type)
