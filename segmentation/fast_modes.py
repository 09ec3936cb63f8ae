"""Opt-in faster inference: int8 `nn.Linear` layers on the CPU, and `torch.compile`.

Both are off by default: `--quantize int8` and `--compile` in the CLI and the app
(`GROUNDED_SAM_QUANTIZE=int8`, `GROUNDED_SAM_COMPILE=1`), `quantize=` and `compile=` in
`segmentation.load_pipeline`, offline mode included.

int8 (`quantize_int8`, on `INT8_PARTS`): the `nn.Linear` layers of the parts that see every image
token, the detector's Swin backbone and feature enhancer and SAM's image encoder and mask decoder,
become `Int8Linear`s: the weights are int8, symmetric per output channel, quantized once; the
inputs are quantized on each call, per tensor (dynamic quantization); the products add up in int32
in the CPU's quantized engine (fbgemm, `torch.ops.quantized.linear_dynamic`), and the output is
float32 again. Convolutions, attention products, norms, the text encoder, the detector's decoder
and heads stay fp32 (int8 made those no faster, only less exact). The inputs use 8 bits on CPUs
with VNNI instructions and 7 bits without (`default_reduce_range`: there the int8 kernels add
pairs of products in int16, which 8-bit inputs could overflow); 8 bits halve the error.
CPU only: `check_quantize` raises a ValueError for CUDA (these kernels are CPU kernels; half
precision is the faster mode on a GPU).

Not `torch.ao.quantization.quantize_dynamic`, which uses the same kernels: torch 2.11 deprecates
it (a DeprecationWarning on each call, "will be removed", pointing to torchao, whose install
brings compiled extensions); its default weights are per tensor and its inputs always 7 bits (a
larger error: measured on the shapes detector, score changes up to 0.40 instead of 0.04); and its
layers turn `weight` into a method, which our text encoder reads as a tensor.

compile (`compile_models`): `torch.compile` (inductor) of SAM's image encoder, in place
(`nn.Module.compile`: state dicts and attribute access stay as they were). Its input is always the
same square, so it compiles once, on the first image, and never again. The detector stays eager:
torch 2.11's inductor writes C++ for our Swin backbone that does not compile (pytorch/pytorch
#179135, "'decltype' evaluates to 'float'"), and its other parts see a new shape for every image
size and prompt length (a recompilation each). Inductor on a CPU needs a C++ compiler (the one
torch would call: `$CXX`, else g++; `missing_compiler`): without one `compile_models` warns once
and leaves SAM eager. On CUDA it needs Triton instead.

Measured on a 2-core AMD EPYC (AVX-512 with VNNI), torch 2.11:
- the shipped shapes models on 50 held-out images (`scripts/evaluate_shapes.py`, one thread):
  int8 changes AP50 0.860 -> 0.866, recall 0.812 -> 0.812, precision 0.770 -> 0.785, mask IoU
  0.935 -> 0.936; these models are tiny, so neither mode saves noticeable time;
- full-size models with random weights, on top of the default path (SAM's CPU blocks and fused
  Linear layers; `scripts/benchmark_fast_modes.py --threads 2 --runs 2`): SAM ViT-B's image
  encoder on 1024 x 1024: fp32 5.22 s, int8 3.12 s (1.7x; the embedding within 1.6%, relative
  L2); compile 7.78 s and int8 + compile 12.8 s, measured when eager fp32 took 7.17 s (compiled,
  the encoder takes the SDPA path; the first call compiles for 80 s); the SwinT detector at
  800 x 1200: fp32 4.49 s, int8 3.69 s (1.2x; the image tokens within 1.8%, boxes of the same
  queries within 0.002; the logits move by 21%, as random layers magnify differences: on the
  trained shapes detector scores move by 0.1 at most).
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings

import torch
from torch import Tensor, nn

from grounding.fusion import BiMultiHeadAttention

QUANTIZE_MODES = ("none", "int8")
# What int8 quantizes: where it saves time (module docstring). Elsewhere it measurably saved
# nothing on the SwinT detector (text encoder, decoder, heads) and only added error.
INT8_PARTS = {
    "detector": ("backbone", "feature_enhancer"),
    "sam": ("image_encoder", "mask_decoder"),
}


# Modules that read their Linear layers' weights as matrices: never quantized.
FOLDED = (BiMultiHeadAttention,)


class Int8Linear(nn.Module):
    """A frozen `nn.Linear` with int8 weights (per output channel) and dynamically quantized
    int8 inputs: y = x W^T + b, computed in int32, returned as float32.

    `weight` still reads (dequantized, fp32) for code that asks a layer for its dtype or shape.
    For inference only: the packed weights are not in `state_dict()` (quantize after loading,
    never save a quantized model).
    """

    def __init__(self, linear: nn.Linear, *, reduce_range: bool = True) -> None:
        """
        Args:
            linear: the layer to replace (on the CPU).
            reduce_range: quantize inputs to 7 bits (no int16 overflow in CPUs' int8 kernels
                without VNNI); `default_reduce_range()` picks it for this CPU.
        """
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.reduce_range = reduce_range
        weight = linear.weight.detach().to("cpu", torch.float32)
        scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127  # symmetric, per row
        quantized = torch.quantize_per_channel(
            weight,
            scales.double(),
            torch.zeros(self.out_features, dtype=torch.long),
            0,
            torch.qint8,
        )
        bias = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32)
        self._packed = torch.ops.quantized.linear_prepack(quantized, bias)

    @property
    def weight(self) -> Tensor:
        """The int8 weights dequantized: (out_features, in_features) float32."""
        weight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return weight.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int8 weights, reduce_range={self.reduce_range}"
        )


def default_reduce_range() -> bool:
    """False on CPUs with VNNI (int8 products add up in int32, full 8-bit inputs are safe), else
    True (as torch.ao's default for fbgemm)."""
    has_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return not (has_vnni is not None and has_vnni())


def check_quantize(quantize: str | None, device: str | torch.device) -> str:
    """The quantize mode, validated: "none" (also for None) or "int8".

    Raises:
        ValueError: an unknown mode, int8 on a device other than the CPU, or a torch build
            without a quantized CPU engine.
    """
    mode = "none" if quantize is None else str(quantize).strip().lower()
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}: use one of {QUANTIZE_MODES}")
    if mode == "int8":
        if torch.device(device).type != "cpu":
            raise ValueError(
                f"int8 quantization runs on the CPU only, not on {device}: drop it there "
                "(a GPU is faster in fp32 or half precision)"
            )
        engines = set(torch.backends.quantized.supported_engines) - {"none"}
        if not engines:
            raise ValueError("this torch build has no quantized CPU engine for int8")
    return mode


