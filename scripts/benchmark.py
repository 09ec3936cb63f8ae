"""Grounded SAM latency per stage and per threshold-slider change, printed as a table.

Full-size Grounding DINO (SwinT-OGC by default) and SAM (ViT-B by default) with random weights:
timings do not depend on the weights, except through how many boxes pass a threshold, so the box
thresholds are picked from the raw scores to show exactly --boxes boxes, and each slider step moves
by --step boxes.

First run (cold caches), stage by stage: detector (`Detector.infer`), SAM image embedding, mask
decoding of the shown boxes, drawing (`annotate`); then `GroundedSAM.run` end to end and, with
--background N (the app's setting, 48, by default), the time the background thread then needs to
decode the N boxes below the threshold (0: the synchronous `LookAhead.prefetch()` instead).
Slider changes (warm caches; `run` + `annotate`, the pipeline's share of a slider release; the
whole round trip in a browser is scripts/benchmark_app.py): "cached" moves between thresholds
seen before (re-filter, re-assemble masks, draw); "down" lowers the threshold step by step, each
time showing --step more boxes after a pause in which the background caught up; boxes not decoded
before go through the decoder. Also CPU-seconds per wall-second (about 2.0 on an idle 2-core
machine; lower means other jobs competed) and peak RSS.

    python scripts/benchmark.py --size 800x1200 --boxes 10 --step 3 --runs 1 \
        --slider-runs 5
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path

import numpy as np
import timing  # scripts/timing.py, beside this script
import torch
from segment_anything import sam_model_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grounding import Detector, build_model  # noqa: E402
from grounding.config import PRESETS  # noqa: E402
from segmentation.pipeline import GroundedSAM, LookAhead  # noqa: E402
from segmentation.sam import BoxSegmenter  # noqa: E402
from segmentation.visualize import annotate  # noqa: E402

VOCAB = Path(__file__).resolve().parents[1] / "tests" / "data" / "bert-base-uncased-vocab.txt"
PROMPT = "a cat . a remote control . a dog . a person ."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detector", default="swint_ogc", choices=sorted(PRESETS))
    parser.add_argument("--sam", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--size", default="800x1200", help="HxW of the image")
    parser.add_argument("--boxes", type=int, default=10, help="boxes shown by the first run")
    parser.add_argument("--step", type=int, default=3, help="boxes added by a slider step")
    parser.add_argument("--runs", type=int, default=1, help="cold first runs (slow on CPU)")
    parser.add_argument("--slider-runs", type=int, default=5, help="slider changes of each kind")
    parser.add_argument("--background", type=int, default=48,
                        help="boxes decoded ahead in the background after each run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    height, width = (int(v) for v in args.size.split("x"))
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)

    from transformers import BertTokenizer

    torch.manual_seed(0)
    model = build_model(PRESETS[args.detector]())
    with torch.no_grad():  # random logits (std ~10) saturate to score 1.0; spread them out
        model.decoder.norm.weight.mul_(0.05)
        model.decoder.norm.bias.mul_(0.05)
    detector = Detector(model, BertTokenizer(vocab=str(VOCAB), do_lower_case=True),
                        device=device)
    segmenter = BoxSegmenter(sam_model_registry[args.sam](checkpoint=None).to(device).eval())

    def timed(fn):
        return timing.timed(fn, device)

    rows: dict[str, list[tuple[float, float]]] = {}
    raw = detector.infer(image, PROMPT)  # warm-up, and the scores that set the thresholds
    scores = np.sort(detector.select(raw, 0.0, 0.0).scores)[::-1]
    wanted = args.boxes + args.step * (args.slider_runs + 1)
    if wanted >= len(scores):
        parser.error(f"--boxes + --step x (--slider-runs + 1) must be below {len(scores)}")
    if len(np.unique(scores[:wanted + 1])) <= wanted:
        raise RuntimeError("tied scores: thresholds cannot pick exact box counts")
    # threshold[k] shows exactly k boxes (midway between the k-th and (k+1)-th score).
    threshold = {k: float(scores[k - 1] + scores[k]) / 2 for k in range(1, wanted + 1)}
    segmenter.embed(image)
    segmenter.segment(detector.select(raw, threshold[args.boxes]).boxes)  # warm-up
    for _ in range(args.runs):
        raw, sample = timed(lambda: detector.infer(image, PROMPT))
        rows.setdefault("detector (infer)", []).append(sample)
        shown = detector.select(raw, threshold[args.boxes])
        _, sample = timed(lambda: segmenter.embed(image))
        rows.setdefault("SAM image embedding", []).append(sample)
        (masks, _), sample = timed(lambda shown=shown: segmenter.segment(shown.boxes))
        rows.setdefault(f"mask decoding, {len(shown)} boxes", []).append(sample)
        pipeline = GroundedSAM(detector, segmenter, look_ahead=(
            LookAhead.background(args.background) if args.background else LookAhead()))
        result, sample = timed(lambda pipeline=pipeline: pipeline.run(
            image, PROMPT, threshold[args.boxes]))
        prefetched = pipeline.stats.boxes_decoded - len(result)
        rows.setdefault(f"first run end to end (GroundedSAM.run, {len(result)} boxes + "
                        f"{prefetched} prefetched)", []).append(sample)
        if args.background:
            _, sample = timed(pipeline.wait_idle)
            rows.setdefault(f"then in the background: {args.background} boxes decoded ahead",
                            []).append(sample)
        _, sample = timed(lambda result=result: annotate(image, result))
        rows.setdefault(f"drawing (annotate), {len(result)} boxes", []).append(sample)

    def slider(box_threshold: float) -> None:
        annotate(image, pipeline.run(image, PROMPT, box_threshold))

    cached = [threshold[args.boxes - args.step], threshold[args.boxes]]
    for index in range(args.slider_runs):
        _, sample = timed(lambda index=index: slider(cached[index % 2]))
        rows.setdefault("slider change, cached (run + annotate)", []).append(sample)
    for index in range(args.slider_runs):
        pipeline.wait_idle()  # the user paused: the background caught up
        decoded = pipeline.stats.boxes_decoded
        _, sample = timed(lambda index=index: slider(
            threshold[args.boxes + args.step * (index + 1)]))
        rows.setdefault(f"slider down, +{args.step} boxes, "
                        f"{pipeline.stats.boxes_decoded - decoded} decoded (run + annotate)",
                        []).append(sample)
    pipeline.wait_idle()  # before the interpreter exits under a running decode
    stats = pipeline.stats
    assert stats.detector_runs == 1 and stats.image_embeddings == 1  # sliders ran no encoder

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{args.detector} + SAM {args.sam}, {height}x{width} image on {device} "
          f"({args.threads} threads, fp32), random weights")
    print("| stage | median s | runs | cpu/wall |\n|---|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(v for v, _ in values):.3f} | "
              f"{' / '.join(f'{v:.3f}' for v, _ in values)} | "
              f"{statistics.median(c for _, c in values):.2f} |")
    print(f"peak RSS {peak_gb:.2f} GB; pipeline stats {stats}")


if __name__ == "__main__":
    main()
