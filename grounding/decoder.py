"""Cross-modality decoder (paper §3.3; reference `transformer.py:598-927`).

Each layer refines the queries with, in order: self-attention, cross-attention to the text
tokens, deformable cross-attention to the image tokens around the query's reference box, and a
feed-forward network, each followed by add & LayerNorm (post-norm). After every layer the shared
box head predicts an offset in logit space that refines the reference boxes (iterative refinement
as in Deformable DETR / DINO); the refined boxes are detached before they feed the next layer.

Deviations:
- The query position embedding is computed from the UNSCALED reference boxes; the reference uses
  the boxes multiplied by the level-0 valid ratios. Both are equal without padding; ours keeps a
  padded image's result equal to its unpadded result. The deformable sampling uses the scaled
  boxes, as in the reference.
- `inverse_sigmoid` uses the reference's eps 1e-3 (transformers: `torch.special.logit`, eps 1e-5).
  They differ for boxes within 1e-3 of 0 or 1, notably the boxes of selected invalid border
  anchors, which are exactly 1.0 (their proposals are +inf).
- The returned references keep their graph (DINO's "look forward twice", as the reference's
  `ref_points`); transformers returns the detached ones. Values are identical.
"""

from __future__ import annotations

import torch
from torch import nn

from grounding.box_ops import inverse_sigmoid
from grounding.config import GroundingDINOConfig
from grounding.deformable_attention import MultiScaleDeformableAttention
from grounding.heads import MLP
from grounding.position_encoding import box_position_embedding


class CrossModalityDecoderLayer(nn.Module):
    """One post-norm decoder layer: self-attn, text cross-attn, image deformable attn, FFN."""

    def __init__(self, config: GroundingDINOConfig) -> None:
        super().__init__()
        hidden_dim, heads, eps = config.hidden_dim, config.decoder_heads, config.layer_norm_eps
        self.self_attn = nn.MultiheadAttention(hidden_dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=eps)
        self.ca_text = nn.MultiheadAttention(hidden_dim, heads, batch_first=True)
        self.catext_norm = nn.LayerNorm(hidden_dim, eps=eps)
        self.cross_attn = MultiScaleDeformableAttention(
            hidden_dim=hidden_dim,
            num_heads=heads,
            num_levels=config.num_feature_levels,
            num_points=config.decoder_points,
        )
        self.norm1 = nn.LayerNorm(hidden_dim, eps=eps)
        self.linear1 = nn.Linear(hidden_dim, config.decoder_ffn_dim)
        self.linear2 = nn.Linear(config.decoder_ffn_dim, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim, eps=eps)

    def forward(
        self,
        target: torch.Tensor,
        query_pos: torch.Tensor,
        reference_boxes: torch.Tensor,
        vision: torch.Tensor,
        vision_padding_mask: torch.Tensor | None,
        spatial_shapes: list[tuple[int, int]],
        text: torch.Tensor,
        text_token_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Refine the queries once.

        Args:
            target: `(B, Q, C)` query content features.
            query_pos: `(B, Q, C)` query position embedding (added to queries and keys).
            reference_boxes: `(B, Q, L, 4)` `(cx, cy, w, h)` per level, already multiplied by
                the valid ratios (units of the padded maps).
            vision: `(B, S, C)` image tokens; `vision_padding_mask` `(B, S)` bool, True = padding,
                or None.
            spatial_shapes: `(H, W)` per level.
            text: `(B, n, C)` text tokens; `text_token_mask` `(B, n)` bool, True = real token.

        Returns:
            `(B, Q, C)` the refined queries (after the last LayerNorm).
        """
        query = key = target + query_pos
        attended = self.self_attn(query, key, target, need_weights=False)[0]
        target = self.norm2(target + attended)

        attended = self.ca_text(
            target + query_pos, text, text, key_padding_mask=~text_token_mask, need_weights=False
        )[0]
        target = self.catext_norm(target + attended)

        attended = self.cross_attn(
            target + query_pos, reference_boxes, vision, spatial_shapes, vision_padding_mask
        )
        target = self.norm1(target + attended)

        return self.norm3(target + self.linear2(torch.relu(self.linear1(target))))


class CrossModalityDecoder(nn.Module):
    """`decoder_layers` layers with iterative box refinement by an externally owned box head."""

    def __init__(self, config: GroundingDINOConfig) -> None:
        super().__init__()
        hidden_dim = config.hidden_dim
        self.layers = nn.ModuleList(
            CrossModalityDecoderLayer(config) for _ in range(config.decoder_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim, eps=config.layer_norm_eps)
        # Box sine embedding (4 * hidden_dim / 2 features) -> query position embedding.
        self.ref_point_head = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)

    def forward(
        self,
        target: torch.Tensor,
        reference_boxes: torch.Tensor,
        vision: torch.Tensor,
        vision_padding_mask: torch.Tensor | None,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: torch.Tensor,
        text: torch.Tensor,
        text_token_mask: torch.Tensor,
        bbox_head: MLP,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run all layers.

        Args:
            target: `(B, Q, C)` initial content queries.
            reference_boxes: `(B, Q, 4)` initial boxes `(cx, cy, w, h)` in [0, 1] relative to the
                unpadded image (sigmoided).
            vision: `(B, S, C)` enhanced image tokens.
            vision_padding_mask: `(B, S)` bool, True = padding, or None.
            spatial_shapes: `(H, W)` per level (padded sizes).
            valid_ratios: `(B, L, 2)` unpadded / padded size per level, as `(w, h)`.
            text: `(B, n, C)` enhanced text tokens.
            text_token_mask: `(B, n)` bool, True = real token.
            bbox_head: the shared box MLP (C -> 4), predicting logit-space offsets.

        Returns:
            hidden_states: `(num_layers, B, Q, C)`, each layer's output after the shared `norm`.
            references: `(num_layers + 1, B, Q, 4)` sigmoided boxes: the input boxes, then the
                boxes refined after each layer. Layer `l`'s prediction is
                `sigmoid(bbox_head(hidden_states[l]) + inverse_sigmoid(references[l]))`.
        """
        ratios = torch.cat([valid_ratios, valid_ratios], dim=-1)[:, None]  # (B, 1, L, 4)
        num_feats = target.shape[-1] // 2
        output = target
        reference = reference_boxes
        hidden_states, references = [], [reference_boxes]
        for layer in self.layers:
            scaled_reference = reference[:, :, None] * ratios  # (B, Q, L, 4)
            query_pos = self.ref_point_head(box_position_embedding(reference, num_feats))
            output = layer(
                output,
                query_pos,
                scaled_reference,
                vision,
                vision_padding_mask,
                spatial_shapes,
                text,
                text_token_mask,
            )
            # The box head sees the un-normalised output, as in the reference.
            refined = (bbox_head(output) + inverse_sigmoid(reference)).sigmoid()
            references.append(refined)
            reference = refined.detach()
            hidden_states.append(self.norm(output))
        return torch.stack(hidden_states), torch.stack(references)
