"""MoRALinear: forward(x) == x (W + dW)^T + b in float64, zero start, bf16 base with fp32 matrix, merge. Spec §2."""

import pytest
import torch
from torch import nn

from mora_dist import MoRAConfigError, MoRALinear
from mora_dist.operators import compute_r_hat
from tests.helpers.reference import dense_delta

TYPES = (1, 2, 3, 4, 6)
SHAPES = [(100, 70, 8), (70, 100, 8), (40, 40, 20), (30, 40, 60), (64, 64, 8)]


def _layer(k, d, r, mora_type, bias=True, dtype=torch.float64):
    layer = MoRALinear(nn.Linear(k, d, bias=bias, dtype=dtype), r=r, mora_type=mora_type, mora_dtype=dtype)
    with torch.no_grad():
        layer.mora_M.normal_(0, layer.r_hat**-0.5)
    return layer


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize(("k", "d", "r"), SHAPES, ids=[f"{k}to{d}_r{r}" for k, d, r in SHAPES])
def test_forward_is_linear_with_dense_delta(k, d, r, mora_type, bias):
    layer = _layer(k, d, r, mora_type, bias=bias)
    x = torch.randn(2, 3, k, dtype=torch.float64)
    dW = dense_delta(layer.mora_M.detach(), k, d, mora_type)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ (W + dW).T + (b if bias else 0)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.delta_weight(), dW, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mora_type", TYPES)
def test_starts_as_base_with_only_the_square_matrix_trainable(mora_type):
    base = nn.Linear(70, 100)
    layer = MoRALinear(base, r=8, mora_type=mora_type)
    x = torch.randn(4, 70)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["mora_M"]
    assert layer.mora_M.shape == (compute_r_hat(70, 100, 8, mora_type),) * 2
    assert torch.count_nonzero(layer.mora_M) == 0
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    layer(x).pow(2).sum().backward()
    assert layer.mora_M.grad.abs().sum() > 0  # dL/dM is non-zero at M = 0 (spec §2)
    assert base.weight.grad is None


@pytest.mark.parametrize("mora_type", TYPES)
def test_bf16_base_with_fp32_matrix(mora_type):
    ref = _layer(100, 70, 8, mora_type, dtype=torch.float32)
    layer = MoRALinear(nn.Linear(100, 70).bfloat16(), r=8, mora_type=mora_type)
    with torch.no_grad():
        layer.base_layer.weight.copy_(ref.base_layer.weight)
        layer.base_layer.bias.copy_(ref.base_layer.bias)
        layer.mora_M.copy_(ref.mora_M)
    x = torch.randn(4, 100)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and layer.mora_M.dtype == torch.float32
    W = layer.base_layer.weight.float()
    expected = x.bfloat16().float() @ (W + ref.delta_weight()).T + layer.base_layer.bias.float()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert layer.mora_M.grad.dtype == torch.float32 and layer.mora_M.grad.abs().sum() > 0


@pytest.mark.parametrize("mora_type", TYPES)
def test_merge_keeps_function_and_zeroes_matrix(mora_type):
    layer = _layer(70, 100, 8, mora_type)
    x = torch.randn(5, 70, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    assert torch.count_nonzero(layer.mora_M) == 0
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-10)


def test_switching_type_keeps_matrix_shape_and_changes_operator():
    layer = _layer(64, 48, 8, 1)
    layer.merge()
    layer.set_mora_type("sharing_block")
    assert layer.mora_type == 2
    with torch.no_grad():
        layer.mora_M.normal_()
    torch.testing.assert_close(layer.delta_weight(), dense_delta(layer.mora_M.detach(), 64, 48, 2), rtol=0, atol=1e-10)


def test_switching_to_rope_with_odd_r_hat_is_rejected():
    layer = MoRALinear(nn.Linear(32, 32), r_hat=9, mora_type=1)
    with pytest.raises(MoRAConfigError, match="r_hat=9"):
        layer.set_mora_type(6)


def test_dropout_applies_to_input_in_training_only():
    layer = MoRALinear(nn.Linear(32, 32), r=4, mora_type=1, dropout=0.5)
    with torch.no_grad():
        layer.mora_M.normal_()
    x = torch.randn(8, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.delta_weight().T)
    layer.train()
    assert not torch.allclose(layer(x), layer.base_layer(x) + x @ layer.delta_weight().T)


def test_wrapping_a_non_linear_is_a_type_error():
    with pytest.raises(TypeError, match="Conv1d"):
        MoRALinear(nn.Conv1d(4, 4, 1))


@pytest.mark.parametrize("mora_type", TYPES)
def test_unfused_path_on_a_view_output_gives_the_dense_gradients(mora_type):
    """The unfused path (dropout in training) on an ``(s, b, k)`` input: ``nn.Linear`` returns a view there, and
    adding into it in place sent the adapter's gradients to the wrong inputs (a shape error in backward). With
    p = 0 dropout, input and ``M`` gradients equal the dense float64 ones."""
    layer = _layer(24, 40, 4, mora_type)
    layer.mora_dropout = nn.Dropout(0.0)  # not fusable in training, yet the identity
    x = torch.randn(8, 2, 24, dtype=torch.float64, requires_grad=True)
    layer.train()
    layer(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    M = layer.mora_M.detach().clone().requires_grad_(True)
    W = layer.base_layer.weight + dense_delta(M, 24, 40, mora_type)
    (x_ref @ W.T + layer.base_layer.bias).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.mora_M.grad, M.grad)
