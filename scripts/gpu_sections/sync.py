"""The sync section: CUDA synchronisations of the bare forwards and of the wrappers, counted with
`torch.cuda.set_sync_debug_mode` and traced to their call sites."""

from __future__ import annotations

import os
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from gpu_sections.compare import fresh_run
from gpu_sections.context import BOXES, CAPTION, Context, synchronize
from gpu_sections.report import Report, guarded
from grounding.text_masks import sub_sentence_masks
from segmentation.sam import BoxSegmenter

ROOT = Path(__file__).resolve().parents[2]  # the checkout


def count_syncs(fn: Callable[[], object], device: torch.device) -> tuple[int, Counter]:
    """Synchronising CUDA operations `fn` makes, and where (innermost frame outside torch, and
    the innermost frame of this repository when that is another)."""
    sites: Counter = Counter()
    count = 0

    def record(message, category, filename, lineno, file=None, line=None):
        nonlocal count
        text = str(message)
        # the mode's own one-time notice ("... does not yet detect all synchronizing operations")
        if "synchroniz" not in text or text.startswith("Synchronization debug mode"):
            return
        count += 1
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")
                  and f.name != "count_syncs"]
        if not frames:
            sites[f"{filename}:{lineno}"] += 1
            return
        inner = frames[-1]
        # This script's own frames (gpu_check.py and the gpu_sections package) are not ours.
        ours = [f for f in frames if f.filename.startswith(str(ROOT))
                and not f.filename.endswith("gpu_check.py")
                and os.path.dirname(f.filename) != os.path.dirname(__file__)]
        site = short_frame(inner)
        if ours and ours[-1] is not inner:
            site += f" (from {short_frame(ours[-1])})"
        sites[site] += 1

    synchronize(device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return count, sites


def short_frame(frame: traceback.FrameSummary) -> str:
    path = frame.filename
    if path.startswith(str(ROOT)):
        path = os.path.relpath(path, ROOT)
    elif "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    return f"{path}:{frame.lineno} {frame.name}"


def section_sync(ctx: Context, report: Report, deadline: float) -> None:
    if not ctx.cuda:
        report.skip("sync", "set_sync_debug_mode", "needs CUDA")
        return
    detector, sam, device = ctx.detector, ctx.our_sam(), ctx.device
    segmenter = BoxSegmenter(sam)
    tokens = detector.tokenizer([CAPTION], padding="longest", return_tensors="pt")
    input_ids = tokens["input_ids"].to(device)
    token_mask = tokens["attention_mask"].to(device).bool()
    text_masks = sub_sentence_masks(input_ids, token_mask, detector.special_token_ids)
    predictor = segmenter.predictor
    segmenter.embed(ctx.image)
    resized = predictor.transform.apply_image(ctx.image)
    encoder_input = sam.preprocess(torch.as_tensor(resized, device=device).permute(2, 0, 1)[None]
                                   .contiguous().float())
    height, width = ctx.image.shape[:2]
    prompts = predictor.transform.apply_boxes_torch(torch.as_tensor(ctx.boxes, device=device),
                                                    (height, width))
    features = predictor.features

    @torch.inference_mode()
    def detector_forward():
        encoded = detector.model.encode_image(ctx.pixels)
        return detector.model.ground(encoded, input_ids, token_mask, text_masks=text_masks)

    @torch.inference_mode()
    def sam_encoder():  # as build_sam returns it
        return sam.image_encoder(encoder_input)

    @torch.inference_mode()
    def upstream_sam_encoder():
        return ctx.sam.image_encoder(encoder_input)

    @torch.inference_mode()
    def sam_decoder():
        sparse, dense = sam.prompt_encoder(points=None, boxes=prompts, masks=None)
        low_res, _ = sam.mask_decoder(image_embeddings=features,
                                      image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=False)
        return sam.postprocess_masks(low_res, predictor.input_size, (height, width)) > 0

    bare = [("detector encode_image + ground", detector_forward),
            ("SAM image encoder (accelerate_sam)", sam_encoder),
            ("SAM prompt encoder + mask decoder + upscale", sam_decoder)]
    # segment_anything's own indexes its relative positions with a CPU arange (2 syncs a block)
    upstream = [("SAM image encoder (segment_anything's)", upstream_sam_encoder)]
    wrappers = [("Detector.detect (tokenizes, inputs to the GPU)",
                 lambda: detector.detect(ctx.pixels, CAPTION)),
                ("Detector.infer (+ preprocessing, outputs to the CPU)",
                 lambda: detector.infer(ctx.image, CAPTION)),
                ("BoxSegmenter.embed", lambda: segmenter.embed(ctx.image)),
                (f"BoxSegmenter.segment, {BOXES} boxes", lambda: segmenter.segment(ctx.boxes)),
                (f"GroundedSAM.run, first run, {BOXES} boxes",
                 lambda: fresh_run(ctx, BoxSegmenter(sam)))]
    report.data["sync"] = {}
    bare_names = {name for name, _ in bare}
    for name, fn in bare + upstream + wrappers:
        with guarded(report, "sync", name):
            fn()  # warm-up: lazy initialisation does not count
            count, sites = count_syncs(fn, device)
            report.data["sync"][name] = {"count": count, "sites": dict(sites)}
            listed = "; ".join(f"{site} x{n}" for site, n in sites.most_common(4))
            more = f"; +{len(sites) - 4} more sites" if len(sites) > 4 else ""
            value = f"{count} syncs" + (f": {listed}{more}" if count else "")
            if name in bare_names:
                report.check("sync", f"forward: {name}", value, "0 syncs", count == 0)
            elif name in dict(upstream):
                report.add("sync", f"forward: {name}", value, "(reported: upstream code)")
            else:
                report.add("sync", f"wrapper: {name}", value, "(reported: inputs in, results out)")
