"""The whole Grounding DINO detector (paper Fig. 2; reference `groundingdino.py`).

image -> Swin -> input projections -> ┐
text  -> BERT -> projection ---------> feature enhancer -> query selection -> decoder -> heads

Deviation from the reference, for exact padding invariance (a batch equals its images run alone):
the backbone and the input projections run on each image's unpadded pixels (grouped by size), and
only their feature maps are padded. The reference runs Swin and GroupNorm over padded pixels, so its
padded images differ from their single runs; with no padding the two are the same computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grounding.box_ops import inverse_sigmoid
from grounding.config import GroundingDINOConfig
from grounding.decoder import CrossModalityDecoder
from grounding.devices import host_tensor
from grounding.feature_enhancer import FeatureEnhancer
from grounding.heads import MLP, ContrastiveHead
from grounding.image_backbone import ImageBackbone
from grounding.position_encoding import sine_position_embedding
from grounding.query_selection import QuerySelection
from grounding.text_backbone import TextBackbone
from grounding.text_masks import BERT_SPECIAL_TOKEN_IDS, sub_sentence_masks


@dataclass
class ImageFeatures:
    """Flattened multi-scale image tokens, ready for the feature enhancer.

    Attributes:
        tokens: (B, S, C) projected features of all levels, level after level.
        position: (B, S, C) sine position embedding plus the level embedding.
        padding_mask: (B, S) bool, True on padded tokens; None when no image is padded.
        spatial_shapes: (H_l, W_l) of each level's (padded) map.
        valid_ratios: (B, L, 2) float32, unpadded fraction (w, h) of each level's map.
    """

    tokens: Tensor
    position: Tensor
    padding_mask: Tensor | None
    spatial_shapes: list[tuple[int, int]]
    valid_ratios: Tensor


@dataclass
class GroundingOutput:
    """Raw detector outputs (no thresholds).

    Attributes:
        logits: (B, Q, max_text_len) pre-sigmoid query-token similarities, -inf beyond each
            caption's tokens.
        boxes: (B, Q, 4) cx, cy, w, h normalised to the unpadded image.
        query_indices: (B, Q) int64, the image token (flattened over levels) each query was
            selected from, best first.
        aux_logits, aux_boxes: the same for the earlier decoder layers (training), or None.
        encoder_logits, encoder_boxes: the selected encoder proposals (training).
    """

    logits: Tensor
    boxes: Tensor
    query_indices: Tensor | None = None
    aux_logits: list[Tensor] | None = None
    aux_boxes: list[Tensor] | None = None
    encoder_logits: Tensor | None = None
    encoder_boxes: Tensor | None = None


class GroundingDINO(nn.Module):
    """Grounding DINO: boxes for the phrases of a caption.

    Submodule names follow the official checkpoint (`input_proj`, `level_embed`, `bbox_embed`), so
    loading is mostly a prefix rename (see `checkpoint.py`).
    """

    def __init__(
        self,
        config: GroundingDINOConfig,
        *,
        backbone: ImageBackbone,
        text_backbone: TextBackbone,
        feature_enhancer: FeatureEnhancer,
        query_selection: QuerySelection,
        decoder: CrossModalityDecoder,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.text_backbone = text_backbone
        self.feature_enhancer = feature_enhancer
        self.query_selection = query_selection
        self.decoder = decoder
        hidden = config.hidden_dim
        in_channels = list(config.backbone.out_channels)
        projections = [
            nn.Sequential(nn.Conv2d(c, hidden, 1), nn.GroupNorm(32, hidden)) for c in in_channels
        ]
        extra_in = in_channels[-1]
        for _ in range(config.num_feature_levels - len(in_channels)):
            projections.append(
                nn.Sequential(
                    nn.Conv2d(extra_in, hidden, 3, stride=2, padding=1), nn.GroupNorm(32, hidden)
                )
            )
            extra_in = hidden
        self.input_proj = nn.ModuleList(projections)
        self.level_embed = nn.Parameter(torch.zeros(config.num_feature_levels, hidden))
        # One box MLP shared by every decoder layer (the reference stores it under 12 names).
        self.bbox_embed = MLP(hidden, hidden, 4, 3)
        # Shared by every decoder layer, like the box head (parameter-free unless
        # `config.contrastive_bias`).
        self.class_head = ContrastiveHead(
            hidden, config.max_text_len, scaled_with_bias=config.contrastive_bias
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.normal_(self.level_embed)
        for projection in self.input_proj:
            conv = cast(nn.Conv2d, cast(nn.Sequential, projection)[0])  # (Conv2d, GroupNorm)
            assert conv.bias is not None  # built with the default bias=True
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
        last = cast(nn.Linear, self.bbox_embed.layers[-1])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(
        self,
        pixels: Tensor,
        input_ids: Tensor,
        token_mask: Tensor,
        padding_mask: Tensor | None = None,
        *,
        text_masks: tuple[Tensor, Tensor] | None = None,
        return_aux: bool = False,
    ) -> GroundingOutput:
        """Detect the caption's phrases.

        Args:
            pixels: (B, 3, H, W) float, resized and normalised the reference way, padded
                bottom/right to a common size.
            input_ids: (B, n) token ids, n <= config.max_text_len.
            token_mask: (B, n) bool, True on real tokens (the tokenizer's attention mask).
            padding_mask: (B, H, W) bool, True on padded pixels; None when nothing is padded.
            text_masks: see `ground`.
            return_aux: also return the earlier decoder layers' and the encoder's outputs.
        """
        return self.ground(
            self.encode_image(pixels, padding_mask),
            input_ids,
            token_mask,
            text_masks=text_masks,
            return_aux=return_aux,
        )

    def encode_image(self, pixels: Tensor, padding_mask: Tensor | None = None) -> ImageFeatures:
        """Backbone, input projections and position embeddings (reusable across captions)."""
        sizes = _valid_sizes(pixels, padding_mask)
        levels = self._project_levels(pixels, sizes)
        batch = pixels.shape[0]
        hidden = self.config.hidden_dim
        tokens, positions, masks, shapes, ratios = [], [], [], [], []
        for level, maps in enumerate(levels):
            height = max(m.shape[-2] for m in maps)
            width = max(m.shape[-1] for m in maps)
            # (B, C, H_l, W_l), zero outside each image's own map
            padded = torch.stack(
                [F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in maps]
            )
            mask = torch.ones(batch, height, width, dtype=torch.bool, device=pixels.device)
            for index, m in enumerate(maps):
                mask[index, : m.shape[-2], : m.shape[-1]] = False
            position = sine_position_embedding(mask, hidden // 2, self.config.position_temperature)
            tokens.append(padded.flatten(2).transpose(1, 2))  # (B, H_l*W_l, C)
            position = position.to(padded.dtype).flatten(2).transpose(1, 2)
            positions.append(position + self.level_embed[level].view(1, 1, -1))
            masks.append(mask.flatten(1))
            shapes.append((height, width))
            ratios.append([[m.shape[-1] / width, m.shape[-2] / height] for m in maps])
        padded_any = any(
            m.shape[-2:] != (h, w)
            for maps, (h, w) in zip(levels, shapes, strict=True)
            for m in maps
        )
        return ImageFeatures(
            tokens=torch.cat(tokens, 1),
            position=torch.cat(positions, 1),
            padding_mask=torch.cat(masks, 1) if padded_any else None,
            spatial_shapes=shapes,
            # (B, L, 2)
            valid_ratios=host_tensor(list(zip(*ratios, strict=True)), torch.float32, pixels.device),
        )

    def _project_levels(self, pixels: Tensor, sizes: list[tuple[int, int]]) -> list[list[Tensor]]:
        """Per level, each image's (C, H_l, W_l) projected map, computed on unpadded pixels."""
        levels: list[list[Tensor | None]] = [
            [None] * len(sizes) for _ in range(self.config.num_feature_levels)
        ]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(size, []).append(index)
        for (height, width), indices in groups.items():
            crop = pixels[indices, :, :height, :width]
            features = self.backbone(crop)
            maps = [proj(f) for proj, f in zip(self.input_proj, features, strict=False)]
            source = features[-1]
            for proj in self.input_proj[len(features) :]:
                source = proj(source)
                maps.append(source)
            for level, level_maps in enumerate(maps):
                for position, index in enumerate(indices):
                    levels[level][index] = level_maps[position]
        # Every slot is filled: each image index is in exactly one size group.
        return cast(list[list[Tensor]], levels)

    def ground(
        self,
        image: ImageFeatures,
        input_ids: Tensor,
        token_mask: Tensor,
        *,
        text_masks: tuple[Tensor, Tensor] | None = None,
        return_aux: bool = False,
    ) -> GroundingOutput:
        """Everything after the image encoder, for one batch of captions.

        Args:
            text_masks: the sub-sentence attention mask (B, n, n) bool (True = may attend) and
                position ids (B, n); computed from `input_ids` with bert-base-uncased's special
                tokens when None.
        """
        config = self.config
        if input_ids.shape[1] > config.max_text_len:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed max_text_len "
                f"{config.max_text_len}; truncate or split the caption first"
            )
        token_mask = token_mask.bool()
        if text_masks is None:
            text_masks = sub_sentence_masks(input_ids, token_mask, BERT_SPECIAL_TOKEN_IDS)
        attention, position_ids = text_masks
        text = self.text_backbone(input_ids, attention, position_ids)
        vision, text = self.feature_enhancer(
            image.tokens,
            image.position,
            image.spatial_shapes,
            image.valid_ratios,
            image.padding_mask,
            text,
            token_mask,
            attention,
            position_ids,
        )
        selection = self.query_selection(
            vision, image.padding_mask, image.spatial_shapes, text, token_mask
        )
        hidden, references = self.decoder(
            selection.target,
            selection.reference_boxes,
            vision,
            image.padding_mask,
            image.spatial_shapes,
            image.valid_ratios,
            text,
            token_mask,
            self.bbox_embed,
        )
        layers = range(len(hidden)) if return_aux else [len(hidden) - 1]
        boxes = [
            (self.bbox_embed(hidden[i]) + inverse_sigmoid(references[i])).sigmoid() for i in layers
        ]
        logits = [self.class_head(hidden[i], text, token_mask) for i in layers]
        if not return_aux:
            return GroundingOutput(
                logits=logits[-1], boxes=boxes[-1], query_indices=selection.topk_indices
            )
        return GroundingOutput(
            logits=logits[-1],
            boxes=boxes[-1],
            query_indices=selection.topk_indices,
            aux_logits=logits[:-1],
            aux_boxes=boxes[:-1],
            encoder_logits=selection.encoder_logits,
            encoder_boxes=selection.encoder_boxes,
        )


