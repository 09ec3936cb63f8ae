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

`predict_dataset` and `evaluate_predictions` hold the computation, for use by a training loop.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from grounding.box_ops import box_cxcywh_to_xyxy
from grounding.captions import category_prompt
from grounding.dataset import annotation_problem, load_image
from grounding.predictor import Detector, RawPrediction, split_caption_tokens
from grounding.text_masks import phrase_token_spans, sub_sentence_masks
from grounding.transforms import batch_images, preprocess

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


@dataclass
class Predictions:
    """Detections of a dataset in COCO results format.

    Attributes:
        results: {"image_id", "category_id", "bbox": [x, y, w, h] in original pixels, "score"}.
        image_ids: the images that were run (the ones to evaluate on).
        skipped_image_ids: images that could not be read (reported, not evaluated).
        prompt: the caption naming every category.
    """

    results: list[dict]
    image_ids: list[int]
    skipped_image_ids: list[int]
    prompt: str


def read_annotations(annotations: str | os.PathLike | dict) -> dict:
    """A COCO annotation dict from a path or a dict (which is returned as is)."""
    if isinstance(annotations, dict):
        return annotations
    with open(annotations, encoding="utf-8") as handle:
        return json.load(handle)


@torch.inference_mode()
def infer_batch(
    detector: Detector,
    images: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    caption: str,
) -> list[RawPrediction]:
    """`Detector.infer` for a batch of images with one caption.

    Args:
        images: (3, H_i, W_i) float32, resized and normalised (`transforms.preprocess`).
        image_sizes: (width, height) of each original image.
        caption: the prompt, already normalised (lower case, ending in ".").

    Returns:
        one RawPrediction per image; a caption over max_text_len tokens gives several chunks.
    """
    pixels, full_mask = batch_images(list(images))
    padding_mask = full_mask if bool(full_mask.any()) else None
    model, device = detector.model, detector.device
    features = model.encode_image(
        pixels.to(device), None if padding_mask is None else padding_mask.to(device)
    )
    token_ids = detector.tokenizer(caption)["input_ids"]
    chunks: list[list[tuple[list[int], Tensor, Tensor]]] = [[] for _ in images]
    for ids in split_caption_tokens(token_ids, detector.max_text_len, detector.separator_ids):
        input_ids = torch.tensor([ids] * len(images), device=device)  # (B, n), same caption
        token_mask = torch.ones_like(input_ids, dtype=torch.bool)
        text_masks = sub_sentence_masks(input_ids, token_mask, detector.special_token_ids)
        output = model.ground(features, input_ids, token_mask, text_masks=text_masks)
        for row in range(len(images)):
            chunks[row].append(
                (ids, output.logits[row].float().cpu(), output.boxes[row].float().cpu())
            )
    return [
        RawPrediction(chunks=image_chunks, image_size=(width, height))
        for image_chunks, (width, height) in zip(chunks, image_sizes, strict=True)
    ]


def category_detections(
    raw: RawPrediction,
    phrase_category_ids: Sequence[int],
    special_token_ids: Sequence[int],
    image_id: int,
    *,
    max_detections: int = 300,
    score_threshold: float = 0.0,
) -> list[dict]:
    """The best (query, category) pairs of one image as COCO results.

    A pair's score is the mean sigmoid probability of the category's tokens (the reference's
    normalised positive map).

    Args:
        raw: the image's outputs for the all-category prompt.
        phrase_category_ids: the category id of each phrase of the prompt, in order.
        special_token_ids: [CLS], [SEP], "." and "?" ids (`Detector.special_token_ids`).
        max_detections: pairs kept, best first.
        score_threshold: pairs must score above this.

    Raises:
        ValueError: the prompt's phrases do not match `phrase_category_ids` one to one.
    """
    score_parts: list[Tensor] = []
    box_parts: list[Tensor] = []
    phrase_parts: list[Tensor] = []
    offset = 0
    for ids, logits, chunk_boxes in raw.chunks:
        spans = phrase_token_spans(ids, special_token_ids)
        token_weights = torch.zeros(len(spans), logits.shape[1])  # (P, T)
        for index, (start, end) in enumerate(spans):
            token_weights[index, start:end] = 1.0 / (end - start)
        pair_scores = logits.float().sigmoid() @ token_weights.T  # (Q, P)
        queries = pair_scores.shape[0]
        score_parts.append(pair_scores.flatten())  # (Q * P,), query-major
        box_parts.append(chunk_boxes[:, None].expand(queries, len(spans), 4).reshape(-1, 4))
        phrase_parts.append((torch.arange(len(spans)) + offset).repeat(queries))
        offset += len(spans)
    if offset != len(phrase_category_ids):
        raise ValueError(
            f"the prompt has {offset} phrases for {len(phrase_category_ids)} categories"
        )
    scores, boxes, phrases = torch.cat(score_parts), torch.cat(box_parts), torch.cat(phrase_parts)
    best = scores.topk(min(max_detections, scores.numel())).indices
    best = best[scores[best] > score_threshold]
    width, height = raw.image_size
    corners = box_cxcywh_to_xyxy(boxes[best]) * torch.tensor([width, height, width, height])
    corners[:, 0::2] = corners[:, 0::2].clamp(0, width)
    corners[:, 1::2] = corners[:, 1::2].clamp(0, height)
    category_ids = torch.tensor(list(phrase_category_ids))[phrases[best]]
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category),
            "bbox": [
                round(float(x0), 2),
                round(float(y0), 2),
                round(float(x1 - x0), 2),
                round(float(y1 - y0), 2),
            ],
            "score": round(float(score), 5),
        }
        for (x0, y0, x1, y1), category, score in zip(
            corners.tolist(), category_ids.tolist(), scores[best].tolist(), strict=True
        )
    ]


