"""Image-text fusion (grounding.fusion): the reassociated attention equals transformers' order."""

from __future__ import annotations

import pytest
import torch
from transformers import GroundingDinoConfig
from transformers.models.grounding_dino import modeling_grounding_dino as hf

from grounding.fusion import BiMultiHeadAttention

HIDDEN, FFN, HEADS = 32, 64, 4  # embed_dim = FFN // 2 = 32, head_dim 8
NAMES = {"v_proj": "vision_proj", "l_proj": "text_proj", "values_v_proj": "values_vision_proj",
         "values_l_proj": "values_text_proj", "out_v_proj": "out_vision_proj",
         "out_l_proj": "out_text_proj"}


def _pair(seed: int = 0):
    # transformers gives the fusion half the encoder's heads
    config = GroundingDinoConfig(d_model=HIDDEN, encoder_ffn_dim=FFN,
                                 encoder_attention_heads=2 * HEADS)
    reference = hf.GroundingDinoBiMultiHeadAttention(config).eval()
    torch.manual_seed(seed)
    ours = BiMultiHeadAttention(hidden_dim=HIDDEN, embed_dim=FFN // 2, num_heads=HEADS)
    with torch.no_grad():
        for parameter in ours.parameters():  # biases too: the folded bias terms must be right
            parameter.normal_(std=0.3)
    state = {f"{NAMES[key.split('.')[0]]}.{key.split('.')[1]}": value
             for key, value in ours.state_dict().items()}
    reference.load_state_dict(state, strict=True)
    return ours, reference


@pytest.mark.parametrize("text_length", [1, 5, 40])  # 40 tokens: heads * n above embed_dim
@pytest.mark.parametrize("padded", [False, True])
def test_equals_transformers_order_of_operations(text_length, padded):
    ours, reference = _pair()
    torch.manual_seed(1)
    vision, text = torch.randn(2, 50, HIDDEN) * 3, torch.randn(2, text_length, HIDDEN) * 3
    vision_mask = text_mask = None
    if padded:
        vision_mask = torch.zeros(2, 50, dtype=torch.bool)
        vision_mask[1, 30:] = True
        text_mask = torch.zeros(2, text_length, dtype=torch.bool)
        text_mask[1, (text_length + 1) // 2:] = True
    (expected_vision, _), (expected_text, _) = reference(vision, text, vision_mask, text_mask)
    delta_vision, delta_text = ours(vision, text, vision_mask, text_mask)
    _assert_close_to_scale(delta_vision, expected_vision, 1e-5)
    _assert_close_to_scale(delta_text, expected_text, 1e-5)


def test_gradients_equal_transformers():
    ours, reference = _pair()
    torch.manual_seed(2)
    vision, text = torch.randn(2, 30, HIDDEN), torch.randn(2, 6, HIDDEN)
    text_mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    inputs = [vision.clone().requires_grad_(), text.clone().requires_grad_()]
    outputs = ours(*inputs, None, text_mask)
    (sum(o.square().sum() for o in outputs)).backward()
    reference_inputs = [vision.clone().requires_grad_(), text.clone().requires_grad_()]
    (v, _), (t, _) = reference(*reference_inputs, None, text_mask)
    (v.square().sum() + t.square().sum()).backward()
    for mine, theirs in zip(inputs, reference_inputs, strict=True):
        _assert_close_to_scale(mine.grad, theirs.grad, 1e-5)
    for name, parameter in ours.named_parameters():
        module, kind = name.split(".")
        theirs = getattr(getattr(reference, NAMES[module]), kind).grad
        _assert_close_to_scale(parameter.grad, theirs, 1e-5)


def _assert_close_to_scale(actual, expected, relative: float) -> None:
    """|actual - expected| <= relative * max |expected|: float rounding of another summation
    order, measured against the size of the tensor (elementwise relative error is meaningless
    near the zeros of a sum with cancellation)."""
    difference = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert difference <= relative * scale, f"max |difference| {difference:.2e}, scale {scale:.2e}"
