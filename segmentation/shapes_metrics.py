"""Detection and mask metrics of Grounded SAM on the synthetic shapes (`grounding.shapes_data`).

Pure functions over one image's detections and ground truth, and a tally over a data set; the
models are run by `scripts/evaluate_shapes.py`.

Matching (`match_detections`), as COCOeval's at one IoU threshold but with the label checked as a
string: detections are taken best score first, and each claims the unclaimed ground-truth object
with the highest box IoU among those with IoU >= 0.5 whose category name equals the detection's
phrase. A claim is a true positive; an unclaiming detection a false positive; an unclaimed object a
false negative. So recall = TP / objects and precision = TP / detections.

Each false positive gets one kind, from the ground-truth object its box overlaps most:
- "duplicate": IoU >= 0.5 with an object of its own phrase (claimed by a better detection);
- "wrong_colour", "wrong_shape", "both_wrong": IoU >= 0.5 with an object of another category,
  and the phrase names a colour and a shape, of which these are wrong;
- "partial_label": IoU >= 0.5 with an object of another category, but the phrase is not one
  colour and one shape (the label keeps only the tokens above the text threshold, e.g. "red");
- "no_overlap": IoU < 0.5 with every object (background, or a badly placed box).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from grounding.shapes_categories import CATEGORIES, COLOURS, SHAPES

IOU_THRESHOLD = 0.5
CONFUSION_KINDS = ("wrong_colour", "wrong_shape", "both_wrong")
FALSE_POSITIVE_KINDS = ("duplicate", *CONFUSION_KINDS, "partial_label", "no_overlap")


def box_iou(boxes: np.ndarray, other: np.ndarray) -> np.ndarray:
    """(N, M) float64 IoU of (N, 4) and (M, 4) boxes x0, y0, x1, y1 (0 where a union is empty)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    other = np.asarray(other, np.float64).reshape(-1, 4)
    top_left = np.maximum(boxes[:, None, :2], other[None, :, :2])  # (N, M, 2)
    bottom_right = np.minimum(boxes[:, None, 2:], other[None, :, 2:])  # (N, M, 2)
    intersection = np.clip(bottom_right - top_left, 0.0, None).prod(axis=2)  # (N, M)
    area = np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None).prod(axis=1)  # (N,)
    other_area = np.clip(other[:, 2:] - other[:, :2], 0.0, None).prod(axis=1)  # (M,)
    union = area[:, None] + other_area[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N,) float64 IoU of paired (N, H, W) bool masks (True = object); 1 where both are empty,
    as `segmentation.sam_losses.mask_iou`."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"masks {predicted.shape} and {truth.shape} differ in shape")
    pixels = int(np.prod(predicted.shape[1:]))
    predicted = predicted.reshape(len(predicted), pixels)  # (N, H * W)
    truth = truth.reshape(len(truth), pixels)
    intersection = (predicted & truth).sum(axis=1).astype(np.float64)
    union = (predicted | truth).sum(axis=1).astype(np.float64)
    return np.divide(intersection, union, out=np.ones_like(union), where=union > 0)


def confusion_kind(phrase: str, truth_name: str) -> str:
    """How `phrase` mislabels an object of category `truth_name` ("blue circle"): one of
    `CONFUSION_KINDS`, or "partial_label" when the phrase is not one colour and one shape."""
    words = phrase.split()
    colours = [word for word in words if word in COLOURS]
    shapes = [word for word in words if word in SHAPES]
    if len(words) != 2 or len(colours) != 1 or len(shapes) != 1:
        return "partial_label"
    truth_colour, truth_shape = truth_name.split()
    colour_right, shape_right = colours[0] == truth_colour, shapes[0] == truth_shape
    if shape_right and not colour_right:
        return "wrong_colour"
    if colour_right and not shape_right:
        return "wrong_shape"
    if not (colour_right or shape_right):
        return "both_wrong"
    return "partial_label"  # same words, other order: not a category name


@dataclass
class ImageMatch:
    """One image's matching.

    Attributes:
        pairs: (detection index, object index) of each true positive, best detection first.
        false_positives: detection index -> its kind (one of `FALSE_POSITIVE_KINDS`).
        false_negatives: indices of the objects no detection claimed.
    """

    pairs: list[tuple[int, int]]
    false_positives: dict[int, str]
    false_negatives: list[int]


