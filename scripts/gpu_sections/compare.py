"""Comparisons of two runs' outputs (detector queries, detections, SAM embeddings and masks) and
the runs they compare: a detect() output as raw predictions, SAM's embed + segment, a first
GroundedSAM.run."""

from __future__ import annotations

import numpy as np
import torch

from gpu_sections.context import AUTOCAST_MARGIN, BOXES, CAPTION, TEXT_THRESHOLD, Context
from grounding.predictor import Detector, RawPrediction
from segmentation.pipeline import GroundedSAM, LookAhead
from segmentation.sam import BoxSegmenter


def compare_detector(a, b, n_tokens: int) -> dict:
    """Two GroundingOutputs of one image: queries paired by slot where both selected the same
    image cell there. Returns the share of such slots, the share of cells both selected, the
    largest box difference and the largest logit difference relative to 1 + the row's largest
    |logit| (over the caption's tokens), and whether `a` has non-finite caption logits."""
    cells_a, cells_b = a.query_indices[0].cpu(), b.query_indices[0].cpu()
    same = cells_a == cells_b
    boxes_a, boxes_b = a.boxes[0].float().cpu()[same], b.boxes[0].float().cpu()[same]
    logits_a = a.logits[0, :, :n_tokens].float().cpu()[same]
    logits_b = b.logits[0, :, :n_tokens].float().cpu()[same]
    scale = 1 + logits_b.abs().amax(-1, keepdim=True)
    return {
        "same_slot": float(same.float().mean()),
        "same_cells": len(set(cells_a.tolist()) & set(cells_b.tolist())) / len(cells_a),
        "boxes_max_abs": float((boxes_a - boxes_b).abs().max()) if len(boxes_a) else float("nan"),
        "logits_max_rel": (float(((logits_a - logits_b).abs() / scale).max())
                           if len(logits_a) else float("nan")),
        "non_finite": int((~torch.isfinite(a.logits[0, :, :n_tokens].float())).sum()),
    }


def describe_detector(d: dict) -> str:
    return (f"boxes {d['boxes_max_abs']:.1e}, logits {d['logits_max_rel']:.1e} rel; "
            f"{d['same_slot']:.1%} queries same slot, {d['same_cells']:.1%} same cells"
            + (f"; {d['non_finite']} non-finite logits" if d["non_finite"] else ""))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per mask IoU of two (N, H, W) bool stacks (1 where both are empty)."""
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of x0, y0, x1, y1 boxes."""
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], 1), np.prod(b[:, 2:] - b[:, :2], 1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def found_share(a, b) -> tuple[int, int]:
    """How many of Detections `a` have a match in `b` (greedy, best score first: same phrase,
    box IoU >= 0.9, each of b used once), and len(a)."""
    if len(a) == 0 or len(b) == 0:
        return 0, len(a)
    iou = box_iou(a.boxes, b.boxes)
    iou[a.phrase_ids[:, None] != b.phrase_ids[None, :]] = 0.0
    free, found = np.ones(len(b), dtype=bool), 0
    for row in iou:
        candidates = np.flatnonzero((row >= 0.9) & free)
        if len(candidates):
            free[candidates[np.argmax(row[candidates])]] = False
            found += 1
    return found, len(a)


def compare_detections(detector: Detector, ref_raw: RawPrediction, raw: RawPrediction,
                       threshold: float) -> dict:
    """Detections of two runs at `threshold`: how many each keeps, and how many of the clear
    ones (score above threshold + AUTOCAST_MARGIN) the other run finds above threshold -
    AUTOCAST_MARGIN, both ways."""
    def select(prediction, at):
        return detector.select(prediction, min(1.0, max(0.0, at)), TEXT_THRESHOLD)

    high, low = threshold + AUTOCAST_MARGIN, threshold - AUTOCAST_MARGIN
    ref_found, ref_clear = found_share(select(ref_raw, high), select(raw, low))
    found, clear = found_share(select(raw, high), select(ref_raw, low))
    return {"kept": (len(select(ref_raw, threshold)), len(select(raw, threshold))),
            "reference_clear_found": (ref_found, ref_clear), "clear_found": (found, clear),
            "share": min(ref_found / ref_clear if ref_clear else 1.0,
                         found / clear if clear else 1.0)}


def raw_prediction(ctx: Context, output) -> RawPrediction:
    """A detect() output as `Detector.select` takes it (CAPTION is already normalised)."""
    ids = ctx.detector.caption_tokens(CAPTION)
    height, width = ctx.image.shape[:2]
    return RawPrediction([(ids, output.logits[0].float().cpu(), output.boxes[0].float().cpu())],
                         (width, height))


def sam_outputs(segmenter: BoxSegmenter, image: np.ndarray, boxes: np.ndarray):
    embedding = segmenter.embed(image)
    masks, scores = segmenter.segment(boxes)
    return embedding.features, masks, scores


def fresh_run(ctx: Context, segmenter: BoxSegmenter):
    """A first GroundedSAM.run (nothing cached): BOXES detections, box threshold 0."""
    return GroundedSAM(ctx.detector, segmenter, look_ahead=LookAhead.off()).run(
        ctx.image, CAPTION, box_threshold=0.0, text_threshold=TEXT_THRESHOLD,
        max_detections=BOXES)
