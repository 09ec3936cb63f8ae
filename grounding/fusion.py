"""Image-text feature fusion (paper §3.1, Fig. 3 "feature enhancer": image-to-text and text-to-image
cross-attention; reference `models/GroundingDINO/fuse_modules.py`, `BiMultiHeadAttention` and
`BiAttentionBlock`, from GLIP).

One score matrix per head, `q_v k_l^T` between image tokens and text tokens, is softmaxed both ways:
over the text tokens to update the image, over the image tokens to update the text.

Deviation in the order of operations (not in the result beyond float rounding): the reference
projects all S image tokens three times to `embed_dim` (1024 in the official models:
`v_proj`, `values_v_proj`, and `out_v_proj` back), three (S x 256 x 1024) products, ~95 % of the
block's work for S ~ 20k image tokens at 800 x 1200. Every one of them only ever meets the n text
tokens (n is small: a caption has at most 256 tokens, usually a few dozen), so we multiply by the
text side first:

- scores `(x W_v^T + b_v) k^T * scale = x (W_v^T k^T * scale) + b_v k^T * scale`: a
  (256 x heads * n) matrix built from the text, then one (S x 256 x heads * n) product;
- image update `out_v(P v_l) = P (v_l W_out^T)`: per head the text values times their slice of
  `out_v_proj`, then one (S x heads * n x 256) product;
- text update `P_t (x W_vv^T + b_vv) = (P_t x) W_vv^T + b_vv` (each row of P_t sums to one): the
  (heads * n x S x 256) product first.

With n tokens this is about `heads * n / embed_dim` of the reference's multiply-adds (1/32 for 8
tokens, equal at 256), and no (S, embed_dim) tensor is materialised or transposed. Parameters,
names and initialisation are the reference's, so checkpoints map one to one.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import Tensor, nn

# Scores of the fusion attention are clamped to +-this before the softmaxes (float16 range).
_FUSION_CLAMP = 50000.0


class BiMultiHeadAttention(nn.Module):
    """Image-to-text and text-to-image attention sharing one score matrix (reference `FU:99-248`).

    Args:
        hidden_dim: width of image and text tokens.
        embed_dim: width of the attention (the official model uses `encoder_ffn_dim // 2`).
        num_heads: attention heads.
    """

    def __init__(self, *, hidden_dim: int, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.v_proj = nn.Linear(hidden_dim, embed_dim)
        self.l_proj = nn.Linear(hidden_dim, embed_dim)
        self.values_v_proj = nn.Linear(hidden_dim, embed_dim)
        self.values_l_proj = nn.Linear(hidden_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, hidden_dim)
        self.out_l_proj = nn.Linear(embed_dim, hidden_dim)
        for linear in (
            self.v_proj,
            self.l_proj,
            self.values_v_proj,
            self.values_l_proj,
            self.out_v_proj,
            self.out_l_proj,
        ):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _heads(self, x: Tensor) -> Tensor:
        # (..., heads * head_dim) -> (..., heads, head_dim)
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def forward(
        self,
        vision: Tensor,
        text: Tensor,
        vision_padding_mask: Tensor | None,
        text_padding_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Cross-attend both ways.

        Args:
            vision: `(B, S, C)` image tokens.
            text: `(B, n, C)` text tokens.
            vision_padding_mask: `(B, S)` bool, True on padded image tokens (text queries ignore
                them), or None.
            text_padding_mask: `(B, n)` bool, True on padded text tokens (image queries ignore
                them), or None.

        Returns:
            `(delta_vision (B, S, C), delta_text (B, n, C))`.
        """
        batch, length, _ = text.shape
        heads = self.num_heads
        key = self._heads(self.l_proj(text))  # (B, n, heads, d)
        text_values = self._heads(self.values_l_proj(text))  # (B, n, heads, d)
        # v_proj folded into the keys: (heads, d, C) x (B, n, heads, d) -> (B, C, heads, n)
        v_weight = self._heads(self.v_proj.weight.T).permute(1, 2, 0)  # (heads, d, C)
        score_weight = torch.einsum("hdc,bnhd->bchn", v_weight, key) * self.scale
        score_bias = torch.einsum("hd,bnhd->bhn", self._heads(self.v_proj.bias), key) * self.scale
        # (B, S, C) x (B, C, heads * n) -> (B, S, heads * n): the reference's (B*heads, S, n)
        scores = torch.baddbmm(score_bias.flatten(1)[:, None], vision, score_weight.flatten(2))
        # The reference subtracts the maximum over the whole tensor (all images and heads) and
        # clamps, for float16; both softmaxes are invariant to it up to rounding.
        scores = (scores - scores.max()).clamp(-_FUSION_CLAMP, _FUSION_CLAMP)
        text_scores = scores - scores.max(dim=1, keepdim=True)[0]  # max over the image tokens
        text_scores = text_scores.clamp(-_FUSION_CLAMP, _FUSION_CLAMP)
        if vision_padding_mask is not None:
            text_scores = text_scores.masked_fill(vision_padding_mask[:, :, None], float("-inf"))
        scores = scores.view(batch, -1, heads, length)  # (B, S, heads, n)
        if text_padding_mask is not None:
            scores = scores.masked_fill(text_padding_mask[:, None, None, :], float("-inf"))
        probabilities = scores.softmax(dim=-1).flatten(2)  # over the text tokens
        text_probabilities = text_scores.softmax(dim=1)  # over the image tokens

        # out_v_proj folded into the text values:
        # (B, n, heads, d) x (C, heads, d) -> (B, heads, n, C) -> (B, heads * n, C)
        out_weight = self._heads(self.out_v_proj.weight)  # (C, heads, d)
        update_values = torch.einsum("bnhd,chd->bhnc", text_values, out_weight).flatten(1, 2)
        delta_vision = torch.baddbmm(self.out_v_proj.bias, probabilities, update_values)

        # values_v_proj after the weighted sum: (B, heads * n, S) x (B, S, C) -> (B, heads, n, C)
        pooled = torch.bmm(text_probabilities.transpose(1, 2), vision).unflatten(1, (heads, length))
        values_weight = self._heads(self.values_v_proj.weight.T).permute(1, 2, 0)  # (heads, d, C)
        attended = torch.einsum("bhnc,hdc->bnhd", pooled, values_weight)
        attended = attended + self._heads(self.values_v_proj.bias)
        delta_text = self.out_l_proj(attended.flatten(2))  # (B, n, heads * d) -> (B, n, C)
        return delta_vision, delta_text


