"""What `GroundedSAM.run` answers: `SegmentedDetections`, or `CacheMiss` when told not to run a
model. Plain data, importable without the pipeline's threads and caches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class CacheMiss(LookupError):
    """`GroundedSAM.run(..., cache_only=True)` would have had to run a model."""


@dataclass
class SegmentedDetections:
    """Detections in one image, each with a mask.

    Attributes:
        boxes: (N, 4) float32, x0, y0, x1, y1 in the image's pixels.
        scores: (N,) float32, the detector's box score (max token probability), descending.
        phrases: N labels, each drawn from one phrase of the prompt.
        phrase_ids: (N,) int64, index of each label's phrase in `prompt_phrases`.
        prompt_phrases: the prompt's phrases, in order.
        masks: (N, H, W) bool at the image's resolution, True = object; mask i belongs to box i.
        mask_scores: (N,) float32, SAM's predicted IoU of each mask.
        omitted: detections above the box threshold left out by `max_detections` (the lowest
            scoring ones).
    """

    boxes: np.ndarray
    scores: np.ndarray
    phrases: list[str]
    phrase_ids: np.ndarray
    prompt_phrases: list[str]
    masks: np.ndarray
    mask_scores: np.ndarray
    omitted: int = 0

    def __len__(self) -> int:
        return len(self.phrases)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the image the masks cover."""
        return self.masks.shape[2], self.masks.shape[1]