class _EvaluationImages(Dataset):
    """(image_id, pixels (3, H, W) or None when unreadable, (width, height)) per image."""

    def __init__(self, image_dir: Path, images: list[dict], size: int, max_size: int) -> None:
        self.image_dir, self.images, self.size, self.max_size = image_dir, images, size, max_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, tuple[int, int]]:
        entry = self.images[index]
        expected = (
            (entry["width"], entry["height"]) if "width" in entry and "height" in entry else None
        )
        path = self.image_dir / entry["file_name"]
        try:
            image = load_image(path, expected)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            logger.warning("skipping image %s (%s): %s", entry["id"], path, error)
            return entry["id"], None, (0, 0)
        return entry["id"], preprocess(image, self.size, self.max_size), image.size


def predict_dataset(
    detector: Detector,
    image_dir: str | os.PathLike,
    annotations: str | os.PathLike | dict,
    *,
    batch_size: int = 1,
    max_images: int | None = None,
    score_threshold: float = 0.0,
    max_detections: int = 300,
    size: int = 800,
    max_size: int = 1333,
    workers: int = 0,
    progress: bool = False,
) -> Predictions:
    """Detections of every category in the dataset's images (in image id order).

    `Detector(model, tokenizer)` wraps a model being trained; it sets the model to eval mode, so
    call `model.train()` again afterwards.

    Args:
        detector: the model and tokenizer, on their device.
        image_dir: folder that the images' `file_name`s are relative to.
        annotations: COCO JSON path or dict (images and categories are read from it).
        batch_size: images per model call (padded; results equal those of single images).
        max_images: only the first this many images (by id).
        score_threshold, max_detections: see `category_detections`.
        size, max_size: the resize (short side, longest side).
        workers: DataLoader processes reading and resizing images.
        progress: show a tqdm bar on stderr.
    """
    from tqdm import tqdm

    coco = read_annotations(annotations)
    categories = coco["categories"]
    prompt = category_prompt([category["name"] for category in categories])
    category_ids = [int(category["id"]) for category in categories]
    images = sorted(coco["images"], key=lambda entry: entry["id"])[:max_images]
    loader = DataLoader(
        _EvaluationImages(Path(image_dir), images, size, max_size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=list,
    )
    results: list[dict] = []
    done: list[int] = []
    skipped: list[int] = []
    with tqdm(
        total=len(images), desc="evaluating", unit="image", disable=not progress, file=sys.stderr
    ) as bar:
        for batch in loader:
            readable = [item for item in batch if item[1] is not None]
            skipped.extend(image_id for image_id, pixels, _ in batch if pixels is None)
            if readable:
                raws = infer_batch(
                    detector, [item[1] for item in readable], [item[2] for item in readable], prompt
                )
                for (image_id, _, _), raw in zip(readable, raws, strict=True):
                    results.extend(
                        category_detections(
                            raw,
                            category_ids,
                            detector.special_token_ids,
                            image_id,
                            max_detections=max_detections,
                            score_threshold=score_threshold,
                        )
                    )
                    done.append(image_id)
            bar.update(len(batch))
    return Predictions(results, done, skipped, prompt)


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
        "--config", default="swint_ogc", help="architecture of a .pth: swint_ogc or swinb_cogcoor"
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
