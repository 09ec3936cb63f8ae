"""Feature enhancer (paper §3.1, Fig. 3 block 2; reference `TransformerEncoder`).

Every layer runs, in this order:

1. image-text fusion (`BiAttentionBlock`): bidirectional cross-attention between image tokens and
   text tokens, with layer scale;
2. text self-attention (`TextEnhancerLayer`) restricted to the sub-sentence phrase blocks;
3. image self-attention (`DeformableEncoderLayer`): multi-scale deformable attention around each
   token's own cell centre.

Mask polarity: `*_padding_mask` True = ignore; `text_token_mask` True = real token;
`text_self_attention_mask` True = may attend. Module names follow the official checkpoint
(`transformer.encoder.{layers,text_layers,fusion_layers}`); transformers' names are renamed by
`transformers_keys`.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .config import GroundingDINOConfig
from .deformable_attention import MultiScaleDeformableAttention
from .fused_linear import fused_linear
from .fusion import BiAttentionBlock
from .position_encoding import text_position_embedding


class TextEnhancerLayer(nn.Module):
    """Post-norm text self-attention layer (reference `TransformerEncoderLayer`, TV:72-123).

    Args:
        hidden_dim: token width.
        num_heads: attention heads.
        ffn_dim: hidden width of the ReLU feed-forward network.
        layer_norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self, *, hidden_dim: int, num_heads: int, ffn_dim: int, layer_norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.linear1 = nn.Linear(hidden_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)

    def forward(self, text: Tensor, text_pos: Tensor, self_attention_mask: Tensor) -> Tensor:
        """Self-attention (q = k = text + pos, v = text), add & norm1, FFN, add & norm2.

        Args:
            text: `(B, n, C)`.
            text_pos: `(B, n, C)` position embedding (cast to the dtype of `text`).
            self_attention_mask: `(B, n, n)` bool, True where query token i may attend to key
                token j (the sub-sentence blocks). Every row needs one True (its diagonal). There
                is no separate key padding mask, as in the reference: padded tokens only see
                themselves and no real token sees them.

        Returns:
            `(B, n, C)`.
        """
        query = text + text_pos.to(text.dtype)
        batch, length, _ = self_attention_mask.shape
        # (B, n, n) -> (B, heads, n, n) -> (B*heads, n, n), batch-major as nn.MultiheadAttention
        # expects (the reference's `repeat(nhead, 1, 1)` is head-major, wrong for B > 1)
        blocked = (~self_attention_mask)[:, None].expand(batch, self.num_heads, length, length)
        blocked = blocked.reshape(batch * self.num_heads, length, length)
        attended = self.self_attn(query, query, text, attn_mask=blocked, need_weights=False)[0]
        text = self.norm1(text + attended)
        return self.norm2(text + self.linear2(self.linear1(text).relu()))


