"""Sine position encodings: transformers parity and padding invariance."""

from __future__ import annotations

import math

import torch
from transformers import GroundingDinoConfig
from transformers.models.grounding_dino import modeling_grounding_dino as hf

from grounding.position_encoding import (
    box_position_embedding,
    sine_position_embedding,
    text_position_embedding,
)


def _padding(batch: int, height: int, width: int, valid: list[tuple[int, int]]) -> torch.Tensor:
    mask = torch.ones(batch, height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(valid):
        mask[i, :h, :w] = False
    return mask


def test_image_embedding_matches_transformers():
    config = GroundingDinoConfig(d_model=64, positional_embedding_temperature=20)
    padding = _padding(3, 6, 9, [(6, 9), (4, 7), (1, 3)])
    expected = hf.GroundingDinoSinePositionEmbedding(config)(torch.zeros(3, 1, 6, 9), ~padding)
    out = sine_position_embedding(padding, num_feats=32, temperature=20)
    assert out.shape == (3, 64, 6, 9) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_image_embedding_layout():
    """Channel 0 is sin of the normalised y, channel 1 its cos, channel num_feats sin of x."""
    out = sine_position_embedding(torch.zeros(1, 2, 4, dtype=torch.bool), 8, 20)
    y = torch.tensor([1.0, 2.0]) / (2 + 1e-6) * 2 * math.pi
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]) / (4 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(out[0, 0, :, 0], y.sin())
    torch.testing.assert_close(out[0, 1, :, 0], y.cos())
    torch.testing.assert_close(out[0, 8, 0], x.sin())
    torch.testing.assert_close(out[0, 3, :, 0], (y / 20 ** (2 / 8)).cos())


def test_image_embedding_padding_invariance():
    alone = sine_position_embedding(torch.zeros(1, 4, 5, dtype=torch.bool), 16, 20)
    padded = sine_position_embedding(_padding(1, 7, 9, [(4, 5)]), 16, 20)
    torch.testing.assert_close(padded[..., :4, :5], alone, atol=0, rtol=0)


def test_text_embedding_matches_transformers():
    ids = torch.tensor([[0, 0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 0, 1, 2, 0, 0, 0]])
    expected = hf.encode_sinusoidal_position_embedding(ids[..., None].float(), num_pos_feats=256)
    out = text_position_embedding(ids, 256)
    assert out.shape == (2, 9, 256) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(out[0, 3, :2], torch.tensor([math.sin(4 * math.pi),
                                                            math.cos(4 * math.pi)]))


def test_box_embedding_matches_transformers():
    torch.manual_seed(0)
    boxes = torch.rand(2, 7, 4)
    expected = hf.encode_sinusoidal_position_embedding(boxes, num_pos_feats=128)
    out = box_position_embedding(boxes)
    assert out.shape == (2, 7, 512)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # order y, x, w, h: the first block encodes cy
    single = box_position_embedding(torch.tensor([0.1, 0.7, 0.2, 0.3]), num_feats=4)
    torch.testing.assert_close(single[:2], torch.tensor([math.sin(1.4 * math.pi),
                                                         math.cos(1.4 * math.pi)]))


def test_box_embedding_keeps_dtype():
    boxes = torch.rand(3, 4, dtype=torch.bfloat16)
    out = box_position_embedding(boxes, 16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), box_position_embedding(boxes.float(), 16),
                               atol=1e-2, rtol=1e-2)
