"""COCO evaluation, the inference: every category of a dataset scored on every image.

Protocol, as the reference's `demo/test_ap_on_coco.py` (IDEA-Research/GroundingDINO):
- one prompt naming every category in the file's order, `" . ".join(names) + " ."`;
- the reference resize (short side 800, long side <= 1333);
- a (query, category) score is the mean probability of the category's tokens, and the 300 best
  pairs of an image are its detections (so one query may propose several categories).

A prompt over `max_text_len` tokens (LVIS, say) is split at phrase boundaries into several text
passes over one image encoding, as `Detector.infer` does, so every category is scored.
`grounding.evaluate_metrics` computes COCO AP of the detections; `grounding.evaluate` is the
command line.
"""

from __future__ import annotations

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
from grounding.dataset import load_image
from grounding.evaluate_metrics import read_annotations
from grounding.predictor import Detector, RawPrediction, split_caption_tokens
from grounding.text_masks import phrase_token_spans, sub_sentence_masks
from grounding.transforms import batch_images, preprocess

logger = logging.getLogger(__name__)


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
