"""`ModelRunner`: calls Grounding DINO and SAM for what `ResultCache` lacks, and caches it.

Not thread-safe on its own: `GroundedSAM` calls it under its lock (one model call at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np

from grounding import Detector, RawPrediction
from grounding.predictor import EncodedImage
from segmentation.look_ahead import BACKGROUND_CHUNK, LookAheadJob
from segmentation.result_cache import MaskEntry, ResultCache
from segmentation.results import CacheMiss
from segmentation.sam import BoxSegmenter, ImageEmbedding


@dataclass
class PipelineStats:
    """How often each model ran (for tests and benchmarks)."""

    detector_runs: int = 0  # Detector.infer calls
    image_encodings: int = 0  # Detector.encode calls (the detector's image encoder, CPU only)
    image_embeddings: int = 0  # SAM image encoder runs
    segment_calls: int = 0  # BoxSegmenter.segment calls (mask decoder) for requests
    boxes_decoded: int = 0  # boxes decoded for requests (shown or prefetched synchronously)
    background_boxes_decoded: int = 0  # boxes decoded ahead by the background thread


class ModelRunner:
    """The detector and SAM behind a `ResultCache`; `cache_only` calls raise CacheMiss instead of
    running a model."""

    def __init__(self, detector: Detector, segmenter: BoxSegmenter, cache: ResultCache) -> None:
        self.detector = detector
        self.segmenter = segmenter
        self.cache = cache
        self.stats = PipelineStats()

    def raw_prediction(
        self, pixels: np.ndarray, image_key: str, caption: str, cache_only: bool
    ) -> tuple[RawPrediction, bool]:
        """The detector's raw outputs, and whether the detector just ran for them."""
        raw = self.cache.raw(image_key, caption)
        if raw is not None:
            return raw, False
        if cache_only:
            raise CacheMiss("the detector would have to run")
        raw = self.detector.infer(pixels, caption, encoded=self.encoded_image(pixels, image_key))
        self.stats.detector_runs += 1
        self.cache.put_raw(image_key, caption, raw)
        return raw, True

    def encoded_image(self, pixels: np.ndarray, image_key: str) -> EncodedImage | None:
        """The detector's image features of `pixels`, cached, so that a new prompt on the same
        image skips the image encoder (1.5 s of a 4.7 s SwinT run at 800 x 1200 on 2 CPU
        cores; ~40 MB). On the CPU only: on a GPU it costs milliseconds, and the cache would
        hold device memory (and on ZeroGPU travel back from the GPU worker); None there."""
        if self.detector.device.type != "cpu":
            return None
        encoded = self.cache.encoded_image(image_key)
        if encoded is None:
            encoded = self.detector.encode(pixels)
            self.stats.image_encodings += 1
            self.cache.put_encoded_image(image_key, encoded)
        return encoded

    def embedding(self, pixels: np.ndarray, image_key: str, cache_only: bool) -> ImageEmbedding:
        embedding = self.cache.embedding(image_key)
        if embedding is None:
            if cache_only:
                raise CacheMiss("SAM's image encoder would have to run")
            embedding = self.segmenter.embed(pixels)
            self.stats.image_embeddings += 1
            self.cache.put_embedding(image_key, embedding)
        return embedding

    def boxes_below(
        self,
        raw: RawPrediction,
        thresholds: tuple[float, float, float | None],
        margin: float,
        limit: int,
    ) -> np.ndarray:
        """(K, 4) the best `limit` boxes that the box threshold drops, scoring at most `margin`
        below it, best first (`thresholds`: box, text, NMS)."""
        if not limit:
            return np.zeros((0, 4), np.float32)
        box_threshold, text_threshold, nms_threshold = thresholds
        floor = max(0.0, box_threshold - margin)
        nearby = self.detector.select(raw, floor, text_threshold, nms_threshold)
        return nearby.boxes[nearby.scores <= box_threshold][:limit]

    def masks(
        self,
        image_key: str,
        embedding: ImageEmbedding,
        boxes: np.ndarray,
        prefetch: np.ndarray,
        cache_only: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) bool masks and (N,) scores of `boxes`, decoding, in one call, the boxes not
        in the cache and the `prefetch` boxes not in the cache (those only to cache them)."""
        found = [self.cache.mask(image_key, box) for box in boxes]
        missing = [index for index, entry in enumerate(found) if entry is None]
        extra = [box for box in prefetch if not self.cache.has_mask(image_key, box)]
        if missing and cache_only:
            raise CacheMiss("SAM's mask decoder would have to run")
        if missing or extra:
            self.segmenter.use(embedding)
            # One dtype for all, so that the cache keys (the boxes' bytes) match later lookups.
            wanted = np.concatenate([boxes[missing], np.reshape(extra, (-1, 4))]).astype(
                boxes.dtype
            )
            new_masks, new_scores = self.segmenter.segment(wanted)
            self.stats.segment_calls += 1
            self.stats.boxes_decoded += len(wanted)
            entries = [
                MaskEntry.of(mask, float(score))
                for mask, score in zip(new_masks, new_scores, strict=True)
            ]
            for box, entry in zip(wanted, entries, strict=True):
                self.cache.put_mask(image_key, box, entry)
            for index, entry in zip(missing, entries, strict=False):  # extras come last
                found[index] = entry
        filled = cast(list[MaskEntry], found)  # every None was decoded above
        height, width = embedding.original_size
        masks = np.zeros((len(boxes), height, width), dtype=bool)
        for mask, entry in zip(masks, filled, strict=True):
            entry.paste(mask)
        scores = np.array([entry.score for entry in filled], dtype=np.float32)
        return masks, scores

    def decode_ahead(self, job: LookAheadJob, limit: int, margin: float) -> bool:
        """Decode the next BACKGROUND_CHUNK uncached boxes of `job` (up to `limit` boxes at most
        `margin` below its box threshold); True when none are left."""
        if job.boxes is None:
            job.boxes = self.boxes_below(job.raw, job.thresholds, margin, limit)
        chunk: list[np.ndarray] = []
        while job.done < len(job.boxes) and len(chunk) < BACKGROUND_CHUNK:
            box = job.boxes[job.done]
            job.done += 1
            if not self.cache.has_mask(job.image_key, box):
                chunk.append(box)
        if chunk:
            self.segmenter.use(job.embedding)
            masks, scores = self.segmenter.segment(np.stack(chunk))
            self.stats.background_boxes_decoded += len(chunk)
            for box, mask, score in zip(chunk, masks, scores, strict=True):
                self.cache.put_mask(job.image_key, box, MaskEntry.of(mask, float(score)))
        return job.done >= len(job.boxes)
