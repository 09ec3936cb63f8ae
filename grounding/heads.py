"""Prediction heads (paper §3.3-3.4; reference `GroundingDINO/utils.py:233-268` and DETR's `MLP`).

- `MLP`: the box regression head (`bbox_embed`, `enc_out_bbox_embed`: 3 layers, output 4) and the
  decoder's reference-point head (`ref_point_head`: 2 layers). One box MLP is shared by all decoder
  layers (`dec_pred_bbox_embed_share=True`); the model owns it and passes it to the decoder.
- `contrastive_logits`: the classification "head" of Grounding DINO, a parameter-free dot product
  between query features and text token features (the reference's `ContrastiveEmbed`).
- `ContrastiveHead`: that dot product, or, for models trained from scratch
  (`GroundingDINOConfig.contrastive_bias`), MM-Grounding-DINO's `ContrastiveEmbed(log_scale="auto",
  bias=True)`: the product divided by sqrt(C) plus a learnable bias that starts at the focal-loss
  prior -log((1 - 0.01) / 0.01), so a fresh model starts at probabilities near 0.01 instead of the
  huge logits the focal loss would spend thousands of steps fighting. The official checkpoints have
  neither, so the official presets keep the plain product (and their exact outputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (none after the last).

    Submodules are `layers.{k}` as in the official checkpoint.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        in_dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        out_dims = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(in_dims, out_dims, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., input_dim)` -> `(..., output_dim)`."""
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def contrastive_logits(
    queries: torch.Tensor, text: torch.Tensor, text_token_mask: torch.Tensor, max_text_len: int
) -> torch.Tensor:
    """Query-to-token similarity logits, padded to a fixed number of token columns.

    No parameters, no scaling and no bias, as in the reference: `queries @ text^T`, then -inf where
    the token is not real and in the padding columns (sigmoid of -inf is 0).

    Args:
        queries: `(B, Q, C)` query (or image token) features.
        text: `(B, n, C)` text token features.
        text_token_mask: `(B, n)` bool, True = real token (special tokens count as real).
        max_text_len: number of output columns (256 in the reference).

    Returns:
        `(B, Q, max_text_len)` logits in the dtype of the product.

    Raises:
        ValueError: if `n > max_text_len` (the caller truncates the text beforehand).
    """
    num_tokens = text.shape[1]
    if num_tokens > max_text_len:
        raise ValueError(f"text has {num_tokens} tokens, more than max_text_len={max_text_len}")
    logits = queries @ text.transpose(-1, -2)  # (B, Q, n)
    logits = logits.masked_fill(~text_token_mask[:, None, :], float("-inf"))
    return F.pad(logits, (0, max_text_len - num_tokens), value=float("-inf"))


# The focal-loss prior of RetinaNet / GLIP: every token starts at probability 0.01.
PRIOR_PROBABILITY = 0.01


class ContrastiveHead(nn.Module):
    """Query-token logits, plain (the reference) or scaled with a learnable bias.

    Args:
        hidden_dim: the feature width C.
        max_text_len: columns of the output.
        scaled_with_bias: divide by sqrt(C) and add a learnable scalar bias (one parameter,
            `bias`); False: no parameters at all, exactly `contrastive_logits`.
    """

    def __init__(self, hidden_dim: int, max_text_len: int, *, scaled_with_bias: bool) -> None:
        super().__init__()
        self.max_text_len = max_text_len
        self.scale = hidden_dim**-0.5 if scaled_with_bias else None
        self.bias = (
            nn.Parameter(torch.tensor(-math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)))
            if scaled_with_bias
            else None
        )

    def forward(
        self, queries: torch.Tensor, text: torch.Tensor, text_token_mask: torch.Tensor
    ) -> torch.Tensor:
        """`(B, Q, C)` queries and `(B, n, C)` text -> `(B, Q, max_text_len)` logits, -inf where
        the token is not real (see `contrastive_logits`)."""
        if self.scale is None:
            return contrastive_logits(queries, text, text_token_mask, self.max_text_len)
        assert self.bias is not None  # set together with self.scale
        # -inf columns stay -inf: the bias is finite.
        return (
            contrastive_logits(queries * self.scale, text, text_token_mask, self.max_text_len)
            + self.bias
        )