def quantize_int8(module: nn.Module, *, reduce_range: bool | None = None) -> int:
    """Replace every `nn.Linear` in `module` (on the CPU) by an `Int8Linear`, in place.

    Args:
        reduce_range: None: `default_reduce_range()`.

    Returns:
        How many layers were replaced.
    """
    if reduce_range is None:
        reduce_range = default_reduce_range()
    parameter = next(module.parameters(), None)
    if parameter is not None and parameter.device.type != "cpu":
        raise ValueError(f"int8 quantization runs on the CPU only, not on {parameter.device}")
    # The fusion attention multiplies its image-side projections' weights into other matrices
    # (grounding.fusion) instead of applying them as layers: it keeps its float layers.
    kept = {id(m) for part in module.modules() if isinstance(part, FOLDED) for m in part.modules()}
    replaced = 0
    for parent in list(module.modules()):
        if id(parent) in kept:
            continue
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # subclasses may use their weights differently
                setattr(parent, name, Int8Linear(child, reduce_range=reduce_range))
                replaced += 1
    return replaced


def missing_compiler(device: str | torch.device = "cpu") -> str | None:
    """Why `torch.compile` cannot run on `device` here (None when it can).

    The CPU needs the C++ compiler inductor would call: `torch._inductor.config.cpp.cxx`
    (`$CXX`, else g++, clang++ on macOS); CUDA needs Triton, and the C compiler Triton builds
    its kernel launchers with (`$CC`, else gcc or clang).
    """
    if torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed"
        compilers = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang"]
        if any(shutil.which(compiler) for compiler in compilers):
            return None
        return (
            f"torch.compile on CUDA needs a C compiler for Triton and found none (looked for "
            f"{', '.join(compilers)}; set CC to one)"
        )
    if sys.platform == "win32":
        candidates = [os.environ.get("CXX", "cl")]
    else:
        from torch._inductor import config

        cxx = config.cpp.cxx
        candidates = [c for c in (cxx if isinstance(cxx, tuple | list) else (cxx,)) if c]
    if any(shutil.which(candidate) for candidate in candidates):
        return None
    return (
        f"torch.compile needs a C++ compiler on the CPU and found none (looked for "
        f"{', '.join(candidates)}; set CXX to one)"
    )


def compile_models(sam, device: str | torch.device = "cpu") -> bool:
    """`torch.compile` SAM's image encoder in place (see the module docstring for why only it).

    Args:
        sam: segment_anything's `Sam`.

    Returns:
        True when compiled (on its first call); False, after one RuntimeWarning, when
        `missing_compiler` finds no compiler: SAM then stays eager.
    """
    reason = missing_compiler(device)
    if reason is not None:
        warnings.warn(f"--compile ignored, running eagerly: {reason}", RuntimeWarning, stacklevel=2)
        return False
    sam.image_encoder.compile()
    return True


def int8_parts(detector, sam) -> list[nn.Module]:
    """The parts `--quantize int8` quantizes: the detector's image backbone and feature enhancer,
    SAM's image encoder and mask decoder (`INT8_PARTS`; None models are skipped)."""
    models = (("detector", None if detector is None else detector.model), ("sam", sam))
    return [
        getattr(model, name)
        for kind, model in models
        if model is not None
        for name in INT8_PARTS[kind]
    ]


def apply_fast_modes(
    detector,
    sam,
    *,
    quantize: str | None = None,
    compile: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, object]:
    """Quantize and / or compile a detector and a SAM in place (quantized first).

    Returns:
        {"quantize": "none" / "int8", "int8_layers": layers replaced, "compiled": bool}.

    Raises:
        ValueError: see `check_quantize`.
    """
    mode = check_quantize(quantize, device)
    layers = 0
    if mode == "int8":
        layers = sum(quantize_int8(part) for part in int8_parts(detector, sam))
    compiled = compile_models(sam, device) if compile and sam is not None else False
    return {"quantize": mode, "int8_layers": layers, "compiled": compiled}
