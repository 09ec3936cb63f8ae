"""The training objective (paper §3.5): token focal loss plus L1 and GIoU on matched boxes.

Structure follows DETR's `SetCriterion` (`models/detr.py`): match, then named loss terms, repeated
for every decoder layer and for the encoder's selected proposals. The terms follow
Open-GroundingDino (`models/GroundingDINO/groundingdino.py`, `SetCriterion`):

- classification: sigmoid focal loss over every query x every real caption token, positive on the
  tokens of the matched box's phrase (GLIP's contrastive alignment), summed and divided by the
  number of target boxes in the batch;
- boxes: L1 on (cx, cy, w, h) and 1 - GIoU on corner boxes, over matched pairs, summed and divided
  by the same count.

The encoder term supervises the proposals the decoder starts from (not detached), as
Open-GroundingDino's "interm" loss does; transformers' encoder loss scores the learned target
embedding instead and does not decrease (its own test shows it near 16000 beside about 1 for the
final layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from grounding.box_ops import box_cxcywh_to_xyxy
from grounding.config import LossConfig
from grounding.matcher import HungarianMatcher
from grounding.model import GroundingOutput
from grounding.targets import DetectionTarget


def prediction_sets(
    output: GroundingOutput, *, aux_loss: bool = True, encoder_loss: bool = True
) -> list[tuple[str, Tensor, Tensor]]:
    """The supervised prediction sets of one forward pass, with their loss-name suffixes.

    Returns:
        `(suffix, logits (B, Q, T), boxes (B, Q, 4))`: the final layer with suffix "", earlier
        decoder layer i with `_{i}` (when `output` has them and `aux_loss`), and the encoder's
        selected proposals with `_enc` (when present and `encoder_loss`).
    """
    sets = [("", output.logits, output.boxes)]
    if aux_loss and output.aux_logits is not None and output.aux_boxes is not None:
        sets += [
            (f"_{i}", logits, boxes)
            for i, (logits, boxes) in enumerate(
                zip(output.aux_logits, output.aux_boxes, strict=True)
            )
        ]
    if encoder_loss and output.encoder_logits is not None and output.encoder_boxes is not None:
        sets.append(("_enc", output.encoder_logits, output.encoder_boxes))
    return sets


class SetCriterion(nn.Module):
    """Hungarian-matched losses of every prediction set, weighted and summed."""

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config or LossConfig()
        self.matcher = HungarianMatcher(self.config)
        self.weights = {
            "loss_class": self.config.weight_class,
            "loss_l1": self.config.weight_l1,
            "loss_giou": self.config.weight_giou,
        }

    def forward(
        self, output: GroundingOutput, targets: list[DetectionTarget], token_mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its unweighted terms.

        Args:
            output: the detector's output (`return_aux=True` for the auxiliary and encoder sets).
            targets: B per-image targets on the outputs' device; positive maps have
                T = max_text_len columns.
            token_mask: (B, n) bool, n <= T, True on the caption's real tokens (special tokens
                included), False on padding: the mask given to the model. Columns past n count
                as padding.

        Returns:
            total: scalar, sum over prediction sets of the weighted terms (keeps the graph).
            components: detached scalars `loss_class`, `loss_l1`, `loss_giou`, the same with
                `_0`, `_1`, ... for earlier decoder layers and `_enc` for the encoder.
        """
        batch, _, num_columns = output.logits.shape
        if token_mask.shape[0] != batch or token_mask.shape[1] > num_columns:
            raise ValueError(
                f"token_mask has shape {tuple(token_mask.shape)}, expected "
                f"({batch}, n <= {num_columns})"
            )
        # (B, T) bool, True on real caption tokens
        valid_tokens = F.pad(token_mask.bool(), (0, num_columns - token_mask.shape[1]))
        num_boxes = max(sum(len(target) for target in targets), 1)
        total = output.logits.new_zeros((), dtype=torch.float32)
        components: dict[str, Tensor] = {}
        for suffix, logits, boxes in prediction_sets(
            output, aux_loss=self.config.aux_loss, encoder_loss=self.config.encoder_loss
        ):
            matches = self.matcher(logits, boxes, targets)
            terms = {
                "loss_class": self.class_loss(logits, targets, matches, valid_tokens),
                **self.box_losses(boxes, targets, matches),
            }
            for name, value in terms.items():
                value = value / num_boxes
                total = total + self.weights[name] * value
                components[name + suffix] = value.detach()
        return total, components

    def class_loss(
        self,
        logits: Tensor,
        targets: list[DetectionTarget],
        matches: list[tuple[Tensor, Tensor]],
        valid_tokens: Tensor,
    ) -> Tensor:
        """Summed sigmoid focal loss over the real-token entries of `logits` (B, Q, T).

        Matched queries are positive on their target's phrase tokens, every other entry is
        negative. Only `valid_tokens` (B, T) columns are selected, before the loss, so the -inf
        logits of padding never reach it (nor its gradient).
        """
        labels = torch.zeros_like(logits, dtype=torch.bool)  # (B, Q, T)
        for image, (target, (query_indices, target_indices)) in enumerate(
            zip(targets, matches, strict=True)
        ):
            positive_map = target.positive_map.to(device=logits.device, dtype=torch.bool)
            labels[image, query_indices] = positive_map[target_indices]
        selected = valid_tokens[:, None, :].expand_as(logits)  # (B, Q, T)
        selected_logits = logits[selected].float()  # (K,) with K = Q * sum of real tokens
        if not torch.isfinite(selected_logits).all():
            raise ValueError(
                "non-finite logits on tokens that token_mask marks as real: "
                "pass the token mask that was given to the model"
            )
        return sigmoid_focal_loss(
            selected_logits,
            labels[selected].float(),
            alpha=self.config.focal_alpha,
            gamma=self.config.focal_gamma,
            reduction="sum",
        )

    def box_losses(
        self, boxes: Tensor, targets: list[DetectionTarget], matches: list[tuple[Tensor, Tensor]]
    ) -> dict[str, Tensor]:
        """Summed L1 (cxcywh) and 1 - GIoU (xyxy) over the matched pairs of `boxes` (B, Q, 4)."""
        predicted = torch.cat(
            [
                image_boxes[query_indices]
                for image_boxes, (query_indices, _) in zip(boxes, matches, strict=True)
            ]
        ).float()  # (M, 4)
        expected = torch.cat(
            [
                target.boxes.to(predicted)[target_indices]
                for target, (_, target_indices) in zip(targets, matches, strict=True)
            ]
        )  # (M, 4)
        giou = generalized_box_iou_loss(
            box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(expected), reduction="none"
        )
        # Sums over M = 0 pairs are zeros that still belong to the graph.
        return {"loss_l1": F.l1_loss(predicted, expected, reduction="sum"), "loss_giou": giou.sum()}