class BiAttentionBlock(nn.Module):
    """Image-text fusion with layer scale (reference `BiAttentionBlock`).

    Both inputs are layer-normalised first and the scaled attention output is added to the
    NORMALISED tensors: `v' = LN(v) + gamma_v * dv`, `l' = LN(l) + gamma_l * dl`.

    Args:
        hidden_dim: width of image and text tokens.
        embed_dim: width of the bidirectional attention.
        num_heads: its heads.
        drop_path: stochastic-depth rate on the scaled updates (training only).
        init_values: initial layer scale.
        layer_norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        *,
        hidden_dim: int,
        embed_dim: int,
        num_heads: int,
        drop_path: float = 0.1,
        init_values: float = 1e-4,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.layer_norm_l = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.attn = BiMultiHeadAttention(
            hidden_dim=hidden_dim, embed_dim=embed_dim, num_heads=num_heads
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma_v = nn.Parameter(torch.full((hidden_dim,), init_values))
        self.gamma_l = nn.Parameter(torch.full((hidden_dim,), init_values))

    def forward(
        self,
        vision: Tensor,
        text: Tensor,
        vision_padding_mask: Tensor | None,
        text_padding_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Args and returns as `BiMultiHeadAttention`, returning the updated tokens."""
        vision = self.layer_norm_v(vision)
        text = self.layer_norm_l(text)
        delta_vision, delta_text = self.attn(vision, text, vision_padding_mask, text_padding_mask)
        vision = vision + self.drop_path(self.gamma_v * delta_vision)
        text = text + self.drop_path(self.gamma_l * delta_text)
        return vision, text
