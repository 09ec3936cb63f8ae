"""COCO box AP of a Grounding DINO checkpoint, with pycocotools' COCOeval.

    python -m grounding.evaluate --checkpoint groundingdino_swint_ogc.pth \
        --images coco/val2017 --annotations coco/annotations/instances_val2017.json \
        --out swint_ogc_coco_val2017.json

The checkpoint is anything `grounding.load_detector` reads: an official `.pth` (with `--config`),
a transformers-format directory, or a Hub id such as IDEA-Research/grounding-dino-tiny.

Protocol, as the reference's `demo/test_ap_on_coco.py` (IDEA-Research/GroundingDINO):
- one prompt naming every category in the file's order, `" . ".join(names) + " ."`;
- the reference resize (short side 800, long side <= 1333);
- a (query, category) score is the mean probability of the category's tokens, and the 300 best
  pairs of an image are its detections (so one query may propose several categories);
- COCOeval (bbox) with its defaults (at most 100 detections per image and category).
The paper reports 48.4 AP for SwinT-OGC zero-shot on COCO val2017 (Table 2); checking that needs
the official weights and COCO, neither of which is available offline here.

A prompt over `max_text_len` tokens (LVIS, say) is split at phrase boundaries into several text
passes over one image encoding, as `Detector.infer` does, so every category is scored.

The computation is in `grounding.evaluate_inference` (`predict_dataset`) and
`grounding.evaluate_metrics` (`evaluate_predictions`), for use by a training loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from grounding.config import DETECTOR_PRESETS
from grounding.evaluate_inference import predict_dataset
from grounding.evaluate_metrics import evaluate_predictions, format_metrics, read_annotations


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m grounding.evaluate",
        description="COCO box AP of a Grounding DINO checkpoint.",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="official .pth, transformers-format directory or Hub id "
        "(default: $GROUNDING_DINO_CHECKPOINT, else the official file)",
    )
    parser.add_argument(
        "--config",
        default="swint_ogc",
        help=f"architecture of a .pth: {' or '.join(DETECTOR_PRESETS)}",
    )
    parser.add_argument(
        "--text-encoder",
        default=None,
        help="BERT directory or Hub id for the tokenizer (see load_detector)",
    )
    parser.add_argument("--images", type=Path, required=True, help="image folder")
    parser.add_argument("--annotations", type=Path, required=True, help="COCO JSON")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
    parser.add_argument(
        "--detections",
        type=Path,
        default=None,
        help="also write the COCO results (detections) JSON here",
    )
    parser.add_argument(
        "--box-threshold",
        type=float,
        default=0.0,
        help="drop (box, category) pairs scoring at most this (default 0.0)",
    )
    parser.add_argument(
        "--max-detections",
        type=int,
        default=300,
        help="pairs kept per image (default 300, as the reference)",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="image-reading processes")
    parser.add_argument(
        "--max-images", type=int, default=None, help="evaluate the first N images (by id) only"
    )
    parser.add_argument("--size", type=int, default=800, help="short side after resizing")
    parser.add_argument("--max-size", type=int, default=1333, help="longest side after resizing")
    args = parser.parse_args(argv)
    if not 0.0 <= args.box_threshold < 1.0:
        parser.error("--box-threshold must be in [0, 1)")
    for name in ("max_detections", "batch_size", "size", "max_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_images is not None and args.max_images < 1:
        parser.error("--max-images must be at least 1")
    if not args.images.is_dir():
        parser.error(f"{args.images} is not a folder")
    if not args.annotations.is_file():
        parser.error(f"{args.annotations} does not exist")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate; returns 0 when at least one image was evaluated, 1 otherwise."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from grounding.build import load_detector

    try:
        detector = load_detector(
            args.checkpoint, config=args.config, text_encoder=args.text_encoder, device=args.device
        )
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: could not load the detector: {error}", file=sys.stderr)
        return 1
    annotations = read_annotations(args.annotations)
    predictions = predict_dataset(
        detector,
        args.images,
        annotations,
        batch_size=args.batch_size,
        max_images=args.max_images,
        score_threshold=args.box_threshold,
        max_detections=args.max_detections,
        size=args.size,
        max_size=args.max_size,
        workers=args.workers,
        progress=True,
    )
    if not predictions.image_ids:
        print("error: no image could be read", file=sys.stderr)
        return 1
    metrics = evaluate_predictions(annotations, predictions.results, predictions.image_ids)
    print(format_metrics(metrics))
    report = {
        "checkpoint": str(args.checkpoint),
        "annotations": str(args.annotations),
        "images": str(args.images),
        "prompt": predictions.prompt,
        "image_ids": predictions.image_ids,
        "skipped_image_ids": predictions.skipped_image_ids,
        "size": [args.size, args.max_size],
        "metrics": metrics,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    if args.detections is not None:
        args.detections.parent.mkdir(parents=True, exist_ok=True)
        args.detections.write_text(json.dumps(predictions.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
