"""Box geometry shared by the heads, the decoder's box refinement and the training losses.

Boxes are `(cx, cy, w, h)` or `(x0, y0, x1, y1)` in the last dimension, usually normalised to
[0, 1] relative to the unpadded image. The conversions follow DETR's `util/box_ops.py`; GIoU is
torchvision's. `inverse_sigmoid` is the reference's `util/misc.py:704` version (eps 1e-3).
"""

from __future__ import annotations

import torch
from torchvision.ops import generalized_box_iou as _torchvision_generalized_box_iou


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """`(..., 4)` centre/size boxes to corner boxes `(..., 4)`, same dtype."""
    center_x, center_y, width, height = boxes.unbind(-1)
    return torch.stack(
        [
            center_x - 0.5 * width,
            center_y - 0.5 * height,
            center_x + 0.5 * width,
            center_y + 0.5 * height,
        ],
        dim=-1,
    )


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """`(..., 4)` corner boxes to centre/size boxes `(..., 4)`, same dtype."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Logit of `x` clamped to [0, 1], with both `x` and `1 - x` floored at `eps`.

    The reference's decoder uses eps = 1e-3 (transformers uses `torch.special.logit(x, 1e-5)`);
    the two agree for x in [1e-3, 1 - 1e-3]. The result is finite at 0 and 1: +-log(1 / eps).
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU of `(N, 4)` and `(M, 4)` corner boxes (xyxy), shape `(N, M)`.

    Degenerate boxes (x1 < x0 or y1 < y0) give meaningless values; callers convert predictions
    with `box_cxcywh_to_xyxy`, which keeps non-negative sizes well formed.
    """
    return _torchvision_generalized_box_iou(boxes1, boxes2)
