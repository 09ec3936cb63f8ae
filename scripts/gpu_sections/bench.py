"""The bench section: interleaved timings of our detector, SAM and text -> masks against
transformers and SamPredictor, the app's request, and the speed targets."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import benchmark_peers as peers  # scripts/benchmark_peers.py, beside gpu_check.py
import torch

from gpu_sections.compare import fresh_run
from gpu_sections.context import BOXES, CAPTION, TEXT_THRESHOLD, Context, precision, synchronize
from gpu_sections.report import Report
from segmentation.sam import BoxSegmenter

# Targets.
TEXT_TO_MASKS_MS, DETECTOR_SPEEDUP = 30.0, 5.0


@dataclass
class Stage:
    name: str
    fn: Callable[[], object]
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    error: str = ""
    note: str = ""


def section_bench(ctx: Context, report: Report, deadline: float) -> None:
    from segment_anything import SamPredictor

    from segmentation.export import to_json_dict
    from segmentation.visualize import annotate

    device, detector, image, boxes = ctx.device, ctx.detector, ctx.image, ctx.boxes
    hf_model, processor = ctx.hf_model, ctx.processor
    height, width = image.shape[:2]
    tokenizer = detector.tokenizer
    precisions = ("fp32", "tf32", "bf16")
    # ours: SAM as build_sam returns it; the peer: segment_anything's own
    segmenters = {name: BoxSegmenter(ctx.our_sam()) for name in precisions}
    predictors = {name: SamPredictor(ctx.sam) for name in precisions}

    def under(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def call():
            with precision(device, name):
                return fn()
        return call

    def hf_detect():
        tokens = tokenizer([CAPTION], padding="longest", return_tensors="pt").to(device)
        with torch.inference_mode():
            return hf_model(pixel_values=ctx.pixels, input_ids=tokens["input_ids"],
                            attention_mask=tokens["attention_mask"],
                            token_type_ids=torch.zeros_like(tokens["input_ids"]))

    def peer_decode(predictor):
        return peers.peer_decode(predictor, boxes, (height, width), device)

    def peer_text_to_masks(predictor):
        """transformers' processor, forward and post-processing (best BOXES boxes, clipped),
        then SamPredictor.set_image and predict_torch, results on the CPU."""
        inputs = processor(images=image, text=CAPTION, return_tensors="pt").to(device)
        with torch.inference_mode():
            outputs = hf_model(**inputs)
        found = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=0.0, text_threshold=TEXT_THRESHOLD,
            target_sizes=[(height, width)])[0]
        best = found["scores"].argsort(descending=True)[:BOXES]
        return peers.peer_boxes_to_masks(predictor, image, found["boxes"][best])

    def app_request(segmenter):
        result = fresh_run(ctx, segmenter)
        return annotate(image, result), to_json_dict(result)

    stages = [
        Stage("detector fp32: ours", under("fp32", lambda: detector.detect(ctx.pixels, CAPTION))),
        Stage("detector fp32: transformers eager", under("fp32", hf_detect)),
        Stage("detector TF32: ours", under("tf32", lambda: detector.detect(ctx.pixels, CAPTION))),
        Stage("detector bf16: ours", under("bf16", lambda: detector.detect(ctx.pixels, CAPTION))),
        Stage("detector bf16: transformers eager", under("bf16", hf_detect)),
    ]
    for name in precisions:
        stages += [
            Stage(f"SAM embedding {name}: ours", under(name, lambda s=segmenters[name]:
                                                         s.embed(image))),
            Stage(f"SAM embedding {name}: SamPredictor.set_image",
                  under(name, lambda p=predictors[name]: p.set_image(image))),
            # Each side's own predictor has this image set by the embedding stage before it.
            Stage(f"mask decoding {BOXES} boxes {name}: ours",
                  under(name, lambda s=segmenters[name]: s.segment(boxes))),
            Stage(f"mask decoding {BOXES} boxes {name}: SamPredictor.predict_torch",
                  under(name, lambda p=predictors[name]: peer_decode(p))),
        ]
    stages += [Stage(f"text -> masks {name}: ours", under(name, lambda s=segmenters[name]:
                                                           fresh_run(ctx, s)))
               for name in precisions]
    # other settings of accelerate_sam (the whole mask in one SDPA call per block)
    fast = {label: model for label, model in ctx.fast_sams().items()
            if label != "accelerate_sam"}
    for label, model in fast.items():
        fast_segmenter = BoxSegmenter(model)
        for name in ("fp32", "bf16"):
            stages += [Stage(f"SAM embedding {name}: {label}",
                             under(name, lambda s=fast_segmenter: s.embed(image))),
                       Stage(f"text -> masks {name} + {label}: ours",
                             under(name, lambda s=fast_segmenter: fresh_run(ctx, s)))]
    stages += [
        Stage("text -> masks fp32: transformers + SamPredictor",
              under("fp32", lambda: peer_text_to_masks(predictors["fp32"]))),
        Stage("text -> masks bf16: transformers + SamPredictor",
              under("bf16", lambda: peer_text_to_masks(predictors["bf16"]))),
        Stage("app request fp32 (run + drawing + COCO JSON)",
              under("fp32", lambda: app_request(segmenters["fp32"]))),
        Stage("app request bf16 (run + drawing + COCO JSON)",
              under("bf16", lambda: app_request(segmenters["bf16"]))),
    ]
    by_name = {stage.name: stage for stage in stages}
    outputs = {}
    for stage in stages:  # warm-up; a stage that fails is reported and left out
        try:
            outputs[stage.name] = stage.fn()
        except Exception as error:  # noqa: BLE001
            stage.error = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
            report.fail("bench", stage.name, error)
    for name, result in outputs.items():
        if name.startswith("text -> masks") and name.endswith(": ours"):
            by_name[name].note = f"{len(result)} masks"
    live = [stage for stage in stages if not stage.error]
    rounds = 0
    for round_index in range(ctx.args.runs):
        for stage in live if round_index % 2 == 0 else live[::-1]:
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            stage.fn()
            synchronize(device)
            stage.seconds.append(time.perf_counter() - start)
            if ctx.cuda:
                stage.peak_bytes = max(stage.peak_bytes, torch.cuda.max_memory_allocated(device))
        rounds += 1
        if time.perf_counter() > deadline:
            break
    medians = {stage.name: statistics.median(stage.seconds) * 1e3 for stage in live}
    report.data["bench"] = {
        "rounds": rounds, "variants": sorted(fast),
        "stages": {stage.name: {"seconds": stage.seconds, "median_ms": medians.get(stage.name),
                                "cuda_peak_bytes": stage.peak_bytes, "error": stage.error,
                                "note": stage.note} for stage in stages}}
    print(f"\nbench: medians of {rounds} interleaved rounds after a warm-up, {ctx.device}")
    print("| stage | median ms | min ms | runs | GPU peak GB | note |\n|---|---|---|---|---|---|")
    for stage in stages:
        if stage.error:
            print(f"| {stage.name} | FAIL | | | | {stage.error[:80]} |")
            continue
        print(f"| {stage.name} | {medians[stage.name]:.1f} | {min(stage.seconds) * 1e3:.1f} | "
              f"{len(stage.seconds)} | {stage.peak_bytes / 1e9:.2f} | {stage.note} |")
    print(flush=True)

    def ms(name: str) -> float | None:
        return medians.get(name)

    def ratio_row(check: str, slow: str, fast_name: str, target: float | None) -> None:
        if ms(slow) is None or ms(fast_name) is None:
            report.skip("bench", check, "a stage failed (above)")
            return
        ratio = ms(slow) / ms(fast_name)
        value = f"{ms(slow):.1f} ms / {ms(fast_name):.1f} ms = {ratio:.2f}x"
        if target is None:
            report.add("bench", check, value)
        else:
            report.check("bench", check, value, f">= {target:g}x", ratio >= target)

    ratio_row("detector speed-up fp32 (transformers eager fp32 / ours fp32)",
              "detector fp32: transformers eager", "detector fp32: ours", DETECTOR_SPEEDUP)
    ratio_row("detector speed-up bf16 (transformers eager fp32 / ours bf16)",
              "detector fp32: transformers eager", "detector bf16: ours", DETECTOR_SPEEDUP)
    ratio_row("detector bf16 (transformers eager bf16 / ours bf16)",
              "detector bf16: transformers eager", "detector bf16: ours", None)
    if "detector fp32: ours" in outputs and "detector fp32: transformers eager" in outputs:
        report.add("bench", "detector outputs fp32, ours vs transformers",
                   peers.detector_difference(outputs["detector fp32: ours"],
                                             outputs["detector fp32: transformers eager"],
                                             ctx.n_tokens()))
    for name in precisions:
        ratio_row(f"SAM embedding {name} (set_image / ours)",
                  f"SAM embedding {name}: SamPredictor.set_image", f"SAM embedding {name}: ours",
                  None)
        ratio_row(f"mask decoding {BOXES} boxes {name} (predict_torch / ours)",
                  f"mask decoding {BOXES} boxes {name}: SamPredictor.predict_torch",
                  f"mask decoding {BOXES} boxes {name}: ours", None)
    for label in fast:
        for name in ("fp32", "bf16"):
            ratio_row(f"SAM embedding {name} (ours / {label})", f"SAM embedding {name}: ours",
                      f"SAM embedding {name}: {label}", None)
    models = "tiny detector + tiny SAM" if ctx.args.tiny else f"SwinT + {ctx.args.sam_variant}"
    names = [f"text -> masks {name}: ours" for name in precisions]
    names += [f"text -> masks {name} + {label}: ours"
              for label in fast for name in ("fp32", "bf16")]
    for name in names:
        check = f"{name.removesuffix(': ours')} ({models}, {BOXES} boxes)"
        if ms(name) is None:
            report.skip("bench", check, "the stage failed (above)")
            continue
        peak = by_name[name].peak_bytes
        report.check("bench", check, f"{ms(name):.1f} ms, {by_name[name].note}"
                     + (f", GPU peak {peak / 1e9:.2f} GB" if ctx.cuda else ""),
                     f"<= {TEXT_TO_MASKS_MS:g} ms", ms(name) <= TEXT_TO_MASKS_MS)
    for name in ("fp32", "bf16"):
        ratio_row(f"text -> masks {name} (transformers + SamPredictor / ours)",
                  f"text -> masks {name}: transformers + SamPredictor",
                  f"text -> masks {name}: ours", None)
        stage = f"app request {name} (run + drawing + COCO JSON)"
        if ms(stage) is not None:
            report.add("bench", stage, f"{ms(stage):.1f} ms")
