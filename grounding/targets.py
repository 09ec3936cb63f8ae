"""What training compares the detector's outputs with (paper §3.5): boxes and their phrases' tokens.

One `DetectionTarget` per image. A box is supervised on the tokens of the phrase that names it
(the GLIP / Grounding DINO "positive map"), not on a class index: the same category can sit at
different token positions in different captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DetectionTarget:
    """The ground truth of one image for one caption.

    Attributes:
        boxes: (n, 4) float32, cx, cy, w, h normalised to the unpadded (resized) image, in [0, 1].
        positive_map: (n, max_text_len) bool, True on the caption tokens of box i's phrase
            (never on [CLS], [SEP], "." or padding).
        category_ids: (n,) int64, the dataset's category id of each box (for evaluation).
    """

    boxes: Tensor
    positive_map: Tensor
    category_ids: Tensor

    def __post_init__(self) -> None:
        count = self.boxes.shape[0]
        if self.boxes.shape != (count, 4):
            raise ValueError(f"boxes must be (n, 4), got {tuple(self.boxes.shape)}")
        if self.positive_map.ndim != 2 or self.positive_map.shape[0] != count:
            raise ValueError(
                f"positive_map must be (n, max_text_len) with n = {count}, "
                f"got {tuple(self.positive_map.shape)}"
            )
        if self.category_ids.shape != (count,):
            raise ValueError(
                f"category_ids must be (n,) with n = {count}, got {tuple(self.category_ids.shape)}"
            )

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def to(self, device: torch.device | str) -> DetectionTarget:
        return DetectionTarget(
            self.boxes.to(device), self.positive_map.to(device), self.category_ids.to(device)
        )
