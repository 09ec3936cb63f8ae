"""SDPA attention for SAM's image encoder (segmentation.sam_attention) equals segment_anything's.

Tolerances (fp32): attention outputs within 1e-5 absolute of segment_anything's `Attention` (they
are O(1); measured differences ~3e-7), encoder outputs within 1e-5 (measured ~1e-6), predicted
IoUs within 1e-4 and masks differing on at most 0.1 % of pixels (measured: none). bf16 autocast:
the SDPA path is no further from the fp32 result than segment_anything's own bf16 path, plus 0.02.
"""

import copy

import numpy as np
import pytest
import torch
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention
from torch import nn

from segmentation.sam import BoxSegmenter
from segmentation.sam_attention import (
    FastAttention,
    FastMLPBlock,
    accelerate_sam,
    rel_pos_attention,
    restore_sam,
)
from segmentation.tiny_models import tiny_sam
from tests.sam_models import small_sam

ATOL = 1e-5


def random_attention(dim: int, heads: int, input_size: tuple[int, int], use_rel_pos: bool,
                     seed: int = 0) -> Attention:
    """segment_anything's Attention with every parameter random (rel_pos starts at zero)."""
    torch.manual_seed(seed)
    attention = Attention(dim, num_heads=heads, use_rel_pos=use_rel_pos, input_size=input_size)
    with torch.no_grad():
        for name, parameter in attention.named_parameters():
            if "rel_pos" in name:
                parameter.normal_()
    return attention.eval()


@pytest.mark.parametrize("use_rel_pos", [True, False])
@pytest.mark.parametrize(("batch", "size", "input_size", "bias_elements"), [
    (3, (14, 14), (14, 14), 2**21),  # windows, one SDPA call
    (1, (16, 16), (16, 16), 0),  # global, the whole mask at once
    # blocks of 3 query rows (B * heads * W * HW mask elements per row), the last one of 2
    (2, (20, 20), (20, 20), 2 * 2 * 20 * 400 * 3),
    (2, (7, 9), (7, 9), 1),  # not square; one query row per call
    (1, (12, 12), (8, 8), 2**21),  # rel_pos resized by get_rel_pos (other input size)
])
def test_fast_attention_equals_reference(use_rel_pos, batch, size, input_size, bias_elements):
    attention = random_attention(32, 2, input_size, use_rel_pos)
    x = torch.randn(batch, *size, 32)
    with torch.no_grad():
        expected = attention(x)
        attention.__class__ = FastAttention
        attention.bias_elements = bias_elements
        actual = attention(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_rel_pos_attention_with_autograd_matches_reference_and_its_gradients():
    """With autograd on, the masks are not written into a shared buffer; gradients flow."""
    reference = random_attention(32, 2, (10, 10), use_rel_pos=True)
    fast = copy.deepcopy(reference)
    fast.__class__ = FastAttention
    fast.bias_elements = 2 * 2 * 10 * 100 * 4  # 4 query rows per call
    x = torch.randn(2, 10, 10, 32)
    outputs = [module(x) for module in (reference, fast)]
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=0)
    for output in outputs:
        output.square().sum().backward()
    for (name, expected), actual in zip(reference.named_parameters(), fast.parameters(),
                                        strict=True):
        torch.testing.assert_close(actual.grad, expected.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_rel_pos_attention_chunking_does_not_change_the_result():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 48, 8).unbind(0)  # (B, heads, 6 * 8 tokens, C)
    rel_pos_h, rel_pos_w = torch.randn(11, 8), torch.randn(15, 8)
    with torch.inference_mode():
        results = [rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, (6, 8), scale=0.3,
                                     bias_elements=elements) for elements in (0, 1, 2000, 10**9)]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_accelerated_encoder_equals_reference(use_rel_pos):
    reference = small_sam(use_rel_pos)
    sam = accelerate_sam(copy.deepcopy(reference))
    pixels = torch.randn(2, 3, 256, 256)
    with torch.inference_mode():
        expected, actual = reference.image_encoder(pixels), sam.image_encoder(pixels)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_accelerate_sam_keeps_modules_parameters_and_state_dict():
    sam = small_sam()
    before = sam.state_dict()
    parameters = {name: id(parameter) for name, parameter in sam.named_parameters()}
    attentions = [block.attn for block in sam.image_encoder.blocks]
    assert accelerate_sam(sam) is sam
    assert [block.attn for block in sam.image_encoder.blocks] == attentions
    assert all(type(module) is FastAttention and isinstance(module, Attention)
               for module in attentions)
    mlps = [block.mlp for block in sam.image_encoder.blocks]
    assert all(type(module) is FastMLPBlock for module in mlps)
    # the mask decoder's MLPs stay segment_anything's
    assert not any(isinstance(m, FastMLPBlock) for m in sam.mask_decoder.modules())
    after = sam.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert {name: id(parameter) for name, parameter in sam.named_parameters()} == parameters
    sam.load_state_dict(before, strict=True)  # a checkpoint of the original loads unchanged
    accelerate_sam(sam, bias_elements=7)  # idempotent
    assert all(module.bias_elements == 7 for module in attentions)
    assert list(sam.state_dict()) == list(before)
    restore_sam(sam)
    assert all(type(module) is Attention and "bias_elements" not in vars(module)
               for module in attentions)
    assert all(type(module) is MLPBlock for module in mlps)


def test_accelerate_sam_refuses_an_encoder_without_segment_anything_attention():
    sam = small_sam()
    sam.image_encoder = nn.Sequential(nn.Conv2d(3, 32, 16, 16))
    with pytest.raises(ValueError, match="no segment_anything Attention"):
        accelerate_sam(sam)


@pytest.mark.parametrize("build", [tiny_sam, small_sam], ids=["tiny_sam_1024", "global_256"])
def test_box_segmenter_masks_unchanged(build):
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 90, 70], [40, 20, 150, 110], [0, 0, 159, 119]], dtype=np.float32)
    reference = BoxSegmenter(build())
    reference.set_image(image)
    expected_masks, expected_scores = reference.segment(boxes)
    fast = BoxSegmenter(accelerate_sam(build()))
    fast.set_image(image)
    masks, scores = fast.segment(boxes)
    assert masks.shape == expected_masks.shape == (3, 120, 160)
    assert 0 < expected_masks.sum() < expected_masks.size  # not a trivial comparison
    assert np.mean(masks != expected_masks) <= 1e-3
    np.testing.assert_allclose(scores, expected_scores, atol=1e-4, rtol=0)


def test_bf16_autocast_is_as_close_to_fp32_as_the_reference_bf16_path():
    reference = small_sam()
    sam = accelerate_sam(copy.deepcopy(reference))
    pixels = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        exact = reference.image_encoder(pixels)
        with torch.autocast("cpu", torch.bfloat16):
            reference_bf16 = reference.image_encoder(pixels).float()
            fast_bf16 = sam.image_encoder(pixels).float()
    reference_error = (reference_bf16 - exact).abs().max().item()
    fast_error = (fast_bf16 - exact).abs().max().item()
    assert fast_error <= reference_error + 0.02, (fast_error, reference_error)