class DeformableEncoderLayer(nn.Module):
    """Post-norm deformable self-attention layer (reference `DeformableTransformerEncoderLayer`).

    Args:
        hidden_dim: token width.
        num_heads, num_levels, num_points: of the deformable attention.
        ffn_dim: hidden width of the ReLU feed-forward network.
        layer_norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        *,
        hidden_dim: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        ffn_dim: int,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(
            hidden_dim=hidden_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm1 = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.linear1 = nn.Linear(hidden_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)

    def forward(
        self,
        vision: Tensor,
        vision_pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: list[tuple[int, int]],
        vision_padding_mask: Tensor | None,
    ) -> Tensor:
        """Deformable attention (query = vision + pos, value = vision), add & norm1, FFN, norm2.

        Args:
            vision: `(B, S, C)` flattened levels.
            vision_pos: `(B, S, C)` position (+ level) embedding.
            reference_points: `(B, S, levels, 2)` normalised `(x, y)`, valid ratios applied.
            spatial_shapes: `(H_l, W_l)` per level.
            vision_padding_mask: `(B, S)` bool, True on padding, or None.

        Returns:
            `(B, S, C)`.
        """
        attended = self.self_attn(
            vision + vision_pos, reference_points, vision, spatial_shapes, vision_padding_mask
        )
        vision = self.norm1(vision + attended)
        hidden = fused_linear(vision, self.linear1, "relu")  # (B, S, ffn_dim)
        return self.norm2(vision + fused_linear(hidden, self.linear2))


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Cell centres of every level, as seen from every level (reference `get_reference_points`).

    A token of level l at row i, column j sits at `((j + 0.5) / valid_W_l, (i + 0.5) / valid_H_l)`
    of its image; that point is then expressed in the padded map of every level by multiplying
    with that level's valid ratios.

    Args:
        spatial_shapes: `(H_l, W_l)` of the (padded) levels.
        valid_ratios: `(B, L, 2)` valid fraction `(w, h)` of each level.

    Returns:
        `(B, S, L, 2)` normalised `(x, y)`, float32 (float64 for float64 ratios).
    """
    dtype = torch.promote_types(valid_ratios.dtype, torch.float32)
    valid_ratios = valid_ratios.to(dtype)
    points = []
    for level, (height, width) in enumerate(spatial_shapes):
        centre_y, centre_x = torch.meshgrid(
            torch.linspace(0.5, height - 0.5, height, dtype=dtype, device=valid_ratios.device),
            torch.linspace(0.5, width - 0.5, width, dtype=dtype, device=valid_ratios.device),
            indexing="ij",
        )
        # (H*W,) / (B, 1) -> (B, H*W): divided by the valid size of this level
        ref_y = centre_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = centre_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))  # (B, H*W, 2)
    # (B, S, 1, 2) * (B, 1, L, 2) -> (B, S, L, 2)
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class FeatureEnhancer(nn.Module):
    """`config.encoder_layers` x (fusion -> text self-attention -> deformable self-attention)."""

    def __init__(self, config: GroundingDINOConfig) -> None:
        super().__init__()
        hidden = config.hidden_dim
        eps = config.layer_norm_eps
        self.hidden_dim = hidden
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                hidden_dim=hidden,
                num_heads=config.encoder_heads,
                num_levels=config.num_feature_levels,
                num_points=config.encoder_points,
                ffn_dim=config.encoder_ffn_dim,
                layer_norm_eps=eps,
            )
            for _ in range(config.encoder_layers)
        )
        self.text_layers = nn.ModuleList(
            TextEnhancerLayer(
                hidden_dim=hidden,
                num_heads=config.text_enhancer_heads,
                ffn_dim=config.text_enhancer_ffn_dim,
                layer_norm_eps=eps,
            )
            for _ in range(config.encoder_layers)
        )
        self.fusion_layers = nn.ModuleList(
            BiAttentionBlock(
                hidden_dim=hidden,
                embed_dim=config.fusion_dim,
                num_heads=config.fusion_heads,
                drop_path=config.fusion_drop_path,
                layer_norm_eps=eps,
            )
            for _ in range(config.encoder_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation (`Transformer._reset_parameters`): Xavier-uniform for every
        matrix, then the deformable attentions' own scheme."""
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for layer in self.layers:
            cast(DeformableEncoderLayer, layer).self_attn.reset_parameters()

    def forward(
        self,
        vision: Tensor,
        vision_pos: Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: Tensor,
        vision_padding_mask: Tensor | None,
        text: Tensor,
        text_token_mask: Tensor,
        text_self_attention_mask: Tensor,
        text_position_ids: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Enhance image and text features jointly.

        Args:
            vision: `(B, S, C)` flattened levels (level 0 first, row-major within a level).
            vision_pos: `(B, S, C)` sine position embedding plus level embedding.
            spatial_shapes: `(H_l, W_l)` per level (of the padded maps).
            valid_ratios: `(B, L, 2)` valid fraction `(w, h)` of each level (1 without padding).
            vision_padding_mask: `(B, S)` bool, True on padded image tokens, or None.
            text: `(B, n, C)` projected text features.
            text_token_mask: `(B, n)` bool, True on real tokens (False = padding).
            text_self_attention_mask: `(B, n, n)` bool, True where token i may attend to token j
                (sub-sentence blocks; the diagonal is always True).
            text_position_ids: `(B, n)` long, per-phrase position ids.

        Returns:
            `(vision (B, S, C), text (B, n, C))`, the enhanced features (`memory`, `memory_text`).
        """
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        text_pos = text_position_embedding(text_position_ids, self.hidden_dim)
        text_padding_mask = ~text_token_mask
        for fusion, text_layer, layer in zip(
            self.fusion_layers, self.text_layers, self.layers, strict=True
        ):
            vision, text = fusion(vision, text, vision_padding_mask, text_padding_mask)
            text = text_layer(text, text_pos, text_self_attention_mask)
            vision = layer(
                vision, vision_pos, reference_points, spatial_shapes, vision_padding_mask
            )
        return vision, text