def match_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    phrases: Sequence[str],
    truth_boxes: np.ndarray,
    truth_names: Sequence[str],
    *,
    iou_threshold: float = IOU_THRESHOLD,
) -> ImageMatch:
    """Greedy matching by score of detections to objects (see the module docstring).

    Args:
        boxes: (N, 4) detections, x0, y0, x1, y1 in pixels.
        scores: (N,) their scores; ties keep the given order.
        phrases: the N detections' labels.
        truth_boxes: (M, 4) objects, x0, y0, x1, y1 in the same pixels.
        truth_names: the M objects' category names.
        iou_threshold: the least box IoU of a match (and of a "duplicate" or a confusion).
    """
    if not len(boxes) == len(scores) == len(phrases):
        raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores, {len(phrases)} phrases")
    if len(truth_boxes) != len(truth_names):
        raise ValueError(f"{len(truth_boxes)} object boxes but {len(truth_names)} names")
    ious = box_iou(boxes, truth_boxes)  # (N, M)
    claimed = np.zeros(len(truth_names), bool)
    pairs: list[tuple[int, int]] = []
    false_positives: dict[int, str] = {}
    for detection in np.argsort(-np.asarray(scores, np.float64), kind="stable").tolist():
        candidates = ious[detection].copy()  # (M,)
        same_name = np.array([name == phrases[detection] for name in truth_names], bool)
        candidates[claimed | ~same_name] = -1.0
        if len(candidates) and candidates.max() >= iou_threshold:
            best = int(candidates.argmax())
            claimed[best] = True
            pairs.append((detection, best))
            continue
        nearest = int(ious[detection].argmax()) if len(truth_names) else -1
        if nearest < 0 or ious[detection, nearest] < iou_threshold:
            false_positives[detection] = "no_overlap"
        elif truth_names[nearest] == phrases[detection]:
            false_positives[detection] = "duplicate"
        else:
            false_positives[detection] = confusion_kind(phrases[detection], truth_names[nearest])
    return ImageMatch(pairs, false_positives, np.flatnonzero(~claimed).tolist())


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


@dataclass
class MatchTally:
    """Counts over many images: `add` each image's match, then `summary`."""

    objects: Counter = field(default_factory=Counter)  # category name -> objects
    true_positives: Counter = field(default_factory=Counter)  # category name -> claimed objects
    detections: Counter = field(default_factory=Counter)  # phrase -> detections
    false_positive_kinds: Counter = field(default_factory=Counter)
    mask_ious: list[float] = field(default_factory=list)
    images: int = 0

    def add(
        self,
        match: ImageMatch,
        phrases: Sequence[str],
        truth_names: Sequence[str],
        mask_ious: Sequence[float] = (),
    ) -> None:
        """Count one image.

        Args:
            match: `match_detections` of `phrases` against `truth_names`.
            mask_ious: the mask IoU of each of `match.pairs`, in order (none: no mask metric).
        """
        if len(mask_ious) not in (0, len(match.pairs)):
            raise ValueError(f"{len(mask_ious)} mask IoUs for {len(match.pairs)} matches")
        self.images += 1
        self.objects.update(truth_names)
        self.detections.update(phrases)
        self.true_positives.update(truth_names[index] for _, index in match.pairs)
        self.false_positive_kinds.update(match.false_positives.values())
        self.mask_ious.extend(float(value) for value in mask_ious)

    def summary(self) -> dict:
        """Totals, recall and precision (None without objects or detections), mean mask IoU over
        the true positives (None without any), false positives by kind, and per category."""
        objects, detections = sum(self.objects.values()), sum(self.detections.values())
        true_positives = sum(self.true_positives.values())
        per_category = {
            name: {
                "objects": self.objects[name],
                "detections": self.detections[name],
                "true_positives": self.true_positives[name],
                "recall": _ratio(self.true_positives[name], self.objects[name]),
                "precision": _ratio(self.true_positives[name], self.detections[name]),
            }
            for name in CATEGORIES
        }
        return {
            "images": self.images,
            "objects": objects,
            "detections": detections,
            "true_positives": true_positives,
            "false_positives": detections - true_positives,
            "false_negatives": objects - true_positives,
            "recall": _ratio(true_positives, objects),
            "precision": _ratio(true_positives, detections),
            "mean_mask_iou": float(np.mean(self.mask_ious)) if self.mask_ious else None,
            "masks": len(self.mask_ious),
            "false_positive_kinds": {
                kind: self.false_positive_kinds[kind] for kind in FALSE_POSITIVE_KINDS
            },
            "per_category": per_category,
        }
