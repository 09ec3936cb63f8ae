"""Sinusoidal position encodings: image levels, text position ids and reference boxes.

Three encodings share one core, `_interleaved_sine`: a coordinate already scaled to radians is
divided by `temperature ** (2 * (i // 2) / num_feats)` for feature index `i`, and even features
take the sine, odd ones the cosine (interleaved, as in DETR and the reference).

- Image levels: the reference `PositionEmbeddingSineHW` (normalised cumulative counts of valid
  pixels, temperature 20 in the official config), channels y then x.
- Text: the reference `get_sine_pos_embed` on the per-phrase position ids (temperature 10000).
- Boxes: the reference `gen_sineembed_for_position` (order y, x, w, h; temperature 10000).

The encodings are computed in float32 (float64 stays float64); callers cast to their activation
dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_TWO_PI = 2 * math.pi


def _interleaved_sine(angles: Tensor, num_feats: int, temperature: float) -> Tensor:
    """Interleaved sine / cosine features of scaled coordinates.

    Args:
        angles: coordinates already multiplied by their scale, any shape `(...)`, floating.
        num_feats: number of features per coordinate (even).
        temperature: frequency base.

    Returns:
        `(..., num_feats)` in the dtype of `angles`: feature `2k` is `sin(angles / t_k)`,
        feature `2k + 1` is `cos(angles / t_k)` with `t_k = temperature ** (2k / num_feats)`.
    """
    index = torch.arange(num_feats, device=angles.device)
    exponent = (2 * (index // 2)).to(angles.dtype) / num_feats
    dim_t = temperature**exponent  # (num_feats,)
    phases = angles[..., None] / dim_t  # (..., num_feats)
    # (..., num_feats / 2, 2) -> (..., num_feats): sin, cos, sin, cos, ...
    return torch.stack((phases[..., 0::2].sin(), phases[..., 1::2].cos()), dim=-1).flatten(-2)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 when the input already is float64 (integer inputs give float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sine_position_embedding(padding_mask: Tensor, num_feats: int, temperature: float) -> Tensor:
    """2-D sine position embedding of one feature level (reference `PositionEmbeddingSineHW`).

    The coordinates are the cumulative counts of valid cells along each axis, normalised by the
    valid length of that row / column (`count / (valid + 1e-6) * 2 pi`, no -0.5 offset), so the
    embedding of a valid cell does not depend on how much padding follows it (bottom / right).

    Args:
        padding_mask: `(B, H, W)` bool, True on padded cells.
        num_feats: features per axis; the output has `2 * num_feats` channels.
        temperature: frequency base (20 for Grounding DINO's image levels).

    Returns:
        `(B, 2 * num_feats, H, W)` float32: channels `[0, num_feats)` encode y, the rest x. Values
        on padded cells are meaningless.
    """
    not_padding = ~padding_mask
    y_embed = not_padding.cumsum(1, dtype=torch.float32)  # (B, H, W)
    x_embed = not_padding.cumsum(2, dtype=torch.float32)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * _TWO_PI
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * _TWO_PI
    pos_y = _interleaved_sine(y_embed, num_feats, temperature)  # (B, H, W, num_feats)
    pos_x = _interleaved_sine(x_embed, num_feats, temperature)
    # (B, H, W, 2 * num_feats) -> (B, 2 * num_feats, H, W)
    return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def text_position_embedding(position_ids: Tensor, dim: int) -> Tensor:
    """Sine embedding of text position ids (reference `get_sine_pos_embed`, one coordinate).

    Args:
        position_ids: `(B, n)` integer (or floating) positions; Grounding DINO restarts them at
            every phrase.
        dim: number of features (the hidden size).

    Returns:
        `(B, n, dim)` float32 (float64 for float64 ids):
        `sin / cos(id * 2 pi / 10000 ** (2k / dim))` interleaved.
    """
    angles = position_ids.to(_compute_dtype(position_ids.dtype)) * _TWO_PI
    return _interleaved_sine(angles, dim, 10000.0)


def box_position_embedding(boxes: Tensor, num_feats: int = 128) -> Tensor:
    """Sine embedding of boxes (reference `gen_sineembed_for_position`).

    Args:
        boxes: `(..., 4)` normalised `(cx, cy, w, h)`.
        num_feats: features per coordinate.

    Returns:
        `(..., 4 * num_feats)` in the dtype of `boxes` (computed in float32): the embeddings of
        `cy`, `cx`, `w`, `h` in this order (y before x, as the reference), temperature 10000,
        scale 2 pi.
    """
    angles = boxes.to(_compute_dtype(boxes.dtype)) * _TWO_PI
    cx, cy, w, h = angles.unbind(-1)
    embeddings = [_interleaved_sine(coord, num_feats, 10000.0) for coord in (cy, cx, w, h)]
    return torch.cat(embeddings, dim=-1).to(boxes.dtype)
