"""SAM's training objective for one mask per box (Kirillov et al., arXiv 2304.02643, §3, App. A).

"We supervise mask prediction with a linear combination of focal loss and dice loss ... in a 20:1
ratio of focal loss to dice loss". The IoU prediction head "is trained using mean-square-error loss
between the IoU prediction and the predicted mask's IoU with the ground truth mask. It is added to
the mask loss with a constant scaling factor of 1.0."

Conventions (ours, the paper leaves them open):
- Every term is computed per mask and then averaged over the masks, so an object counts the same
  whatever its size. Focal loss is a mean over a mask's pixels (as DETR's `sigmoid_focal_loss`),
  with torchvision's defaults alpha = 0.25, gamma = 2.
- Only pixels where `valid_mask` is True count: the padding that brings the resized image to the
  encoder's square input is left out (inference crops it away).
- Dice is 1 - (2 |P ∩ T| + 1) / (|P| + |T| + 1) on probabilities (DETR's smoothing of 1).
- The IoU target is that of the binarised prediction (logits > 0, `Sam.mask_threshold`), without
  gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss


@dataclass(frozen=True)
class LossWeights:
    """The weights of the loss terms (the paper's 20 : 1 : 1)."""

    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0


def focal_loss(
    logits: Tensor, targets: Tensor, valid_mask: Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Sigmoid focal loss, averaged over each mask's valid pixels.

    Args:
        logits: (M, H, W) float mask logits.
        targets: (M, H, W) bool or float in [0, 1] (True / 1 = object).
        valid_mask: (M, H, W) bool, True where the pixel counts (False = padding).

    Returns:
        (M,) float, one loss per mask.
    """
    per_pixel = sigmoid_focal_loss(
        logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none"
    )
    valid = valid_mask.to(logits.dtype)
    return (per_pixel * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1.0)


def dice_loss(logits: Tensor, targets: Tensor, valid_mask: Tensor) -> Tensor:
    """1 - soft Dice coefficient of sigmoid(logits) and the targets, over valid pixels.

    Args:
        logits: (M, H, W) float mask logits.
        targets: (M, H, W) bool or float in [0, 1].
        valid_mask: (M, H, W) bool, True where the pixel counts.

    Returns:
        (M,) float, one loss per mask.
    """
    valid = valid_mask.to(logits.dtype)
    probabilities = (logits.sigmoid() * valid).flatten(1)
    targets = (targets.to(logits.dtype) * valid).flatten(1)
    numerator = 2 * (probabilities * targets).sum(1)
    denominator = probabilities.sum(1) + targets.sum(1)
    return 1 - (numerator + 1) / (denominator + 1)


def mask_iou(predicted: Tensor, targets: Tensor, valid_mask: Tensor | None = None) -> Tensor:
    """Intersection over union of binary masks; 1.0 where both are empty.

    Args:
        predicted: (M, H, W) bool.
        targets: (M, H, W) bool.
        valid_mask: (M, H, W) bool or None (every pixel counts).

    Returns:
        (M,) float32.
    """
    if valid_mask is not None:
        predicted, targets = predicted & valid_mask, targets & valid_mask
    intersection = (predicted & targets).flatten(1).sum(1).float()
    union = (predicted | targets).flatten(1).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1.0), torch.ones_like(union))


def sam_loss(
    logits: Tensor,
    iou_predictions: Tensor,
    targets: Tensor,
    valid_mask: Tensor,
    weights: LossWeights = LossWeights(),
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted total and its terms for a batch of masks (one per box prompt).

    Args:
        logits: (M, H, W) float, the mask decoder's logits upscaled to the target resolution.
        iou_predictions: (M,) float, the IoU head's outputs for those masks.
        targets: (M, H, W) bool ground-truth masks (True = object).
        valid_mask: (M, H, W) bool, True inside the image (False = padding).
        weights: the terms' weights.

    Returns:
        the scalar total, and the unweighted means "focal", "dice", "iou_mse" and the
        (gradient-free) "mask_iou" of the binarised predictions.
    """
    targets = targets.bool()
    focal = focal_loss(logits, targets, valid_mask).mean()
    dice = dice_loss(logits, targets, valid_mask).mean()
    with torch.no_grad():
        actual_iou = mask_iou(logits > 0, targets, valid_mask)
    iou_mse = torch.nn.functional.mse_loss(iou_predictions.float(), actual_iou)
    total = weights.focal * focal + weights.dice * dice + weights.iou * iou_mse
    return total, {"focal": focal, "dice": dice, "iou_mse": iou_mse, "mask_iou": actual_iou.mean()}
