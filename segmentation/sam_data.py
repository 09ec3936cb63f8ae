"""The small SAM's data: COCO folders of box -> mask annotations, the training dataset and its
batches, the training forward pass (`predict_masks`) and the mask-IoU evaluation
(`evaluate_mask_iou`).

Data: any COCO folder, `DIR/annotations.json` with `bbox` (x, y, w, h) and `segmentation`
(polygons, RLE or compressed RLE); image `file_name`s are looked up under `DIR/images`, then
`DIR`. Unusable annotations (crowd, no mask, box under 1 px) are dropped, unreadable images
skipped, each with a warning.

Samples are in the model's input frame, preprocessed as `SamPredictor` and `Sam.preprocess` do.
Training samples draw a random subset of an image's boxes and jitter them (paper App. A): each
coordinate moves by noise with a standard deviation of 10 % of the box side (width for x, height
for y), at most 20 pixels of SAM's 1024 frame, i.e. 20 x image_size / 1024 in the input frame
(5 px at 256). That randomness comes from (seed, epoch, index).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor
from torch.utils.data import Dataset

from grounding.dataset import load_image
from segmentation.sam import BoxSegmenter
from segmentation.sam_losses import mask_iou
from segmentation.small_sam import SmallSamConfig

logger = logging.getLogger(__name__)

# SAM's maximal box jitter, in pixels of its 1024-pixel input frame.
MAX_JITTER_AT_1024 = 20.0
_MAX_LOGGED = 20


@dataclass
class ImageEntry:
    """One image's usable annotations: boxes (K, 4) x0, y0, x1, y1 in its pixels, and their COCO
    `segmentation` values in the same order."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    segmentations: list


def read_coco_folder(folder: str | os.PathLike) -> list[ImageEntry]:
    """The images of `folder/annotations.json` that have at least one usable mask annotation."""
    folder = Path(folder)
    coco = json.loads((folder / "annotations.json").read_text(encoding="utf-8"))
    image_dir = folder / "images" if (folder / "images").is_dir() else folder
    problems: list[str] = []
    per_image: dict[int, list[dict]] = {}
    for annotation in coco.get("annotations", []):
        box = annotation.get("bbox")
        if annotation.get("iscrowd") or not annotation.get("segmentation"):
            problems.append(f"annotation {annotation.get('id')}: crowd or no segmentation")
        elif not (isinstance(box, list) and len(box) == 4 and min(box[2:]) >= 1):
            problems.append(f"annotation {annotation.get('id')}: bbox {box} is under 1 pixel")
        else:
            per_image.setdefault(annotation["image_id"], []).append(annotation)
    entries = []
    for image in coco.get("images", []):
        annotations = []
        for annotation in per_image.get(image["id"], []):
            problem = _segmentation_problem(annotation["segmentation"], image)
            if problem:
                problems.append(f"annotation {annotation.get('id')}: {problem}")
            else:
                annotations.append(annotation)
        if not annotations:
            continue
        path = image_dir / image["file_name"]
        if not path.exists() and (folder / image["file_name"]).exists():
            path = folder / image["file_name"]
        boxes = np.array([a["bbox"] for a in annotations], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # (x, y, w, h) -> (x0, y0, x1, y1)
        entries.append(
            ImageEntry(
                image["id"],
                path,
                image["width"],
                image["height"],
                boxes,
                [a["segmentation"] for a in annotations],
            )
        )
    for problem in problems[:_MAX_LOGGED]:
        logger.warning("%s: %s", folder, problem)
    if len(problems) > _MAX_LOGGED:
        logger.warning("%s: %d more annotations skipped", folder, len(problems) - _MAX_LOGGED)
    return entries


def _segmentation_problem(segmentation, image: dict) -> str | None:
    """Why pycocotools could not decode `segmentation` for `image`, or None."""
    if isinstance(segmentation, list):
        if all(
            isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
            for polygon in segmentation
        ):
            return None
        return "a polygon with fewer than 3 points or an odd number of coordinates"
    if not (isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list | str)):
        return "the segmentation is neither polygons nor RLE"
    if list(segmentation.get("size", [])) != [image["height"], image["width"]]:
        return f"the RLE's size {segmentation.get('size')} is not the image's"
    return None


