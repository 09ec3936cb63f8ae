"""Image + prompt + thresholds -> detections with masks, computing nothing twice.

Grounded SAM: Grounding DINO's boxes prompt SAM. What makes the threshold sliders instant is what is
kept, least recently used first out, within one byte budget:

- per (image, prompt): the detector's raw outputs (every query's box and token scores), so new
  thresholds only re-filter them (`Detector.select`, no model call);
- per image: SAM's image embedding, computed on the first run even when nothing is detected, so
  no threshold change ever runs an encoder;
- per (image, box): the decoded mask (cropped to its True pixels) and SAM's score, so only boxes
  that were never decoded go through the mask decoder, all in one batched call.

Lowering the box threshold reveals boxes, and SAM's decoder costs about 0.1 s per box on 2 CPU
cores; so the boxes just below the threshold are decoded ahead: either in the first run of an
(image, prompt) (`prefetch_boxes`, synchronous), or, with `background_boxes`, by a background thread
after every run, best first, one box at a time, giving way to any new request.

Images are keyed by a hash of their pixels, so the same picture uploaded twice is recognised.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from PIL import Image

from grounding import Detections, Detector, RawPrediction
from grounding.predictor import normalize_caption
from segmentation.cache import ByteLRU
from segmentation.images import check_shape, rgb_array
from segmentation.sam import BoxSegmenter, ImageEmbedding

DEFAULT_CACHE_BYTES = 1 << 30
# Prefetched boxes score at most this much below the box threshold.
PREFETCH_MARGIN = 0.1
# Boxes per background decoder call: a request arriving meanwhile waits for at most one call
# (about 0.1 s per box on 2 CPU cores; batching more saves little per box).
BACKGROUND_CHUNK = 1

log = logging.getLogger(__name__)


class CacheMiss(LookupError):
    """`GroundedSAM.run(..., models=False)` would have had to run a model."""


@dataclass
class SegmentedDetections:
    """Detections in one image, each with a mask.

    Attributes:
        boxes: (N, 4) float32, x0, y0, x1, y1 in the image's pixels.
        scores: (N,) float32, the detector's box score (max token probability), descending.
        phrases: N labels, each drawn from one phrase of the prompt.
        phrase_ids: (N,) int64, index of each label's phrase in `prompt_phrases`.
        prompt_phrases: the prompt's phrases, in order.
        masks: (N, H, W) bool at the image's resolution, True = object; mask i belongs to box i.
        mask_scores: (N,) float32, SAM's predicted IoU of each mask.
        omitted: detections above the box threshold left out by `max_detections` (the lowest
            scoring ones).
    """

    boxes: np.ndarray
    scores: np.ndarray
    phrases: list[str]
    phrase_ids: np.ndarray
    prompt_phrases: list[str]
    masks: np.ndarray
    mask_scores: np.ndarray
    omitted: int = 0

    def __len__(self) -> int:
        return len(self.phrases)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the image the masks cover."""
        return self.masks.shape[2], self.masks.shape[1]


@dataclass
class PipelineStats:
    """How often each model ran (for tests and benchmarks)."""

    detector_runs: int = 0  # Detector.infer calls
    image_embeddings: int = 0  # SAM image encoder runs
    segment_calls: int = 0  # BoxSegmenter.segment calls (mask decoder) for requests
    boxes_decoded: int = 0  # boxes decoded for requests (shown or prefetched synchronously)
    background_boxes_decoded: int = 0  # boxes decoded ahead by the background thread


@dataclass
class _Mask:
    """One decoded mask, stored as the crop of its True pixels."""

    top: int
    left: int
    crop: np.ndarray  # (h, w) bool
    score: float
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.crop.nbytes + 64


@dataclass
class _Lookahead:
    """Boxes below the threshold of the latest run, to decode in the background."""

    image_key: str
    raw: RawPrediction
    embedding: ImageEmbedding
    thresholds: tuple[float, float, float | None]  # box, text, NMS
    order: int = 0  # when its run took the lock: a larger number is a newer request
    boxes: np.ndarray | None = None  # (K, 4), best first; chosen by the background thread
    done: int = 0  # boxes of `boxes` handled


