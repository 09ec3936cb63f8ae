"""Linear + activation as one oneDNN call (grounding.fused_linear) equals the plain ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grounding import fused_linear as module
from grounding.fused_linear import fused_linear, is_exact_gelu
from segmentation.fast_modes import Int8Linear

PLAIN = {"none": lambda x: x, "relu": torch.relu, "gelu": nn.functional.gelu}


def _close_to_scale(actual, expected, relative=1e-5):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert (actual - expected).abs().max() <= relative * expected.abs().max()


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("shape", [(37, 48), (2, 5, 7, 48)])
def test_fused_equals_plain_in_inference(activation, shape):
    torch.manual_seed(0)
    linear = nn.Linear(48, 96)
    x = torch.randn(*shape)
    with torch.inference_mode():
        _close_to_scale(fused_linear(x, linear, activation), PLAIN[activation](linear(x)))
        # a transposed (non-contiguous) input
        xt = torch.randn(48, 37).T
        _close_to_scale(fused_linear(xt, linear, activation), PLAIN[activation](linear(xt)))


def test_the_fused_call_is_taken_only_where_it_applies():
    linear = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    assert module._onednn_works(), "this torch build has no oneDNN linear: the fast path is off"
    assert not module._fusable(x, linear)  # autograd: the weights need gradients, no backward
    assert module._fusable(x, nn.Linear(8, 4).requires_grad_(False))  # a frozen layer
    with torch.no_grad():
        assert module._fusable(x, linear)
        assert not module._fusable(x.bfloat16(), linear.bfloat16())
        assert not module._fusable(x, Int8Linear(nn.Linear(8, 4)))
        assert not module._fusable(x, type("Sub", (nn.Linear,), {})(8, 4))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gradients_take_the_plain_path(activation):
    torch.manual_seed(0)
    linear, x = nn.Linear(6, 5), torch.randn(4, 6, requires_grad=True)
    fused_linear(x, linear, activation).square().sum().backward()
    grads = [x.grad, linear.weight.grad]
    x2 = x.detach().clone().requires_grad_()
    linear.zero_grad()
    PLAIN[activation](linear(x2)).square().sum().backward()
    torch.testing.assert_close(grads[0], x2.grad)
    torch.testing.assert_close(grads[1], linear.weight.grad)


def test_a_build_whose_op_fails_takes_the_plain_path(monkeypatch):
    def broken(*args):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken, raising=False)
    module._onednn_works.cache_clear()
    try:
        assert not module._onednn_works()
        linear, x = nn.Linear(8, 4), torch.randn(3, 8)
        with torch.inference_mode():
            expected = nn.functional.gelu(linear(x))
            torch.testing.assert_close(fused_linear(x, linear, "gelu"), expected)
    finally:
        monkeypatch.undo()
        module._onednn_works.cache_clear()
    assert module._onednn_works()


def test_only_the_exact_gelu_is_fused():
    assert is_exact_gelu(nn.GELU())
    assert not is_exact_gelu(nn.GELU(approximate="tanh"))
    assert not is_exact_gelu(nn.ReLU())


def test_matmul_transposed_equals_x_times_weight_transposed():
    torch.manual_seed(0)
    x, weight = torch.randn(37, 16), torch.randn(50, 16)
    with torch.inference_mode():
        _close_to_scale(module.matmul_transposed(x, weight), x @ weight.T)
        # a strided weight (a slice of a wider matrix) and a strided input take torch.mm
        wide = torch.randn(50, 40)
        _close_to_scale(module.matmul_transposed(x, wide[:, 3:19]), x @ wide[:, 3:19].T)
        _close_to_scale(module.matmul_transposed(wide[:, :16], weight), wide[:, :16] @ weight.T)
    # under autograd it is differentiable
    x.requires_grad_(True)
    module.matmul_transposed(x, weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(37, 16))
