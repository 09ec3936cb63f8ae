"""COCO-format detection data as grounding samples for training (paper §3.5).

Follows Open-GroundingDino's detection pipeline (`datasets/odvg.py`, `config/cfg_odvg.py`): each
image gets a caption of its positive category names and sampled negatives (`grounding.captions`),
and each box is supervised on its category's tokens. Training augmentation: horizontal flip, then
a resize of the short side to a random one of `sizes` (long side <= `max_size`). Deviation: the
reference also picks, half of the time, a random crop between two resizes; we leave it out.

Robustness: images and annotations that cannot be used are reported with `logging.warning` and
skipped, never raised, so one bad file does not end an epoch. Malformed annotations are dropped
when the dataset is built (`grounding.dataset_annotations`); an unreadable image makes
`__getitem__` return None, which `collate` drops (a batch left empty collates to None, which the
training loop skips).

Reproducibility: a sample's randomness (negatives, order, flip, size) comes from a generator seeded
by (seed, epoch, index), so a resumed run sees exactly the samples of an uninterrupted one. Call
`set_epoch` before creating each epoch's DataLoader iterator (workers copy the dataset then; with
`persistent_workers=True` they would keep the old epoch).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from grounding.captions import CaptionBuilder, distractor_vocabulary
from grounding.dataset_annotations import large_enough, read_categories, read_records
from grounding.targets import DetectionTarget
from grounding.transforms import batch_images, preprocess

logger = logging.getLogger(__name__)

MULTI_SCALE_SIZES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
# Problems listed one by one in the log before the rest are only counted.
_MAX_LOGGED = 20


def load_image(
    path: str | os.PathLike,
    expected_size: tuple[int, int] | None = None,
) -> Image.Image:
    """An RGB image, turned upright by its EXIF orientation.

    When the upright image's size differs from `expected_size` (the annotation file's) but the
    stored pixels' size matches it, the annotations were made on the stored pixels, which are
    then returned unrotated.

    Args:
        path: the image file.
        expected_size: (width, height) from the annotation file, or None.

    Raises:
        OSError, ValueError: unreadable, corrupt, or neither orientation has `expected_size`.
    """
    with Image.open(path) as opened:
        opened.load()
        upright = ImageOps.exif_transpose(opened)
        if expected_size is not None and upright.size != expected_size:
            if opened.size != expected_size:
                raise ValueError(
                    f"the image is {opened.size[0]} x {opened.size[1]} pixels, "
                    f"the annotations say {expected_size[0]} x {expected_size[1]}"
                )
            upright = opened
        return upright.convert("RGB")


@dataclass
class GroundingSample:
    """One image with its caption and target.

    Attributes:
        pixels: (3, H, W) float32, resized and ImageNet-normalised.
        input_ids: (n,) int64, the caption's tokens, [CLS] ... [SEP].
        target: boxes cx, cy, w, h normalised to the resized image; positive maps over the caption.
        image_id: the COCO image id.
        original_size: (width, height) of the image file (upright).
        caption: the caption text.
        phrase_spans: [start, end) token indices of each phrase, in caption order.
        phrase_category_ids: the category id each phrase names.
    """

    pixels: Tensor
    input_ids: Tensor
    target: DetectionTarget
    image_id: int
    original_size: tuple[int, int]
    caption: str
    phrase_spans: list[tuple[int, int]]
    phrase_category_ids: list[int]


@dataclass
class GroundingBatch:
    """A padded batch of samples (see `collate`).

    Attributes:
        pixels: (B, 3, H, W) float32, zero-padded bottom/right.
        padding_mask: (B, H, W) bool, True on padding; None when no image is padded.
        input_ids: (B, n) int64, padded with the tokenizer's pad id to the longest caption.
        token_mask: (B, n) bool, True on real tokens (the tokenizer's attention mask).
        targets: per image; positive maps are max_text_len wide.
        image_ids, original_sizes (width, height), captions: per image.
        phrase_spans, phrase_category_ids: per image, per phrase (see `GroundingSample`).
    """

    pixels: Tensor
    padding_mask: Tensor | None
    input_ids: Tensor
    token_mask: Tensor
    targets: list[DetectionTarget]
    image_ids: list[int]
    original_sizes: list[tuple[int, int]]
    captions: list[str]
    phrase_spans: list[list[tuple[int, int]]]
    phrase_category_ids: list[list[int]]

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def to(self, device: torch.device | str) -> GroundingBatch:
        """The tensors moved to `device` (lists of Python values stay as they are)."""
        return GroundingBatch(
            self.pixels.to(device),
            None if self.padding_mask is None else self.padding_mask.to(device),
            self.input_ids.to(device),
            self.token_mask.to(device),
            [target.to(device) for target in self.targets],
            self.image_ids,
            self.original_sizes,
            self.captions,
            self.phrase_spans,
            self.phrase_category_ids,
        )


class CocoGroundingDataset(Dataset):
    """A COCO detection file as grounding samples.

    Crowd annotations are skipped, boxes are clipped to the image and boxes with a side of at most
    one pixel are skipped. Segmentations are ignored (Grounding DINO trains on boxes only).

    Caption length: at most `max_text_len` tokens. Negatives are dropped first; if the image's
    positive categories alone do not fit, the last ones in the shuffled order are dropped together
    with their boxes (see `CaptionBuilder.sample`).

    Args:
        image_dir: folder that `file_name` of each image is relative to.
        annotation_file: COCO JSON (images, annotations with `bbox` x, y, w, h in pixels,
            categories with `name`).
        tokenizer: a BERT tokenizer (bert-base-uncased for the official models).
        train: random negatives, order, flip and size per (seed, epoch, index); otherwise the
            negatives and order depend on (seed, index) only, with no flip and the largest size.
        max_text_len: the most caption tokens, [CLS] and [SEP] included (the model's).
        negatives: how many absent categories each caption names (fewer when fewer exist).
            Open-GroundingDino fills captions to 50 names in all, about the same for COCO.
        distractors: how many phrases of random vocabulary words each training caption also
            names (`grounding.captions`; none in evaluation): for datasets of few categories.
        sizes: short sides to pick from; default `MULTI_SCALE_SIZES` for training, (800,) for
            evaluation (which uses the largest).
        max_size: the longest side after resizing.
        flip_prob: probability of a horizontal flip (training only).
        seed: base seed of every sample's randomness.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        tokenizer,
        *,
        train: bool,
        max_text_len: int = 256,
        negatives: int = 50,
        distractors: int = 0,
        sizes: Sequence[int] | None = None,
        max_size: int = 1333,
        flip_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.train = train
        self.negatives = negatives
        self.distractors = distractors if train else 0
        self.sizes = tuple(sizes) if sizes else (MULTI_SCALE_SIZES if train else (800,))
        self.max_size = max_size
        self.flip_prob = flip_prob
        self.seed = seed
        self.epoch = 0
        with open(annotation_file, encoding="utf-8") as handle:
            coco = json.load(handle)
        problems: list[str] = []
        self.categories = read_categories(coco.get("categories", []), problems)
        self.records = read_records(coco, set(self.categories), problems)
        for message in problems[:_MAX_LOGGED]:
            logger.warning("%s: %s", annotation_file, message)
        if len(problems) > _MAX_LOGGED:
            logger.warning(
                "%s: %d more problems skipped", annotation_file, len(problems) - _MAX_LOGGED
            )
        words = (
            distractor_vocabulary(tokenizer, list(self.categories.values()))
            if self.distractors > 0
            else ()
        )
        self.captions = CaptionBuilder(self.categories, tokenizer, max_text_len, words)
        self.max_text_len = max_text_len
        self.pad_token_id = tokenizer.pad_token_id

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random samples `__getitem__` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> GroundingSample | None:
        """The sample of image `index`, or None (with a warning) when its file is unusable."""
        record = self.records[index]
        index %= len(self.records)  # a negative index seeds as its positive twin
        path = self.image_dir / record.file_name
        try:
            image = load_image(path, record.size)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            logger.warning("skipping image %d (%s): %s", record.image_id, path, error)
            return None
        width, height = image.size
        boxes = record.boxes.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = large_enough(boxes)
        boxes, category_ids = boxes[keep], record.category_ids[keep]

        entropy = (self.seed, self.epoch, index) if self.train else (self.seed, index)
        rng = np.random.default_rng(entropy)
        caption = self.captions.sample(category_ids.tolist(), self.negatives, rng, self.distractors)
        spans = dict(zip(caption.category_ids, caption.phrase_spans, strict=True))
        keep = np.array([int(cid) in spans for cid in category_ids], dtype=bool)
        boxes, category_ids = boxes[keep], category_ids[keep]

        if self.train and rng.random() < self.flip_prob:
            image = ImageOps.mirror(image)
            boxes = np.stack(
                [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1
            )
        size = int(rng.choice(self.sizes)) if self.train else max(self.sizes)
        pixels = preprocess(image, size, self.max_size)

        positive_map = torch.zeros(len(boxes), self.max_text_len, dtype=torch.bool)
        for row, cid in enumerate(category_ids.tolist()):
            start, end = spans[cid]
            positive_map[row, start:end] = True
        # Normalised to the image, so unchanged by the resize (which stretches both axes).
        scale = np.array([width, height, width, height], dtype=np.float32)
        x0, y0, x1, y1 = (boxes / scale).T
        normalised = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=1)
        target = DetectionTarget(
            torch.from_numpy(normalised.astype(np.float32)).reshape(-1, 4),
            positive_map,
            torch.from_numpy(category_ids.astype(np.int64)),
        )
        return GroundingSample(
            pixels,
            torch.tensor(caption.input_ids, dtype=torch.long),
            target,
            record.image_id,
            (width, height),
            caption.text,
            caption.phrase_spans,
            caption.category_ids,
        )


def collate(
    samples: Sequence[GroundingSample | None],
    pad_token_id: int = 0,
) -> GroundingBatch | None:
    """Batch samples, dropping the Nones (unreadable images); None when none is left.

    Args:
        samples: from `CocoGroundingDataset.__getitem__`.
        pad_token_id: id that pads shorter captions (`dataset.pad_token_id`; 0 in
            bert-base-uncased).
    """
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        return None
    pixels, padding_mask = batch_images([sample.pixels for sample in kept])
    length = max(sample.input_ids.shape[0] for sample in kept)
    input_ids = torch.full((len(kept), length), pad_token_id, dtype=torch.long)
    token_mask = torch.zeros(len(kept), length, dtype=torch.bool)
    for row, sample in enumerate(kept):
        input_ids[row, : sample.input_ids.shape[0]] = sample.input_ids
        token_mask[row, : sample.input_ids.shape[0]] = True
    return GroundingBatch(
        pixels=pixels,
        padding_mask=padding_mask if bool(padding_mask.any()) else None,
        input_ids=input_ids,
        token_mask=token_mask,
        targets=[sample.target for sample in kept],
        image_ids=[sample.image_id for sample in kept],
        original_sizes=[sample.original_size for sample in kept],
        captions=[sample.caption for sample in kept],
        phrase_spans=[sample.phrase_spans for sample in kept],
        phrase_category_ids=[sample.phrase_category_ids for sample in kept],
    )