class GroundedSAM:
    """Grounding DINO + SAM with caches; safe to call from several threads (runs one at a time)."""

    def __init__(
        self,
        detector: Detector,
        segmenter: BoxSegmenter,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        prefetch_boxes: int = 8,
        background_boxes: int = 0,
    ) -> None:
        """
        Args:
            detector: finds boxes and phrases (`infer` once, `select` per threshold).
            segmenter: turns boxes into masks.
            cache_bytes: budget for raw outputs, embeddings and masks together (about 1 MB per
                (image, prompt), 4 MB per SAM embedding, at most H x W bytes per mask).
            prefetch_boxes: on the first run of an (image, prompt), also decode up to this many
                of the best boxes below the box threshold (by at most PREFETCH_MARGIN). Not
                done when `background_boxes` is set.
            background_boxes: after each run, a background thread decodes up to this many of the
                best boxes below the box threshold (0: no thread). Interactive use on a CPU; not
                under ZeroGPU, where CUDA may only be used inside a request.
        """
        self.detector = detector
        self.segmenter = segmenter
        self.prefetch_boxes = prefetch_boxes
        self.background_boxes = background_boxes
        self.cache = ByteLRU(cache_bytes)
        self.stats = PipelineStats()
        self._lock = threading.Lock()  # held while models run and caches change
        self._jobs = threading.Condition()  # guards the three fields below
        self._requests = 0  # runs and other holders (`hold`): the background gives way
        self._lookahead: _Lookahead | None = None
        self._newest_lookahead = -1  # `order` of the newest job handed to the thread
        self._worker: threading.Thread | None = None
        self._runs = itertools.count()  # numbers runs as they take the lock

    def run(
        self,
        image: Image.Image | np.ndarray,
        prompt: str,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        nms_threshold: float | None = None,
        max_detections: int | None = None,
        *,
        models: bool = True,
    ) -> SegmentedDetections:
        """Detect what `prompt` names and segment each detection.

        Args:
            image: (H, W, 3) uint8 RGB, or anything `images.load_image` takes (used at full
                size: load files and uploads with `load_image` to cap their size).
            prompt: phrases separated by "." ("a cat . a remote control"); longer than 256
                tokens is fine (the detector splits it at phrases).
            box_threshold: keep boxes whose best token probability is above this.
            text_threshold: tokens above this form a box's label (never removes a box).
            nms_threshold: optional per-phrase non-maximum suppression IoU.
            max_detections: keep at most this many (the best scoring); the result's `omitted`
                counts the rest. Each mask is H x W bytes, and costs about 0.1 s of decoding on
                a CPU: a cap keeps a threshold near 0 (up to 900 boxes) from exhausting both.
            models: False: answer from the caches only, or raise CacheMiss (a process that
                cannot run the models itself, like ZeroGPU's main process, tries this first).

        Raises:
            CacheMiss: `models` is False and something is not cached.
            ValueError: an empty prompt, thresholds outside [0, 1], `max_detections` < 0, or an
                unusable image (also one too thin to detect in: `images.check_shape`).
        """
        if max_detections is not None and max_detections < 0:
            raise ValueError(f"max_detections must be >= 0 or None, got {max_detections}")
        pixels = rgb_array(image)
        check_shape(pixels.shape[1], pixels.shape[0])
        caption = normalize_caption(prompt)
        with self.hold(), self._lock:
            order = next(self._runs)
            result, lookahead = self._run(
                pixels,
                caption,
                box_threshold,
                text_threshold,
                nms_threshold,
                max_detections,
                models,
            )
        if self.background_boxes > 0 and lookahead is not None:
            lookahead.order = order
            self._look_ahead(lookahead)
        return result

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Pause the background thread meanwhile (it finishes the chunk it is decoding).

        `run` holds it; a caller that goes on to draw or export a result should hold it over
        both, so that on a 2-core CPU the background does not slow the answer down.
        """
        with self._jobs:
            self._requests += 1
        try:
            yield
        finally:
            with self._jobs:
                self._requests -= 1
                self._jobs.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the background thread has nothing left to decode; False on timeout."""
        with self._jobs:
            return self._jobs.wait_for(lambda: self._worker is None, timeout)

    def _run(
        self,
        pixels: np.ndarray,
        caption: str,
        box_threshold: float,
        text_threshold: float,
        nms_threshold: float | None,
        max_detections: int | None,
        models: bool,
    ) -> tuple[SegmentedDetections, _Lookahead | None]:
        """`run` itself, under the lock; also what the background thread may decode next."""
        image_key = _digest(pixels)
        raw, fresh = self._raw_prediction(pixels, image_key, caption, models)
        detections = self.detector.select(raw, box_threshold, text_threshold, nms_threshold)
        omitted = 0
        if max_detections is not None and len(detections) > max_detections:
            omitted = len(detections) - max_detections
            detections = Detections(  # scores are descending: the best come first
                detections.boxes[:max_detections],
                detections.scores[:max_detections],
                detections.phrases[:max_detections],
                detections.phrase_ids[:max_detections],
                detections.prompt_phrases,
            )
        embedding = self._embedding(pixels, image_key, models)
        prefetch = (
            self._boxes_below(
                raw,
                (box_threshold, text_threshold, nms_threshold),
                box_threshold - PREFETCH_MARGIN,
                self.prefetch_boxes,
            )
            if fresh and not self.background_boxes
            else np.zeros((0, 4), np.float32)
        )
        masks, mask_scores = self._masks(image_key, embedding, detections.boxes, prefetch, models)
        result = SegmentedDetections(
            boxes=detections.boxes,
            scores=detections.scores,
            phrases=detections.phrases,
            phrase_ids=detections.phrase_ids,
            prompt_phrases=detections.prompt_phrases,
            masks=masks,
            mask_scores=mask_scores,
            omitted=omitted,
        )
        if omitted:  # at the cap, a lower threshold reveals no box
            return result, None
        return result, _Lookahead(
            image_key, raw, embedding, (box_threshold, text_threshold, nms_threshold)
        )

    def adopt(self, entries: list) -> None:
        """Put cache entries computed elsewhere (`cache.recording()` in a forked process) into
        this pipeline's cache."""
        with self._lock:
            for key, value, nbytes in entries:
                self.cache.put(key, value, nbytes)

    def _raw_prediction(
        self,
        pixels: np.ndarray,
        image_key: str,
        caption: str,
        models: bool,
    ) -> tuple[RawPrediction, bool]:
        """The detector's raw outputs, and whether the detector just ran for them."""
        key = ("raw", image_key, caption)
        raw = self.cache.get(key)
        if raw is not None:
            return raw, False
        if not models:
            raise CacheMiss("the detector would have to run")
        raw = self.detector.infer(pixels, caption)
        self.stats.detector_runs += 1
        size = sum(logits.nbytes + boxes.nbytes for _, logits, boxes in raw.chunks)
        self.cache.put(key, raw, size)
        return raw, True

    def _boxes_below(
        self,
        raw: RawPrediction,
        thresholds: tuple[float, float, float | None],
        floor: float,
        limit: int,
    ) -> np.ndarray:
        """(K, 4) the best `limit` boxes that the box threshold drops and `floor` keeps, best
        first (`thresholds`: box, text, NMS)."""
        if not limit:
            return np.zeros((0, 4), np.float32)
        box_threshold, text_threshold, nms_threshold = thresholds
        nearby = self.detector.select(raw, max(0.0, floor), text_threshold, nms_threshold)
        return nearby.boxes[nearby.scores <= box_threshold][:limit]

    def _look_ahead(self, lookahead: _Lookahead) -> None:
        """Make `lookahead` the background thread's job, replacing any older one; a job of an
        older request than the newest seen (its run finished after a newer one's) is dropped."""
        with self._jobs:
            if lookahead.order < self._newest_lookahead:
                return
            self._newest_lookahead = lookahead.order
            self._lookahead = lookahead
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._decode_ahead, daemon=True, name="grounded-sam-lookahead"
                )
                self._worker.start()

    def _decode_ahead(self) -> None:
        """The background thread: decode the latest job's boxes, a chunk at a time, whenever no
        request is waiting; exit when there is nothing left."""
        while True:
            with self._jobs:
                self._jobs.wait_for(lambda: self._requests == 0)
                job = self._lookahead
                if job is None:
                    self._worker = None
                    self._jobs.notify_all()
                    return
            with self._lock:
                if self._requests or job is not self._lookahead:
                    continue  # a request came in first, or replaced the job
                try:
                    finished = self._decode_chunk(job)
                except Exception:  # a failed guess must not take the app down
                    log.exception("decoding masks ahead failed; stopping for this request")
                    finished = True
            if finished:
                with self._jobs:
                    if self._lookahead is job:
                        self._lookahead = None

    def _decode_chunk(self, job: _Lookahead) -> bool:
        """Decode the next BACKGROUND_CHUNK uncached boxes of `job`; True when none are left."""
        if job.boxes is None:
            job.boxes = self._boxes_below(job.raw, job.thresholds, 0.0, self.background_boxes)
        chunk: list[np.ndarray] = []
        while job.done < len(job.boxes) and len(chunk) < BACKGROUND_CHUNK:
            box = job.boxes[job.done]
            job.done += 1
            if ("mask", job.image_key, box.tobytes()) not in self.cache:
                chunk.append(box)
        if chunk:
            self.segmenter.use(job.embedding)
            masks, scores = self.segmenter.segment(np.stack(chunk))
            self.stats.background_boxes_decoded += len(chunk)
            for box, mask, score in zip(chunk, masks, scores, strict=True):
                entry = _crop(mask, float(score))
                self.cache.put(("mask", job.image_key, box.tobytes()), entry, entry.nbytes)
        return job.done >= len(job.boxes)

    def _embedding(self, pixels: np.ndarray, image_key: str, models: bool) -> ImageEmbedding:
        key = ("embedding", image_key)
        embedding = self.cache.get(key)
        if embedding is None:
            if not models:
                raise CacheMiss("SAM's image encoder would have to run")
            embedding = self.segmenter.embed(pixels)
            self.stats.image_embeddings += 1
            self.cache.put(key, embedding, embedding.nbytes)
        return embedding

    def _masks(
        self,
        image_key: str,
        embedding: ImageEmbedding,
        boxes: np.ndarray,
        prefetch: np.ndarray,
        models: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) bool masks and (N,) scores of `boxes`, decoding, in one call, the boxes not
        in the cache and the `prefetch` boxes not in the cache (those only to cache them)."""
        keys = [("mask", image_key, box.tobytes()) for box in boxes]
        found: list[_Mask | None] = [self.cache.get(key) for key in keys]
        missing = [index for index, entry in enumerate(found) if entry is None]
        extra = [box for box in prefetch if ("mask", image_key, box.tobytes()) not in self.cache]
        if missing and not models:
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
                _crop(mask, float(score)) for mask, score in zip(new_masks, new_scores, strict=True)
            ]
            for box, entry in zip(wanted, entries, strict=True):
                self.cache.put(("mask", image_key, box.tobytes()), entry, entry.nbytes)
            for index, entry in zip(missing, entries, strict=False):  # extras come last
                found[index] = entry
        filled = cast(list[_Mask], found)  # every None was decoded above
        height, width = embedding.original_size
        masks = np.zeros((len(boxes), height, width), dtype=bool)
        for mask, entry in zip(masks, filled, strict=True):
            mask[
                entry.top : entry.top + entry.crop.shape[0],
                entry.left : entry.left + entry.crop.shape[1],
            ] = entry.crop
        scores = np.array([entry.score for entry in filled], dtype=np.float32)
        return masks, scores


def _digest(pixels: np.ndarray) -> str:
    """A content key for an (H, W, 3) uint8 array (about 25 ms for 12 MP)."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).data.cast("B"))
    return digest.hexdigest()


def _crop(mask: np.ndarray, score: float) -> _Mask:
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return _Mask(0, 0, np.zeros((0, 0), dtype=bool), score)
    top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    return _Mask(int(top), int(left), mask[top:bottom, left:right].copy(), score)
