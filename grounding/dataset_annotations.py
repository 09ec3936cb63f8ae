"""COCO annotation files, checked: usable categories, images and boxes of a detection set.

`grounding.dataset` builds its training samples from these records; `grounding.evaluate_metrics`
checks its ground truth with `annotation_problem`. Nothing here raises on a malformed entry (except
a file without any usable category): each problem is described in a list that the caller logs, and
the entry is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np

# Boxes this small (pixels, either side) after clipping carry no signal and break GIoU.
MIN_BOX_SIDE = 1.0


@dataclass
class ImageRecord:
    """One image's usable annotations.

    Attributes:
        image_id: the COCO image id.
        file_name: path relative to the image folder.
        size: (width, height) from the annotation file, or None when it has none.
        boxes: (n, 4) float32, x0, y0, x1, y1 in pixels (clipped when `size` is known).
        category_ids: (n,) int64.
    """

    image_id: int
    file_name: str
    size: tuple[int, int] | None
    boxes: np.ndarray
    category_ids: np.ndarray


def large_enough(boxes: np.ndarray) -> np.ndarray:
    """(n,) bool: both sides of the x0, y0, x1, y1 boxes exceed `MIN_BOX_SIDE`."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return (widths > MIN_BOX_SIDE) & (heights > MIN_BOX_SIDE)


def read_categories(entries: list, problems: list[str]) -> dict[int, str]:
    """Category id -> name, in id order; malformed or repeated entries reported and skipped."""
    categories: dict[int, str] = {}
    for entry in entries:
        cid = entry.get("id") if isinstance(entry, dict) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if not _is_int(cid) or not isinstance(name, str) or not name.strip():
            problems.append(f"skipping malformed category {entry!r}")
        elif cid in categories:
            problems.append(f"skipping repeated category id {cid} ({name!r})")
        else:
            categories[cid] = name
    if not categories:
        raise ValueError("the annotation file has no usable categories")
    return dict(sorted(categories.items()))


def read_records(coco: dict, category_ids: set[int], problems: list[str]) -> list[ImageRecord]:
    """One record per usable image, in image id order, with its usable boxes."""
    images: dict[int, tuple[str, tuple[int, int] | None]] = {}
    for entry in coco.get("images", []):
        image_id = entry.get("id") if isinstance(entry, dict) else None
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if not _is_int(image_id) or not isinstance(file_name, str) or image_id in images:
            problems.append(f"skipping malformed or repeated image {entry!r}")
            continue
        width, height = entry.get("width"), entry.get("height")
        size = (
            (width, height)
            if _is_int(width) and _is_int(height) and width > 0 and height > 0
            else None
        )
        images[image_id] = (file_name, size)

    boxes: dict[int, list[list[float]]] = {image_id: [] for image_id in images}
    labels: dict[int, list[int]] = {image_id: [] for image_id in images}
    for annotation in coco.get("annotations", []):
        problem = annotation_problem(annotation, images, category_ids)
        if problem:
            problems.append(problem)
            continue
        if annotation.get("iscrowd", 0):
            continue
        x, y, w, h = (float(value) for value in annotation["bbox"])
        box = [x, y, x + w, y + h]
        size = images[annotation["image_id"]][1]
        if size is not None:
            box = [
                min(max(box[0], 0.0), size[0]),
                min(max(box[1], 0.0), size[1]),
                min(max(box[2], 0.0), size[0]),
                min(max(box[3], 0.0), size[1]),
            ]
        boxes[annotation["image_id"]].append(box)
        labels[annotation["image_id"]].append(annotation["category_id"])

    records = []
    for image_id in sorted(images):
        image_boxes = np.asarray(boxes[image_id], dtype=np.float32).reshape(-1, 4)
        image_labels = np.asarray(labels[image_id], dtype=np.int64)
        keep = large_enough(image_boxes)
        records.append(
            ImageRecord(
                image_id,
                images[image_id][0],
                images[image_id][1],
                image_boxes[keep],
                image_labels[keep],
            )
        )
    return records


def annotation_problem(
    annotation,
    image_ids: Container[int],
    category_ids: Container[int],
) -> str | None:
    """Why an annotation cannot be used (unknown image or category, bad bbox), or None."""
    if not isinstance(annotation, dict):
        return f"skipping malformed annotation {annotation!r}"
    name = f"annotation {annotation.get('id', '?')}"
    if annotation.get("image_id") not in image_ids:
        return f"skipping {name}: unknown image id {annotation.get('image_id')!r}"
    if annotation.get("category_id") not in category_ids:
        return f"skipping {name}: unknown category id {annotation.get('category_id')!r}"
    bbox = annotation.get("bbox")
    if (
        not isinstance(bbox, list | tuple)
        or len(bbox) != 4
        or not all(
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            for value in bbox
        )
        or bbox[2] < 0
        or bbox[3] < 0
    ):
        return f"skipping {name}: bad bbox {bbox!r} (expected x, y, width, height >= 0)"
    return None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
