"""Language-guided query selection (paper §3.2, Eq. 1; reference `transformer.py:284-327` and
`GroundingDINO/utils.py:56-116` `gen_encoder_output_proposals`).

Every image token of the enhanced memory proposes an anchor box around its cell. Each token is
scored by its best similarity to any text token; the `num_queries` best tokens give the decoder's
initial reference boxes (anchor + predicted offset), while the content queries are a learned
embedding (`embed_init_tgt=True`).

Deviation for batches of differently sized images: padded image tokens get a score of -inf before
the top-k, so they are never selected (the reference never sees padding in single-image runs, so
nothing changes there). Invalid border anchors are NOT excluded, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from grounding.config import GroundingDINOConfig
from grounding.heads import MLP, ContrastiveHead

_PROPOSAL_MIN_SIZE = 0.05  # anchor width and height at level 0, doubled at each further level
_PROPOSAL_VALID_RANGE = (0.01, 0.99)


def encoder_output_proposals(
    vision: torch.Tensor,
    vision_padding_mask: torch.Tensor | None,
    spatial_shapes: list[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor box per image token, and the memory with unusable tokens zeroed.

    The anchor of cell (i, j) of level l is centred at ((j + 0.5) / W_valid, (i + 0.5) / H_valid),
    with width = height = 0.05 * 2**l, where W_valid, H_valid are the unpadded sizes of the level
    (read from the padding mask, per image). Anchors with any coordinate outside (0.01, 0.99) are
    invalid.

    Args:
        vision: `(B, S, C)` enhanced image tokens, levels flattened row-major in order.
        vision_padding_mask: `(B, S)` bool, True = padding; None = no padding.
        spatial_shapes: `(H, W)` of each level, padded sizes; `sum(H * W) == S`.

    Returns:
        memory: `(B, S, C)` `vision` with rows of padded or invalid tokens set to 0.
        proposals: `(B, S, 4)` anchors `(cx, cy, w, h)` in logit space (inverse sigmoid), +inf for
            padded or invalid tokens; dtype of `vision`.
    """
    batch_size = vision.shape[0]
    # Cell indices up to a few hundred are not exact in 16-bit floats: the geometry is float32.
    dtype, device = torch.promote_types(vision.dtype, torch.float32), vision.device
    level_proposals = []
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        if vision_padding_mask is None:
            valid_height = torch.full((batch_size,), height, dtype=dtype, device=device)
            valid_width = torch.full((batch_size,), width, dtype=dtype, device=device)
        else:
            level_mask = vision_padding_mask[:, start : start + height * width]
            level_mask = level_mask.view(batch_size, height, width)
            # Padding is bottom/right, so the first column and row hold the valid extents.
            valid_height = (~level_mask[:, :, 0]).sum(1).to(dtype)  # (B,)
            valid_width = (~level_mask[:, 0, :]).sum(1).to(dtype)  # (B,)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(height, dtype=dtype, device=device),
            torch.arange(width, dtype=dtype, device=device),
            indexing="ij",
        )
        center_x = (grid_x.reshape(1, -1) + 0.5) / valid_width[:, None]  # (B, H*W)
        center_y = (grid_y.reshape(1, -1) + 0.5) / valid_height[:, None]  # (B, H*W)
        size = torch.full_like(center_x, _PROPOSAL_MIN_SIZE * 2.0**level)
        level_proposals.append(torch.stack([center_x, center_y, size, size], dim=-1))  # (B, H*W, 4)
        start += height * width
    proposals = torch.cat(level_proposals, dim=1)  # (B, S, 4)

    low, high = _PROPOSAL_VALID_RANGE
    unusable = ~((proposals > low) & (proposals < high)).all(-1)  # (B, S)
    if vision_padding_mask is not None:
        unusable = unusable | vision_padding_mask
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(unusable[..., None], float("inf")).to(vision.dtype)
    memory = vision.masked_fill(unusable[..., None], 0.0)
    return memory, proposals


@dataclass
class QuerySelectionOutput:
    """Decoder inputs and the encoder-stage predictions (for the encoder loss).

    Attributes:
        target: `(B, Q, C)` content queries (the learned `tgt_embed`, broadcast over the batch).
        reference_boxes: `(B, Q, 4)` initial boxes `(cx, cy, w, h)` in [0, 1], detached.
        encoder_logits: `(B, Q, max_text_len)` token logits of the selected image tokens (-inf on
            padded and non-existent tokens).
        encoder_boxes: `(B, Q, 4)` the same boxes as `reference_boxes`, not detached.
        topk_indices: `(B, Q)` int64 indices of the selected tokens in `[0, S)`, best first.
    """

    target: torch.Tensor
    reference_boxes: torch.Tensor
    encoder_logits: torch.Tensor
    encoder_boxes: torch.Tensor
    topk_indices: torch.Tensor


class QuerySelection(nn.Module):
    """Selects `num_queries` image tokens by their best text-token similarity (paper Eq. 1)."""

    def __init__(self, config: GroundingDINOConfig) -> None:
        super().__init__()
        hidden_dim = config.hidden_dim
        self.num_queries = config.num_queries
        self.max_text_len = config.max_text_len
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_output_norm = nn.LayerNorm(hidden_dim, eps=config.layer_norm_eps)
        self.enc_out_bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.tgt_embed = nn.Embedding(config.num_queries, hidden_dim)
        self.class_head = ContrastiveHead(
            hidden_dim, config.max_text_len, scaled_with_bias=config.contrastive_bias
        )

    def forward(
        self,
        vision: torch.Tensor,
        vision_padding_mask: torch.Tensor | None,
        spatial_shapes: list[tuple[int, int]],
        text: torch.Tensor,
        text_token_mask: torch.Tensor,
    ) -> QuerySelectionOutput:
        """Score all image tokens against the text and keep the best `num_queries`.

        Args:
            vision: `(B, S, C)` enhanced image tokens (feature-enhancer output).
            vision_padding_mask: `(B, S)` bool, True = padding; None = no padding.
            spatial_shapes: `(H, W)` per level; `sum(H * W) == S >= num_queries`.
            text: `(B, n, C)` enhanced text tokens, `n <= max_text_len`.
            text_token_mask: `(B, n)` bool, True = real token.

        Returns:
            The decoder's content queries and initial boxes, and the selected tokens' logits and
            boxes for the encoder loss (see `QuerySelectionOutput`).
        """
        memory, proposals = encoder_output_proposals(vision, vision_padding_mask, spatial_shapes)
        memory = self.enc_output_norm(self.enc_output(memory))
        logits = self.class_head(memory, text, text_token_mask)  # (B, S, T)
        scores = logits.max(dim=-1).values  # (B, S)
        if vision_padding_mask is not None:
            scores = scores.masked_fill(vision_padding_mask, float("-inf"))
        topk_indices = torch.topk(scores, self.num_queries, dim=1).indices  # (B, Q)

        def gather(x: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, Q, D)
            return torch.gather(x, 1, topk_indices[..., None].expand(-1, -1, x.shape[-1]))

        # The box MLP acts per token, so it only needs to run on the selected ones.
        box_logits = self.enc_out_bbox_embed(gather(memory)) + gather(proposals)  # (B, Q, 4)
        encoder_boxes = box_logits.sigmoid()
        target = self.tgt_embed.weight[None].expand(vision.shape[0], -1, -1)  # (B, Q, C)
        return QuerySelectionOutput(
            target=target,
            reference_boxes=box_logits.detach().sigmoid(),
            encoder_logits=gather(logits),
            encoder_boxes=encoder_boxes,
            topk_indices=topk_indices,
        )