def annotation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """(height, width) bool mask (True = object) of a COCO polygon list, RLE or compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():  # pycocotools 2.0.x under NumPy 2 (as segmentation.export)
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


@dataclass
class MaskSample:
    """One image in the model's input frame.

    Attributes:
        pixels: (3, S, S) float, resized (long side S), normalised and zero-padded as
            `Sam.preprocess` does.
        boxes: (K, 4) float x0, y0, x1, y1 in the resized image's pixels.
        masks: (K, S, S) bool, the ground truth in the same frame (False in the padding).
        input_size: (h, w) of the resized image before padding.
    """

    image_id: int
    pixels: Tensor
    boxes: Tensor
    masks: Tensor
    input_size: tuple[int, int]


class SamMaskDataset(Dataset):
    """Box -> mask samples of a COCO folder; unreadable images give None (with a warning).

    Args:
        folder: a COCO folder (see the module docstring).
        config: the model's sizes and pixel statistics.
        masks_per_image: at most this many annotations per image (a random subset in training).
        train: jitter the boxes and draw the subset; otherwise the first annotations, unjittered.
        seed: with the epoch and the index, seeds each sample's randomness.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        config: SmallSamConfig,
        *,
        masks_per_image: int = 8,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        self.entries = read_coco_folder(folder)
        self.config, self.masks_per_image = config, masks_per_image
        self.train, self.seed, self.epoch = train, seed, 0
        self.transform = ResizeLongestSide(config.image_size)
        self.max_jitter = MAX_JITTER_AT_1024 * config.image_size / 1024

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> MaskSample | None:
        entry, size = self.entries[index], self.config.image_size
        try:
            image = np.asarray(load_image(entry.path, (entry.width, entry.height)))
        except (OSError, ValueError) as error:
            logger.warning("skipping image %d (%s): %s", entry.image_id, entry.path, error)
            return None
        rng = np.random.default_rng((self.seed, self.epoch, index))
        count = min(len(entry.boxes), self.masks_per_image)
        chosen = (
            np.sort(rng.choice(len(entry.boxes), count, replace=False))
            if self.train
            else np.arange(count)
        )
        resized = self.transform.apply_image(image)  # (h, w, 3) uint8, as SamPredictor
        height, width = resized.shape[:2]
        pixels = torch.from_numpy(resized).permute(2, 0, 1).float()  # (3, h, w)
        mean = torch.tensor(self.config.pixel_mean).view(3, 1, 1)
        std = torch.tensor(self.config.pixel_std).view(3, 1, 1)
        pixels = F.pad((pixels - mean) / std, (0, size - width, 0, size - height))
        masks = torch.stack(
            [
                torch.from_numpy(annotation_mask(entry.segmentations[i], entry.height, entry.width))
                for i in chosen
            ]
        )  # (K, H, W)
        masks = F.interpolate(masks[:, None].float(), (height, width), mode="area")[:, 0] >= 0.5
        masks = F.pad(masks, (0, size - width, 0, size - height))  # (K, S, S)
        boxes = self.transform.apply_boxes(entry.boxes[chosen], (entry.height, entry.width))
        if self.train:
            boxes = self._jitter(boxes, rng)
        boxes = np.clip(boxes, 0, [width, height, width, height])
        return MaskSample(
            entry.image_id,
            pixels,
            torch.as_tensor(boxes, dtype=torch.float32),
            masks,
            (height, width),
        )

    def _jitter(self, boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sides = np.tile(boxes[:, 2:] - boxes[:, :2], 2)  # (K, 4): w, h, w, h
        noise = np.clip(
            rng.normal(0.0, 0.1, boxes.shape) * sides, -self.max_jitter, self.max_jitter
        )
        jittered = boxes + noise
        # Keep x0 < x1 and y0 < y1 whatever the noise did.
        return np.concatenate(
            [
                np.minimum(jittered[:, :2], jittered[:, 2:]),
                np.maximum(jittered[:, :2], jittered[:, 2:]),
            ],
            axis=1,
        )


@dataclass
class MaskBatch:
    """Samples stacked: pixels (B, 3, S, S); per image, boxes (K_i, 4) and masks (K_i, S, S)."""

    image_ids: list[int]
    pixels: Tensor
    boxes: list[Tensor]
    masks: list[Tensor]
    input_sizes: list[tuple[int, int]]

    def valid_mask(self) -> Tensor:
        """(M, S, S) bool, True inside each mask's image (False = padding), M = sum K_i."""
        size = self.pixels.shape[-1]
        valid = torch.zeros(sum(len(b) for b in self.boxes), size, size, dtype=torch.bool)
        start = 0
        for boxes, (height, width) in zip(self.boxes, self.input_sizes, strict=True):
            valid[start : start + len(boxes), :height, :width] = True
            start += len(boxes)
        return valid


def collate(samples: list[MaskSample | None]) -> MaskBatch | None:
    """A batch of the readable samples, or None when there is none."""
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        return None
    return MaskBatch(
        [s.image_id for s in kept],
        torch.stack([s.pixels for s in kept]),
        [s.boxes for s in kept],
        [s.masks for s in kept],
        [s.input_size for s in kept],
    )


def predict_masks(sam: Sam, pixels: Tensor, boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """`Sam.forward` with gradients, one mask per box, logits upscaled to the input square.

    Args:
        pixels: (B, 3, S, S) float, preprocessed.
        boxes: B tensors (K_i, 4), x0, y0, x1, y1 in the input frame.

    Returns:
        logits (M, S, S) float and IoU predictions (M,), M = sum K_i, in box order.
    """
    embeddings = sam.image_encoder(pixels)  # (B, C, S / patch, S / patch)
    image_pe = sam.prompt_encoder.get_dense_pe()
    all_logits, all_iou = [], []
    for embedding, image_boxes in zip(embeddings, boxes, strict=True):
        sparse, dense = sam.prompt_encoder(points=None, boxes=image_boxes, masks=None)
        low_res, iou = sam.mask_decoder(  # (K, 1, 4g, 4g), (K, 1)
            image_embeddings=embedding[None],
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        all_logits.append(low_res)
        all_iou.append(iou[:, 0])
    size = sam.image_encoder.img_size
    logits = F.interpolate(
        torch.cat(all_logits), (size, size), mode="bilinear", align_corners=False
    )  # (M, 1, S, S)
    return logits[:, 0], torch.cat(all_iou)


def evaluate_mask_iou(
    sam: Sam,
    folder: str | os.PathLike | list[ImageEntry],
    *,
    max_images: int | None = None,
    progress: bool = False,
) -> dict:
    """Mean mask IoU from the ground-truth boxes, through `BoxSegmenter` (the app's path).

    Masks are compared at each image's own resolution. `sam` is left in eval mode.

    Args:
        folder: a COCO folder, or its `read_coco_folder` entries.

    Returns:
        {"mean_iou": float or None, "masks": M, "images": images used, "skipped_images": n}.
    """
    from tqdm import tqdm

    entries = (folder if isinstance(folder, list) else read_coco_folder(folder))[:max_images]
    segmenter = BoxSegmenter(sam)
    ious: list[float] = []
    skipped = 0
    for entry in tqdm(
        entries, desc="mask IoU", unit="image", disable=not progress, file=sys.stderr
    ):
        try:
            image = np.asarray(load_image(entry.path, (entry.width, entry.height)))
        except (OSError, ValueError) as error:
            logger.warning("skipping image %d (%s): %s", entry.image_id, entry.path, error)
            skipped += 1
            continue
        segmenter.set_image(image)
        predicted, _ = segmenter.segment(entry.boxes)
        truth = np.stack(
            [annotation_mask(s, entry.height, entry.width) for s in entry.segmentations]
        )
        ious += mask_iou(torch.from_numpy(predicted), torch.from_numpy(truth)).tolist()
    return {
        "mean_iou": float(np.mean(ious)) if ious else None,
        "masks": len(ious),
        "images": len(entries) - skipped,
        "skipped_images": skipped,
    }
