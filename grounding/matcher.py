"""Bipartite matching of queries to ground-truth boxes (paper §3.5).

Each target box is assigned to exactly one query by the Hungarian algorithm on a cost that mixes a
classification term with box terms, as in DETR (`models/matcher.py`). The classification term is
the focal-style token cost of Deformable DETR / GLIP, combined over the tokens of the box's phrase
as Open-GroundingDino does (`models/GroundingDINO/matcher.py`: the token costs times the positive
map, summed). transformers' `GroundingDinoHungarianMatcher` divides the map by its token count (a
mean over the phrase), which makes long phrases cheaper to match; we sum.

Costs are computed image by image: transformers' batched version offsets the label maps by the
previous image's label count instead of a running total, which is wrong for 3+ images.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from grounding.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from grounding.config import LossConfig
from grounding.targets import DetectionTarget

# Stands in for non-finite costs, which `linear_sum_assignment` rejects.
_INVALID_COST = 1e8
# Keeps log() finite at probabilities of exactly 0 or 1 (the -inf logits of missing tokens).
_LOG_EPS = 1e-8


def focal_token_cost(logits: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal-style cost of calling each token positive rather than negative.

    Args:
        logits: (..., T) pre-sigmoid query-token logits; -inf is allowed (probability 0).

    Returns:
        (..., T) float32, `alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))` with
        `p = sigmoid(logits)`: low where a token is already predicted positive.
    """
    probability = logits.float().sigmoid()
    positive = alpha * (1 - probability) ** gamma * -(probability + _LOG_EPS).log()
    negative = (1 - alpha) * probability**gamma * -(1 - probability + _LOG_EPS).log()
    return positive - negative


class HungarianMatcher(nn.Module):
    """One-to-one assignment of each image's target boxes to its queries."""

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config or LossConfig()

    def cost_matrix(self, logits: Tensor, boxes: Tensor, target: DetectionTarget) -> Tensor:
        """Matching cost of every query against every target box of one image.

        Args:
            logits: (Q, T) pre-sigmoid logits, T = max_text_len, -inf on non-caption tokens.
            boxes: (Q, 4) predicted (cx, cy, w, h) in [0, 1].
            target: n boxes with their (n, T) bool positive maps.

        Returns:
            (Q, n) float32 `cost_class * class + cost_l1 * L1 + cost_giou * (-GIoU)`, where the
            class cost is `focal_token_cost` summed over the box's phrase tokens, L1 is on
            (cx, cy, w, h) and GIoU on corner boxes. Non-finite entries are replaced by 1e8.
        """
        config = self.config
        if target.positive_map.shape[1] != logits.shape[1]:
            raise ValueError(
                f"positive_map has {target.positive_map.shape[1]} token columns, "
                f"logits have {logits.shape[1]}"
            )
        token_cost = focal_token_cost(logits, config.focal_alpha, config.focal_gamma)  # (Q, T)
        positive_map = target.positive_map.to(token_cost)  # (n, T) float
        class_cost = token_cost @ positive_map.T  # (Q, n)
        boxes = boxes.float()
        target_boxes = target.boxes.to(boxes)
        l1_cost = torch.cdist(boxes, target_boxes, p=1)  # (Q, n)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
        cost = config.cost_class * class_cost + config.cost_l1 * l1_cost - config.cost_giou * giou
        return torch.nan_to_num(cost, nan=_INVALID_COST, posinf=_INVALID_COST, neginf=_INVALID_COST)

    @torch.no_grad()
    def forward(
        self, logits: Tensor, boxes: Tensor, targets: list[DetectionTarget]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            logits: (B, Q, T) pre-sigmoid query-token logits, T = max_text_len, -inf on padding
                and beyond the caption.
            boxes: (B, Q, 4) predicted (cx, cy, w, h), sigmoid outputs in [0, 1].
            targets: B per-image targets; positive maps have T columns.

        Returns:
            Per image, `(query_indices, target_indices)`: int64 tensors of length
            `min(Q, n_b)` on the logits' device, query indices ascending; query
            `query_indices[k]` predicts target box `target_indices[k]`. Empty for n_b = 0.
        """
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]}")
        matches = []
        for image_logits, image_boxes, target in zip(logits, boxes, targets, strict=True):
            if len(target) == 0:
                empty = torch.empty(0, dtype=torch.int64, device=logits.device)
                matches.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(image_logits, image_boxes, target).cpu()
            query_indices, target_indices = linear_sum_assignment(cost.numpy())
            matches.append(
                (
                    torch.as_tensor(query_indices, dtype=torch.int64, device=logits.device),
                    torch.as_tensor(target_indices, dtype=torch.int64, device=logits.device),
                )
            )
        return matches