def _valid_sizes(pixels: Tensor, padding_mask: Tensor | None) -> list[tuple[int, int]]:
    """Each image's unpadded (H, W); one host sync, and only when a padding mask is given."""
    batch, _, height, width = pixels.shape
    if padding_mask is None:
        return [(height, width)] * batch
    if padding_mask.shape != (batch, height, width):
        raise ValueError(
            f"padding_mask has shape {tuple(padding_mask.shape)}, expected {(batch, height, width)}"
        )
    valid = ~padding_mask.bool()
    heights = valid.any(2).sum(1)
    widths = valid.any(1).sum(1)
    sizes = torch.stack([heights, widths], 1).tolist()
    if any(h == 0 or w == 0 for h, w in sizes):
        raise ValueError("padding_mask leaves an image with no pixels")
    return [(int(h), int(w)) for h, w in sizes]


def build_model(config: GroundingDINOConfig) -> GroundingDINO:
    """A randomly initialised detector for `config` (weights come from a checkpoint loader)."""
    return GroundingDINO(
        config,
        backbone=ImageBackbone(config.backbone),
        text_backbone=TextBackbone(config),
        feature_enhancer=FeatureEnhancer(config),
        query_selection=QuerySelection(config),
        decoder=CrossModalityDecoder(config),
    )
