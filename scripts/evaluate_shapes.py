"""The shapes-trained Grounding DINO and small SAM against the P6 targets, on held-out images.

    OMP_NUM_THREADS=1 python scripts/evaluate_shapes.py --detector assets/shapes_detector \\
        --sam assets/small_sam_shapes.safetensors --images 200 --seed 0 --threads 1 \\
        --out shapes_evaluation.json

Data: without `--data`, `--images` images are generated into a temporary folder by
`grounding.shapes_data.generate_split` with seed `--seed + TEST_SEED_OFFSET` and the generator's
defaults (as the training data): with `--seed 0` they are exactly the first N images of the test
split that `python -m grounding.shapes_data OUT --seed 0 --test N` writes (seed 2000003), which
training never sees. `--data DIR` evaluates the first N images (by id) of a split written that way
(DIR/annotations.json and DIR/images/) instead.

Metrics (`segmentation.shapes_metrics` holds the matching):
1. COCO box AP50, AP and per-category AP: `grounding.evaluate` (the reference protocol: one prompt
   naming the 12 categories, the 300 best (query, category) pairs per image, COCOeval).
2. The app's pipeline (`GroundedSAM`, box / text thresholds 0.35 / 0.25, the same prompt): each
   detection is matched greedily by score to an object with box IoU >= 0.5 AND a phrase equal to
   its category name; recall = TP / objects, precision = TP / detections.
3. Mean mask IoU over the true positives (the pipeline's mask against the RLE ground truth), and,
   for SAM alone, over every object segmented from its ground-truth box.
4. The false positives by kind: among those whose box overlaps an object of another category
   (IoU >= 0.5), wrong colour / wrong shape / both wrong; also duplicates, partial labels, and
   boxes on nothing.
5. Robustness: for "a dog ." and "a car . a person ." (never in training), the boxes per image
   above the box threshold and their best score.

Speed: the seconds per image of the pipeline (detector + SAM, as the app runs them) are printed
and recorded: the first image apart (it includes `--compile`'s compilation), then the mean and
median of the others. `--quantize int8` and `--compile` apply `segmentation.fast_modes` to both
models (the same as the CLI's flags), so fp32 and the faster modes can be compared on the same
images.

Resize: the detector runs at the short side / longest side its checkpoint records (the
processor config `grounding.save_detector` writes; 224 / 320 for the shapes model, as the app runs
it), unless `--size` / `--max-size` say otherwise.

Prints one Markdown table (metric, value, target, pass / fail) and writes everything as JSON
(`--out`). The robustness target, "few or no boxes", is read as at most
`MAX_UNSEEN_BOXES_PER_IMAGE` boxes per image.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grounding.captions import category_prompt  # noqa: E402
from grounding.dataset import load_image  # noqa: E402
from grounding.evaluate_inference import predict_dataset  # noqa: E402
from grounding.evaluate_metrics import evaluate_predictions, read_annotations  # noqa: E402
from grounding.predictor import Detector  # noqa: E402
from grounding.shapes_categories import CATEGORIES  # noqa: E402
from grounding.shapes_data import TEST_SEED_OFFSET, generate_split  # noqa: E402
from segmentation.fast_modes import QUANTIZE_MODES, apply_fast_modes  # noqa: E402
from segmentation.pipeline import GroundedSAM, LookAhead  # noqa: E402
from segmentation.sam import BoxSegmenter  # noqa: E402
from segmentation.sam_data import annotation_mask  # noqa: E402
from segmentation.shapes_metrics import (  # noqa: E402
    MatchTally,
    mask_iou,
    match_detections,
)

BOX_THRESHOLD = 0.35
TEXT_THRESHOLD = 0.25
ROBUSTNESS_PROMPTS = ("a dog .", "a car . a person .")
MIN_AP50 = 0.9
MIN_RECALL = 0.85
MIN_PRECISION = 0.85
MIN_MASK_IOU = 0.85
MAX_UNSEEN_BOXES_PER_IMAGE = 0.1

logger = logging.getLogger("evaluate_shapes")


def shapes_prompt() -> str:
    """The prompt naming the 12 categories: "red circle . red square . ... yellow triangle ."."""
    return category_prompt(CATEGORIES)


def held_out_split(folder: str | Path, count: int, seed: int = 0, **generator_options) -> Path:
    """Write the first `count` images of the test split of `seed` (split seed
    `seed + TEST_SEED_OFFSET`) to `folder`; returns `folder`.

    Args:
        generator_options: for `generate_image` (e.g. smaller `min_side` / `max_side` in tests);
            none for the images the targets are about.
    """
    generate_split(folder, count, seed + TEST_SEED_OFFSET, progress=False, **generator_options)
    return Path(folder)


def _split_images(folder: Path, max_images: int | None) -> tuple[dict, list[dict], dict]:
    """(COCO dict, its first `max_images` images by id, image id -> its annotations)."""
    coco = read_annotations(folder / "annotations.json")
    images = sorted(coco["images"], key=lambda entry: entry["id"])[:max_images]
    per_image: dict[int, list[dict]] = {entry["id"]: [] for entry in images}
    for annotation in coco["annotations"]:
        if annotation["image_id"] in per_image:
            per_image[annotation["image_id"]].append(annotation)
    return coco, images, per_image


def _ground_truth(entry: dict, annotations: list[dict], names: dict[int, str],
                  ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """One image's objects: boxes (M, 4) x0, y0, x1, y1, category names, masks (M, H, W) bool."""
    boxes = np.array([a["bbox"] for a in annotations], np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # (x, y, w, h) -> (x0, y0, x1, y1)
    height, width = entry["height"], entry["width"]
    masks = np.stack([annotation_mask(a["segmentation"], height, width) for a in annotations]) \
        if annotations else np.zeros((0, height, width), bool)
    return boxes, [names[a["category_id"]] for a in annotations], masks


def _progress(iterable, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, desc=description, unit="image", disable=not enabled, file=sys.stderr)


def detection_ap(detector: Detector, folder: str | Path, *, size: int, max_size: int,
                 max_images: int | None = None, progress: bool = False) -> dict:
    """`grounding.evaluate`'s COCO metrics (AP, AP50, ..., per_category) on the split in
    `folder`, resizing to (`size`, `max_size`)."""
    folder = Path(folder)
    annotations = read_annotations(folder / "annotations.json")
    predictions = predict_dataset(detector, folder / "images", annotations, size=size,
                                  max_size=max_size, max_images=max_images, progress=progress)
    return evaluate_predictions(annotations, predictions.results, predictions.image_ids)


def pipeline_metrics(detector: Detector, sam, folder: str | Path, *,
                     max_images: int | None = None, box_threshold: float = BOX_THRESHOLD,
                     text_threshold: float = TEXT_THRESHOLD, progress: bool = False,
                     timings: list[tuple[float, float]] | None = None) -> tuple[dict, dict]:
    """The pipeline's matching summary (`MatchTally.summary`) with the 12-name prompt, and SAM's
    mask IoU from the ground-truth boxes ({"mean_mask_iou", "masks"}). Appends (wall seconds,
    CPU seconds of this process) of each image's pipeline run to `timings`, when given."""
    folder = Path(folder)
    coco, images, per_image = _split_images(folder, max_images)
    names = {category["id"]: category["name"] for category in coco["categories"]}
    pipeline = GroundedSAM(detector, BoxSegmenter(sam), look_ahead=LookAhead.off())
    segmenter = BoxSegmenter(sam)
    prompt = shapes_prompt()
    tally, truth_box_ious = MatchTally(), []
    for entry in _progress(images, "pipeline", progress):
        image = np.asarray(load_image(folder / "images" / entry["file_name"],
                                      (entry["width"], entry["height"])))
        truth_boxes, truth_names, truth_masks = _ground_truth(entry, per_image[entry["id"]], names)
        started, cpu_started = time.perf_counter(), time.process_time()
        result = pipeline.run(image, prompt, box_threshold, text_threshold)
        if timings is not None:
            timings.append((time.perf_counter() - started, time.process_time() - cpu_started))
        match = match_detections(result.boxes, result.scores, result.phrases, truth_boxes,
                                 truth_names)
        detections = [detection for detection, _ in match.pairs]
        objects = [index for _, index in match.pairs]
        tally.add(match, result.phrases, truth_names,
                  mask_iou(result.masks[detections], truth_masks[objects]))
        if len(truth_boxes):
            segmenter.set_image(image)
            masks, _ = segmenter.segment(truth_boxes)
            truth_box_ious.extend(mask_iou(masks, truth_masks).tolist())
    sam_alone = {"mean_mask_iou": float(np.mean(truth_box_ious)) if truth_box_ious else None,
                 "masks": len(truth_box_ious)}
    return tally.summary(), sam_alone


def robustness(detector: Detector, folder: str | Path, prompts: Sequence[str], *,
               max_images: int | None = None, box_threshold: float = BOX_THRESHOLD,
               text_threshold: float = TEXT_THRESHOLD, progress: bool = False) -> dict:
    """Per prompt: "boxes" above the box threshold over all images, "boxes_per_image",
    "images_with_boxes", "max_score" of those boxes (None without any) and "max_query_score"
    (the best query's max token probability, kept or not)."""
    folder = Path(folder)
    _, images, _ = _split_images(folder, max_images)
    counts = {prompt: [] for prompt in prompts}
    kept_scores = {prompt: [] for prompt in prompts}
    query_scores = {prompt: [] for prompt in prompts}
    for entry in _progress(images, "unseen prompts", progress):
        image = load_image(folder / "images" / entry["file_name"],
                           (entry["width"], entry["height"]))
        for prompt in prompts:
            raw = detector.infer(image, prompt)
            detections = detector.select(raw, box_threshold, text_threshold)
            counts[prompt].append(len(detections))
            kept_scores[prompt].extend(detections.scores.tolist())
            query_scores[prompt].append(max(float(logits.float().sigmoid().max())
                                            for _, logits, _ in raw.chunks))
    return {prompt: {"images": len(images), "boxes": int(sum(counts[prompt])),
                     "boxes_per_image": float(np.mean(counts[prompt])) if images else None,
                     "images_with_boxes": int(np.count_nonzero(counts[prompt])),
                     "max_score": max(kept_scores[prompt], default=None),
                     "max_query_score": max(query_scores[prompt], default=None)}
            for prompt in prompts}


def timing_summary(timings: Sequence[tuple[float, float]]) -> dict:
    """{"images", "first_image" (with any compilation), "mean_after_first",
    "median_after_first", "cpu_mean_after_first"}, in seconds (None where there are too few
    images). CPU seconds (this process's) vary less than wall seconds when other jobs share the
    machine."""
    wall = [seconds for seconds, _ in timings]
    cpu = [seconds for _, seconds in timings[1:]]
    return {"images": len(timings), "first_image": wall[0] if wall else None,
            "mean_after_first": float(np.mean(wall[1:])) if cpu else None,
            "median_after_first": float(np.median(wall[1:])) if cpu else None,
            "cpu_mean_after_first": float(np.mean(cpu)) if cpu else None}


def evaluate(detector: Detector, sam, folder: str | Path, *, size: int, max_size: int,
             max_images: int | None = None, progress: bool = False) -> dict:
    """Every metric of the module docstring on the split in `folder`.

    Returns:
        {"detection": `detection_ap`, "pipeline": `pipeline_metrics`' summary,
        "sam_on_truth_boxes": its SAM-alone IoU, "robustness": `robustness`, "prompt",
        "resize": [size, max_size], "thresholds": {"box", "text"}, "seconds_per_image":
        `timing_summary` of the pipeline runs}.
    """
    resized = copy.copy(detector)  # the same model, resizing to (size, max_size)
    resized.image_size, resized.max_size = size, max_size
    report = {"prompt": shapes_prompt(), "resize": [size, max_size],
              "thresholds": {"box": BOX_THRESHOLD, "text": TEXT_THRESHOLD}}
    report["detection"] = detection_ap(detector, folder, size=size, max_size=max_size,
                                       max_images=max_images, progress=progress)
    timings: list[tuple[float, float]] = []
    report["pipeline"], report["sam_on_truth_boxes"] = pipeline_metrics(
        resized, sam, folder, max_images=max_images, progress=progress, timings=timings)
    report["seconds_per_image"] = timing_summary(timings)
    report["robustness"] = robustness(resized, folder, ROBUSTNESS_PROMPTS,
                                      max_images=max_images, progress=progress)
    return report


def target_rows(report: dict) -> list[dict]:
    """The table's rows: {"metric", "value" (number, text or None), "target" (text, "-" when
    informational), "passed" (True / False, None when informational)}; a missing value fails."""
    def row(metric: str, value, minimum: float | None = None, maximum: float | None = None):
        if minimum is None and maximum is None:
            return {"metric": metric, "value": value, "target": "-", "passed": None}
        target = f">= {minimum:g}" if minimum is not None else f"<= {maximum:g}"
        passed = value is not None and (value >= minimum if minimum is not None
                                        else value <= maximum)
        return {"metric": metric, "value": value, "target": target, "passed": passed}

    pipeline, kinds = report["pipeline"], report["pipeline"]["false_positive_kinds"]
    rows = [
        row("detection AP50 (COCOeval)", report["detection"]["AP50"], minimum=MIN_AP50),
        row("detection AP (0.5:0.95)", report["detection"]["AP"]),
        row("recall (IoU >= 0.5, right phrase)", pipeline["recall"], minimum=MIN_RECALL),
        row("precision (IoU >= 0.5, right phrase)", pipeline["precision"],
            minimum=MIN_PRECISION),
        row("mean mask IoU, found objects", pipeline["mean_mask_iou"], minimum=MIN_MASK_IOU),
        row("mean mask IoU, SAM on ground-truth boxes",
            report["sam_on_truth_boxes"]["mean_mask_iou"]),
        row("false positives: wrong colour / wrong shape / both wrong",
            " / ".join(str(kinds[kind]) for kind in ("wrong_colour", "wrong_shape",
                                                     "both_wrong"))),
        row("false positives: duplicate / partial label / on nothing",
            " / ".join(str(kinds[kind]) for kind in ("duplicate", "partial_label",
                                                     "no_overlap"))),
    ]
    for prompt, result in report["robustness"].items():
        rows.append(row(f'boxes per image, "{prompt}"', result["boxes_per_image"],
                        maximum=MAX_UNSEEN_BOXES_PER_IMAGE))
        rows.append(row(f'best box score, "{prompt}"', result["max_score"]))
    timing = report.get("seconds_per_image")
    if timing is not None:
        rows.append(row("seconds per image, pipeline: first image", timing["first_image"]))
        rows.append(row("seconds per image, pipeline: mean of the others",
                        timing["mean_after_first"]))
        rows.append(row("seconds per image, pipeline: median of the others",
                        timing["median_after_first"]))
        rows.append(row("CPU seconds per image, pipeline: mean of the others",
                        timing["cpu_mean_after_first"]))
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table; numbers with 3 decimals."""
    def cell(value) -> str:
        if value is None:
            return "none"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    verdicts = {True: "pass", False: "FAIL", None: "-"}
    lines = ["| metric | value | target | result |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {row['metric']} | {cell(row['value'])} | {row['target']} | "
              f"{verdicts[row['passed']]} |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/evaluate_shapes.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--detector", type=Path, required=True,
                        help="checkpoint directory (grounding.load_detector)")
    parser.add_argument("--sam", type=Path, required=True,
                        help="small SAM weights (.safetensors or last.pt)")
    parser.add_argument("--sam-config", type=Path, default=None,
                        help="its sam_config.json (default: the config recorded in the file)")
    parser.add_argument("--images", type=int, default=200, help="images to evaluate")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"training seed; the test split's is seed + {TEST_SEED_OFFSET}")
    parser.add_argument("--data", type=Path, default=None,
                        help="a split folder of grounding.shapes_data (default: generate one)")
    parser.add_argument("--size", type=int, default=None,
                        help="detector short side (default: the checkpoint's)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="detector longest side (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                        help="int8: dynamic int8 Linear layers in both models (CPU only; "
                             "segmentation.fast_modes)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile SAM's image encoder (segmentation.fast_modes)")
    parser.add_argument("--out", type=Path, default=None, help="write the report JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("images", "size", "max_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.data is not None and not (args.data / "annotations.json").is_file():
        parser.error(f"{args.data} has no annotations.json")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate and print the table; 0 when it ran (whatever the verdicts), 1 when a model could
    not be loaded."""
    import json

    from grounding.build import load_detector
    from segmentation.small_sam import load_small_sam

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        detector = load_detector(args.detector, device=device)
        sam = load_small_sam(args.sam, args.sam_config, device=device)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: could not load the models: {error}", file=sys.stderr)
        return 1
    try:
        fast_modes = apply_fast_modes(detector, sam, quantize=args.quantize,
                                      compile=args.compile, device=device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    size, max_size = detector.image_size, detector.max_size
    resize_source = "checkpoint"
    if args.size is not None or args.max_size is not None:
        size, max_size = args.size or size, args.max_size or max_size
        resize_source = "command line"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shapes_test_") as temporary:
        folder = args.data or held_out_split(Path(temporary) / "test", args.images, args.seed)
        report = evaluate(detector, sam, folder, size=size, max_size=max_size,
                          max_images=args.images, progress=not args.no_progress)
    rows = target_rows(report)
    report.update({
        "detector": str(args.detector), "sam": str(args.sam),
        "sam_config": None if args.sam_config is None else str(args.sam_config),
        "data": str(args.data) if args.data else "generated",
        "split_seed": None if args.data else args.seed + TEST_SEED_OFFSET,
        "images": report["pipeline"]["images"], "resize_source": resize_source,
        "device": str(device), "seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(), "fast_modes": fast_modes,
        "targets": rows,
        "all_targets_met": all(row["passed"] for row in rows if row["passed"] is not None)})
    source = args.data or f"generated, split seed {report['split_seed']}"
    print(f"{report['images']} images ({source}); detector resize {size} / {max_size} "
          f"({resize_source}); thresholds box {BOX_THRESHOLD}, text {TEXT_THRESHOLD}; "
          f"quantize {fast_modes['quantize']}, compiled {fast_modes['compiled']}, "
          f"{torch.get_num_threads()} threads\n")
    print(markdown_table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
