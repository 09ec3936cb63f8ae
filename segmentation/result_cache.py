"""`ResultCache`: what `GroundedSAM` keeps, typed, within one byte budget.

- per (image, prompt): the detector's raw outputs (every query's box and token scores);
- per image: SAM's image embedding, and the detector's image features (on the CPU);
- per (image, box): the decoded mask, cropped to its True pixels, and SAM's score.

Images are keyed by `image_key`, a hash of their pixels, so the same picture uploaded twice is
recognised. The least recently used entries go first; every method takes the cache's own lock
(`ByteLRU`'s), so a background thread may store masks while a request reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grounding import RawPrediction
from grounding.predictor import EncodedImage
from segmentation.cache import ByteLRU
from segmentation.masks import true_window
from segmentation.sam import ImageEmbedding

DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class MaskEntry:
    """One decoded mask, stored as the crop of its True pixels."""

    top: int
    left: int
    crop: np.ndarray  # (h, w) bool
    score: float
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.crop.nbytes + 64

    @classmethod
    def of(cls, mask: np.ndarray, score: float) -> MaskEntry:
        """The entry of an (H, W) bool mask."""
        window = true_window(mask)
        if window is None:
            return cls(0, 0, np.zeros((0, 0), dtype=bool), score)
        rows, columns = window
        return cls(rows.start, columns.start, mask[window].copy(), score)

    def paste(self, mask: np.ndarray) -> None:
        """Write this mask into `mask`, an (H, W) bool array of False."""
        height, width = self.crop.shape
        mask[self.top : self.top + height, self.left : self.left + width] = self.crop


def image_key(pixels: np.ndarray) -> str:
    """A content key for an (H, W, 3) uint8 array (about 25 ms for 12 MP)."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).data.cast("B"))
    return digest.hexdigest()


class ResultCache(ByteLRU):
    """Detector outputs, embeddings and masks by key, least recently used out beyond `max_bytes`
    (about 1 MB per (image, prompt), 4 MB per SAM embedding, ~40 MB of detector features per
    image at 800 x 1200, at most H x W bytes per mask).

    `recording()` lists what is stored meanwhile and `adopt` stores such a list, to copy what a
    forked process computed into its parent's cache.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(max_bytes)

    def raw(self, image: str, caption: str) -> RawPrediction | None:
        return self.get(("raw", image, caption))

    def put_raw(self, image: str, caption: str, raw: RawPrediction) -> None:
        size = sum(logits.nbytes + boxes.nbytes for _, logits, boxes in raw.chunks)
        self.put(("raw", image, caption), raw, size)

    def encoded_image(self, image: str) -> EncodedImage | None:
        return self.get(("encoded", image))

    def put_encoded_image(self, image: str, encoded: EncodedImage) -> None:
        self.put(("encoded", image), encoded, encoded.nbytes)

    def embedding(self, image: str) -> ImageEmbedding | None:
        return self.get(("embedding", image))

    def put_embedding(self, image: str, embedding: ImageEmbedding) -> None:
        self.put(("embedding", image), embedding, embedding.nbytes)

    def mask(self, image: str, box: np.ndarray) -> MaskEntry | None:
        """The mask of `box` (keyed by its bytes: look up with the dtype it was stored with)."""
        return self.get(("mask", image, box.tobytes()))

    def has_mask(self, image: str, box: np.ndarray) -> bool:
        return ("mask", image, box.tobytes()) in self

    def put_mask(self, image: str, box: np.ndarray, entry: MaskEntry) -> None:
        self.put(("mask", image, box.tobytes()), entry, entry.nbytes)

    def adopt(self, entries: list[tuple[Hashable, Any, int]]) -> None:
        """Store entries listed by `recording()` (of this cache or another one)."""
        for key, value, nbytes in entries:
            self.put(key, value, nbytes)
