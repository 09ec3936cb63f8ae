"""COCO evaluation, the metrics: box AP of COCO-format detections with pycocotools' COCOeval.

COCOeval (bbox) runs with its defaults (at most 100 detections per image and category). The
detections come from `grounding.evaluate_inference`; `grounding.evaluate` is the command line.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence

from grounding.dataset_annotations import annotation_problem

logger = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def read_annotations(annotations: str | os.PathLike | dict) -> dict:
    """A COCO annotation dict from a path or a dict (which is returned as is)."""
    if isinstance(annotations, dict):
        return annotations
    with open(annotations, encoding="utf-8") as handle:
        return json.load(handle)


def evaluate_predictions(
    annotations: str | os.PathLike | dict,
    results: Sequence[dict],
    image_ids: Sequence[int] | None = None,
) -> dict:
    """COCO box AP of `results` against the ground truth.

    Args:
        annotations: COCO JSON path or dict. Annotations without `area` or `iscrowd` get w * h
            and 0; malformed ones are reported and left out.
        results: COCO results ({"image_id", "category_id", "bbox" x, y, w, h, "score"});
            may be empty (every AP is then 0).
        image_ids: evaluate on these images only (default: all of the file's).

    Returns:
        "AP", "AP50", "AP75", "APs", "APm", "APl" and "AR1" ... "ARl" as fractions in [0, 1],
        None where COCOeval has no ground truth (-1); "per_category": [{"category_id", "name",
        "AP"}] (AP None for categories without ground truth in the evaluated images);
        "images" and "detections": how many were evaluated.
    """
    from pycocotools.cocoeval import COCOeval

    ground_truth = _ground_truth(read_annotations(annotations))
    detections = [
        {
            **result,
            "id": index + 1,
            "iscrowd": 0,
            "area": float(result["bbox"][2]) * float(result["bbox"][3]),
        }
        for index, result in enumerate(results)
    ]
    gt = _coco_api(ground_truth)
    dt = _coco_api(
        {
            "images": ground_truth["images"],
            "categories": ground_truth["categories"],
            "annotations": detections,
        }
    )
    evaluation = COCOeval(gt, dt, "bbox")
    if image_ids is not None:
        evaluation.params.imgIds = sorted(int(image_id) for image_id in image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    metrics: dict = {
        key: (None if value < 0 else float(value))
        for key, value in zip(SUMMARY_KEYS, evaluation.stats, strict=True)
    }
    # precision: (iou thresholds, recall thresholds, categories, area ranges, max detections)
    precision = evaluation.eval["precision"]
    names = {category["id"]: category["name"] for category in ground_truth["categories"]}
    per_category = []
    for index, category_id in enumerate(evaluation.params.catIds):
        values = precision[:, :, index, 0, -1]  # area "all", 100 detections
        valid = values[values > -1]
        per_category.append(
            {
                "category_id": int(category_id),
                "name": names[category_id],
                "AP": float(valid.mean()) if valid.size else None,
            }
        )
    metrics["per_category"] = per_category
    metrics["images"] = len(evaluation.params.imgIds)
    metrics["detections"] = len(detections)
    return metrics


def format_metrics(metrics: dict) -> str:
    """The summary and per-category AP as a text table (percentages; "-" for no ground truth)."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    keys = SUMMARY_KEYS[:6]
    lines = [
        "  ".join(f"{key:>6}" for key in keys),
        "  ".join(f"{cell(metrics[key]):>6}" for key in keys),
        "",
    ]
    width = max([len(entry["name"]) for entry in metrics["per_category"]] + [8])
    lines.append(f"{'category':<{width}}  {'AP':>6}")
    lines.extend(
        f"{entry['name']:<{width}}  {cell(entry['AP']):>6}" for entry in metrics["per_category"]
    )
    return "\n".join(lines)


def _ground_truth(coco: dict) -> dict:
    """A copy COCOeval can read: annotations with id, area and iscrowd; malformed ones left out."""
    images = {entry["id"] for entry in coco.get("images", [])}
    category_ids = {entry["id"] for entry in coco.get("categories", [])}
    annotations = []
    for index, annotation in enumerate(coco.get("annotations", [])):
        problem = annotation_problem(annotation, images, category_ids)
        if problem:
            logger.warning("ground truth: %s", problem)
            continue
        x, y, w, h = annotation["bbox"]
        annotations.append(
            {"id": index + 1, "iscrowd": 0, "area": float(w) * float(h), **annotation}
        )
    return {
        "images": coco.get("images", []),
        "categories": coco.get("categories", []),
        "annotations": annotations,
    }


def _coco_api(dataset: dict):
    """A pycocotools COCO object over `dataset` (without its prints)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
