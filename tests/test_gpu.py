"""The fast paths on a CUDA device equal the CPU reference path (P7; marked `gpu`: skipped
without CUDA, never needed by CI). `scripts/gpu_check.py` measures the same at full size.

What runs differently there: SAM's image encoder takes `segmentation.sam_attention`'s SDPA
attention (the CUDA kernels) instead of the CPU `FastBlock`, multi-scale deformable attention
takes `grid_sample` instead of the CPU gather, and `--compile` needs Triton instead of a C++
compiler. Tolerances (fp32, TF32 off): detector boxes within 1e-4 and logits within 1e-4 of the
row's largest |logit| + 1 (as tests/parity.py); SAM embeddings within 1e-4 absolute; masks of
the whole pipeline with IoU >= 0.99; bf16 / fp16 autocast no further from fp32 than
segment_anything's own autocast path, plus 0.02.

`GPU_TESTS_DEVICE=cpu pytest -m gpu tests/test_gpu.py` runs them on the CPU instead: a check of
the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from grounding.deformable_attention import (
    gathered_deformable_attention,
    multi_scale_deformable_attention,
)
from segmentation import fast_modes
from segmentation.look_ahead import LookAhead
from segmentation.pipeline import GroundedSAM
from segmentation.sam import BoxSegmenter
from segmentation.sam_attention import accelerate_sam
from segmentation.tiny_models import tiny_detector, tiny_sam
from tests.sam_models import small_sam

pytestmark = pytest.mark.gpu

DEVICE = torch.device(os.environ.get("GPU_TESTS_DEVICE", "cuda"))
PROMPT = "a cat . a remote control ."
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 means fp32: TF32 off for products and convolutions, as the parity sections of
    gpu_check.py (TF32 keeps 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pixels(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_detector_on_the_device_equals_the_cpu():
    """The same queries in the same slots: the 51 best encoder scores of this image lie at least
    1.7e-3 apart (far above float rounding), so no near-tie can swap them."""
    cpu, device = tiny_detector("cpu"), tiny_detector(DEVICE)
    image = pixels(96, 128)
    with torch.inference_mode():
        expected = cpu.detect(image, PROMPT)
        output = device.detect(image.to(DEVICE), PROMPT)
    assert output.query_indices is not None and expected.query_indices is not None
    assert torch.equal(output.query_indices.cpu(), expected.query_indices)
    torch.testing.assert_close(output.boxes.cpu(), expected.boxes, atol=1e-4, rtol=0)
    logits, expected_logits = output.logits.cpu(), expected.logits
    finite = torch.isfinite(expected_logits)
    assert torch.equal(torch.isfinite(logits), finite)  # -inf beyond the caption's tokens
    scale = 1 + expected_logits.masked_fill(~finite, 0).abs().amax(-1, keepdim=True)
    difference = (logits - expected_logits).masked_fill(~finite, 0).abs() / scale
    assert difference.max() <= 1e-4, difference.max()


def test_deformable_attention_on_the_device_equals_the_cpu_gather():
    """The encoder's level sizes at 800 x 1200 (grid_sample on the device, the gather here)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(100, 150), (50, 75), (25, 38), (13, 19)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 8, 32, generator=generator)
    locations = torch.rand(2, 300, 8, 4, 4, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(2, 300, 8, 4, 4, generator=generator).softmax(-1)
    expected = gathered_deformable_attention(value, shapes, locations, weights)
    out = multi_scale_deformable_attention(
        value.to(DEVICE), shapes, locations.to(DEVICE), weights.to(DEVICE)
    )
    torch.testing.assert_close(out.cpu(), expected, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_accelerated_sam_encoder_on_the_device_equals_segment_anything(use_rel_pos):
    """A global block and two windowed ones, against segment_anything's encoder on the CPU."""
    reference = small_sam(use_rel_pos)
    sam = accelerate_sam(copy.deepcopy(reference)).to(DEVICE)
    image = pixels(256, 256)
    with torch.inference_mode():
        expected = reference.image_encoder(image)
        out = sam.image_encoder(image.to(DEVICE))
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", LOW_PRECISION)
def test_autocast_sam_encoder_is_as_close_to_fp32_as_segment_anything(name):
    reference = small_sam().to(DEVICE)
    sam = accelerate_sam(copy.deepcopy(reference))
    image = pixels(256, 256).to(DEVICE)
    with torch.inference_mode():
        exact = reference.image_encoder(image)
        with torch.autocast(DEVICE.type, LOW_PRECISION[name]):
            reference_low = reference.image_encoder(image).float()
            fast_low = sam.image_encoder(image).float()
    assert torch.isfinite(fast_low).all()
    reference_error = (reference_low - exact).abs().max().item()
    fast_error = (fast_low - exact).abs().max().item()
    assert fast_error <= reference_error + 0.02, (fast_error, reference_error)


def test_pipeline_on_the_device_equals_the_cpu():
    """Text -> boxes, labels and masks, as the app runs it (the ten best scores here lie at
    least 3e-4 apart, so float rounding cannot reorder them)."""
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    results = []
    for device in (torch.device("cpu"), DEVICE):
        segmenter = BoxSegmenter(accelerate_sam(tiny_sam()).to(device))
        pipeline = GroundedSAM(tiny_detector(device), segmenter, look_ahead=LookAhead.off())
        results.append(pipeline.run(image, PROMPT, 0.2, 0.2, max_detections=10))
    expected, result = results
    assert len(expected) > 0, "no detection to compare: lower the thresholds"
    assert result.phrases == expected.phrases
    np.testing.assert_allclose(result.boxes, expected.boxes, atol=0.05, rtol=0)  # pixels
    np.testing.assert_allclose(result.scores, expected.scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.mask_scores, expected.mask_scores, atol=1e-3, rtol=0)
    intersection = (result.masks & expected.masks).sum((1, 2))
    union = (result.masks | expected.masks).sum((1, 2))
    assert (intersection >= 0.99 * np.maximum(union, 1)).all(), intersection / union


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_sam_encoder_on_the_device_equals_eager():
    reason = fast_modes.missing_compiler(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    sam = accelerate_sam(tiny_sam(image_size=256)).to(DEVICE)
    image = pixels(256, 256).to(DEVICE)
    with torch.inference_mode():
        expected = sam.image_encoder(image)
        assert fast_modes.compile_models(sam, DEVICE) is True
        torch.testing.assert_close(sam.image_encoder(image), expected, atol=1e-4, rtol=1e-4)
