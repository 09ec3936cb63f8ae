"""A Linear layer and its activation as one oneDNN call on the CPU (inference).

`F.linear` on a CPU first copies the bias into every output row, then multiplies into it, and an
activation reads and writes the whole output once more. oneDNN, which PyTorch ships, can add the
bias and apply ReLU or GELU as post-ops of the matrix product. PyTorch exposes that as
`torch.ops.mkldnn._linear_pointwise` (what its compiler, inductor, emits for `linear` + activation
on a CPU); `fused_linear` calls it where it applies and falls back to the plain ops elsewhere:

- only float32 tensors on the CPU, a plain `nn.Linear` (not an int8 replacement), and no autograd
  (the op has no backward), so training and every other device take the plain path; under
  `torch.compile` (`--compile`) too: inductor fuses Linear + activation itself and cannot lower
  this op with unpacked weights;
- GELU means the exact (erf) form, as `nn.GELU()`; the tanh approximation is never fused;
- the op is tried once on a small case first (`_onednn_works`): a build without it, or whose
  op disagrees with the plain one, takes the plain path everywhere.

Measured on 2 cores of an AVX-512 EPYC (torch 2.11, fp32, medians): SAM ViT-B's MLP, 4096 tokens,
768 -> 3072 + GELU 0.138 -> 0.108 s and 3072 -> 768 0.099 -> 0.089 s; the feature enhancer's FFN
at 800 x 1200 (19,947 tokens), 256 -> 2048 + ReLU 0.166 -> 0.146 s and 2048 -> 256 0.122 ->
0.096 s; Swin-T's first-stage MLP 96 -> 384 + GELU 0.088 -> 0.057 s. Outputs within 4e-6 of the
plain path (float rounding of another summation order).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# activation -> (oneDNN post-op, its algorithm, the plain function)
_ACTIVATIONS = {
    "none": ("none", "", lambda x: x),
    "relu": ("relu", "", torch.relu_),  # in place on the fresh output: autograd allows it
    "gelu": ("gelu", "none", F.gelu),  # "none": the exact erf form, not tanh
}


def _fusable(x: Tensor, linear: nn.Module) -> bool:
    return (
        type(linear) is nn.Linear
        # torch.compile fuses on its own, and its lowering of this op wants prepacked weights
        and not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and linear.weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))
        and _onednn_works()
    )


def fused_linear(x: Tensor, linear: nn.Module, activation: str = "none") -> Tensor:
    """`activation(linear(x))`, in one oneDNN call where it applies (module docstring).

    Args:
        x: (..., in_features).
        linear: an `nn.Linear` (any module computing a linear map works on the plain path).
        activation: "none", "relu" or "gelu" (exact).

    Returns:
        (..., out_features), as the plain ops up to float rounding.
    """
    post_op, algorithm, plain = _ACTIVATIONS[activation]
    if _fusable(x, linear):
        bias = linear.bias
        return torch.ops.mkldnn._linear_pointwise(x, linear.weight, bias, post_op, [], algorithm)
    return plain(linear(x))


def is_exact_gelu(module: nn.Module) -> bool:
    """True for `nn.GELU()` with the exact (erf) form: what `activation="gelu"` computes."""
    return type(module) is nn.GELU and module.approximate == "none"


@functools.cache
def _onednn_works() -> bool:
    """Whether this torch build runs the fused op, checked once on a small case against the
    plain ops (some builds, e.g. for other CPU architectures, may lack it or its post-ops);
    False sends every call down the plain path."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 8, generator=generator)
        linear = nn.Linear(8, 5).requires_grad_(False)
        with torch.no_grad():
            for post_op, algorithm, plain in _ACTIVATIONS.values():
                fused = torch.ops.mkldnn._linear_pointwise(
                    x, linear.weight, linear.bias, post_op, [], algorithm
                )
                if not torch.allclose(fused, plain(linear(x)), atol=1e-5, rtol=1e-5):
                    return False
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def matmul_transposed(x: Tensor, weight: Tensor) -> Tensor:
    """`x @ weight.T` for 2-D float32 CPU tensors, through the same oneDNN op as `fused_linear`
    where it applies (a faster product than `torch.mm` for attention's (queries x 64) @ (64 x
    keys) on AVX-512: 0.80 vs 1.21 ms at 256 x 4096, 2 threads).

    `weight` must be contiguous for the oneDNN call (a strided one makes it reorder on every call,
    orders of magnitude slower); other inputs take `torch.mm`.
    """
    if (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.is_contiguous()
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and _onednn_works()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return torch.mm(x, weight.t())
