"""The parity section: our detector and SAM in fp32 on the CPU vs the device, TF32 off then on."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from gpu_sections.compare import (
    compare_detector,
    describe_detector,
    mask_ious,
    relative_difference,
    sam_outputs,
)
from gpu_sections.context import (
    CAPTION,
    PARITY_BOX_ATOL,
    PARITY_EMBED_RTOL,
    PARITY_LOGIT_RTOL,
    PARITY_MASK_IOU,
    Context,
    precision,
)
from gpu_sections.report import Report, guarded
from grounding.predictor import Detector
from segmentation.sam import BoxSegmenter


def section_parity(ctx: Context, report: Report, deadline: float) -> None:
    """CPU fp32 (reference) vs the device, TF32 off then on."""
    detector, n_tokens = ctx.detector, ctx.n_tokens()
    cpu = torch.device("cpu")
    cpu_detector = Detector(copy.deepcopy(detector.model).to(cpu), detector.tokenizer, cpu,
                            image_size=detector.image_size, max_size=detector.max_size)
    cpu_segmenter = BoxSegmenter(copy.deepcopy(ctx.our_sam()).to(cpu))  # the CPU blocks
    start = time.perf_counter()
    reference = cpu_detector.detect(ctx.pixels.cpu(), CAPTION)
    ref_features, ref_masks, ref_scores = sam_outputs(cpu_segmenter, ctx.image, ctx.boxes)
    report.data["parity"] = {"cpu_seconds": time.perf_counter() - start}
    del cpu_detector, cpu_segmenter
    segmenter = BoxSegmenter(ctx.our_sam())
    for mode in ("fp32", "tf32"):
        strict = mode == "fp32"
        label = "TF32 off" if strict else "TF32 on"
        with guarded(report, "parity", f"detector CPU vs {ctx.device.type} fp32, {label}"):
            with precision(ctx.device, mode):
                output = detector.detect(ctx.pixels, CAPTION)
            d = compare_detector(output, reference, n_tokens)
            report.data["parity"][f"detector_{mode}"] = d
            ok = (d["boxes_max_abs"] <= PARITY_BOX_ATOL and d["logits_max_rel"] <= PARITY_LOGIT_RTOL
                  and d["same_cells"] >= 0.99 and d["same_slot"] >= 0.95 and not d["non_finite"])
            target = (f"boxes <= {PARITY_BOX_ATOL:.0e}, logits <= {PARITY_LOGIT_RTOL:.0e} rel, "
                      ">= 99% same cells, >= 95% same slot")
            if strict:
                report.check("parity", f"detector CPU vs {ctx.device.type}, {label}",
                             describe_detector(d), target, ok)
            else:
                report.add("parity", f"detector CPU vs {ctx.device.type}, {label}",
                           describe_detector(d), f"(reported) {target}")
        with guarded(report, "parity", f"SAM CPU vs {ctx.device.type} fp32, {label}"):
            with precision(ctx.device, mode):
                features, masks, scores = sam_outputs(segmenter, ctx.image, ctx.boxes)
            embed = relative_difference(features, ref_features)
            ious = mask_ious(masks, ref_masks)
            score_diff = float(np.abs(scores - ref_scores).max())
            report.data["parity"][f"sam_{mode}"] = {"embedding_max_rel": embed,
                                                    "mask_iou": ious.tolist(),
                                                    "iou_score_max_abs": score_diff}
            value = (f"embedding {embed:.1e} rel, mask IoU min {ious.min():.4f} (mean "
                     f"{ious.mean():.4f}), IoU scores {score_diff:.1e}")
            target = f"embedding <= {PARITY_EMBED_RTOL:.0e} rel, mask IoU >= {PARITY_MASK_IOU}"
            if strict:
                report.check("parity", f"SAM CPU vs {ctx.device.type}, {label}", value, target,
                             embed <= PARITY_EMBED_RTOL and ious.min() >= PARITY_MASK_IOU)
            else:
                report.add("parity", f"SAM CPU vs {ctx.device.type}, {label}", value,
                           f"(reported) {target}")
