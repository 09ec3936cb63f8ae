"""Prediction heads (paper §3.3-3.4; reference `GroundingDINO/utils.py:233-268` and DETR's `MLP`).

- `MLP`: the box regression head (`bbox_embed`, `enc_out_bbox_embed`: 3 layers, output 4) and the
  decoder's reference-point head (`ref_point_head`: 2 layers). One box MLP is shared by all decoder
  layers (`dec_pred_bbox_embed_share=True`); the model owns it and passes it to the decoder.
- `contrastive_logits`: the classification "head" of Grounding DINO, a parameter-free dot product
  between query features and text token features (the reference's `ContrastiveEmbed`).
"""

from __future__ import annotations

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


def contrastive_logits(queries: torch.Tensor, text: torch.Tensor, text_token_mask: torch.Tensor,
                       max_text_len: int) -> torch.Tensor:
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
