"""The autocast section: bf16 and fp16 autocast vs fp32 on the device, detector queries and
detections, SAM embedding and masks."""

from __future__ import annotations

import torch

from gpu_sections.compare import (
    compare_detections,
    compare_detector,
    describe_detector,
    mask_ious,
    raw_prediction,
    relative_difference,
    sam_outputs,
)
from gpu_sections.context import (
    AUTOCAST_CELLS,
    AUTOCAST_MARGIN,
    AUTOCAST_MASK_IOU,
    AUTOCAST_MATCH,
    CAPTION,
    DTYPES,
    TEXT_THRESHOLD,
    Context,
    precision,
)
from gpu_sections.report import Report, guarded
from segmentation.sam import BoxSegmenter


def section_autocast(ctx: Context, report: Report, deadline: float) -> None:
    """bf16 / fp16 autocast vs fp32 on the device."""
    detector, n_tokens = ctx.detector, ctx.n_tokens()
    segmenter = BoxSegmenter(ctx.our_sam())
    with precision(ctx.device, "fp32"):
        reference = detector.detect(ctx.pixels, CAPTION)
        ref_features, ref_masks, _ = sam_outputs(segmenter, ctx.image, ctx.boxes)
    ref_raw = raw_prediction(ctx, reference)
    ranked = detector.select(ref_raw, 0.0, TEXT_THRESHOLD).scores
    top20 = float(ranked[min(19, len(ranked) - 1)]) if len(ranked) else 0.5
    report.data["autocast"] = {"top20_threshold": top20}
    for name in DTYPES:
        with guarded(report, "autocast", f"detector {name}"):
            with precision(ctx.device, name):
                output = detector.detect(ctx.pixels, CAPTION)
            d = compare_detector(output, reference, n_tokens)
            raw = raw_prediction(ctx, output)
            matches = {label: compare_detections(detector, ref_raw, raw, threshold)
                       for label, threshold in (("0.35", 0.35), ("top20", top20))}
            report.data["autocast"][f"detector_{name}"] = {**d, "matches": matches}
            report.check("autocast", f"detector {name} vs fp32: queries", describe_detector(d),
                         f"finite, >= {AUTOCAST_CELLS:.0%} same cells",
                         not d["non_finite"] and d["same_cells"] >= AUTOCAST_CELLS)
            for label, m in matches.items():
                threshold = "0.35" if label == "0.35" else f"{top20:.3f} (fp32's 20th best)"
                (ref_found, ref_clear), (found, clear) = m["reference_clear_found"], \
                    m["clear_found"]
                report.check(
                    "autocast", f"detector {name} vs fp32: detections at {threshold}",
                    f"kept {m['kept'][0]} (fp32) / {m['kept'][1]} ({name}); clear ones (score "
                    f"> threshold + {AUTOCAST_MARGIN}) found by the other (score > threshold - "
                    f"{AUTOCAST_MARGIN}, same phrase, IoU >= 0.9): fp32's {ref_found}/{ref_clear},"
                    f" {name}'s {found}/{clear}",
                    f">= {AUTOCAST_MATCH:.0%} found both ways", m["share"] >= AUTOCAST_MATCH)
        with guarded(report, "autocast", f"SAM {name}"):
            low_segmenter = BoxSegmenter(ctx.our_sam())
            with precision(ctx.device, name):
                features, masks, _ = sam_outputs(low_segmenter, ctx.image, ctx.boxes)
            embed = relative_difference(features, ref_features)
            ious = mask_ious(masks, ref_masks)
            finite = bool(torch.isfinite(features.float()).all())
            report.data["autocast"][f"sam_{name}"] = {
                "embedding_max_rel": embed, "mask_iou": ious.tolist(), "finite": finite,
                "embedding_dtype": str(features.dtype)}
            report.check("autocast", f"SAM {name} vs fp32",
                         f"embedding {embed:.1e} rel ({features.dtype}), mask IoU mean "
                         f"{ious.mean():.4f} (min {ious.min():.4f})",
                         f"finite, mask IoU mean >= {AUTOCAST_MASK_IOU}",
                         finite and ious.mean() >= AUTOCAST_MASK_IOU)
