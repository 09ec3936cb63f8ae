"""Image + prompt + thresholds -> detections with masks, computing nothing twice.

Grounded SAM: Grounding DINO's boxes prompt SAM. `GroundedSAM` puts together parts with one job
each:

- `result_cache.ResultCache`: what makes the threshold sliders instant, within one byte budget:
  the detector's raw outputs per (image, prompt), so new thresholds only re-filter them
  (`Detector.select`, no model call); SAM's image embedding per image, computed on the first run
  even when nothing is detected; the decoded mask per (image, box), so only boxes never decoded
  go through the mask decoder, all in one batched call;
- `runner.ModelRunner`: runs the models for what the cache lacks;
- `look_ahead.LookAhead`: how the boxes just below the box threshold get decoded before anyone
  asks (in the first run, by a `look_ahead.BackgroundDecoder` thread after every run, or never);
- `look_ahead.ImagePreparer`: SAM's image embedding computed before the first run asks for it
  (`prepare`, on upload in the app);
- `results`: what a run answers (`SegmentedDetections`, `CacheMiss`).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Hashable
from typing import Any

import numpy as np
from PIL import Image

from grounding import Detections, Detector
from grounding.predictor import normalize_caption
from segmentation.images import check_shape, rgb_array
from segmentation.look_ahead import (
    DEFAULT_LOOK_AHEAD,
    BackgroundDecoder,
    ImagePreparer,
    LookAhead,
    LookAheadJob,
)
from segmentation.result_cache import DEFAULT_CACHE_BYTES, ResultCache, image_key
from segmentation.results import CacheMiss, SegmentedDetections
from segmentation.runner import ModelRunner, PipelineStats
from segmentation.sam import BoxSegmenter

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "CacheMiss",
    "GroundedSAM",
    "LookAhead",
    "PipelineStats",
    "SegmentedDetections",
]


class GroundedSAM:
    """Grounding DINO + SAM with caches; safe to call from several threads (runs one at a time).

    Args:
        detector: finds boxes and phrases (`infer` once, `select` per threshold).
        segmenter: turns boxes into masks.
        cache_bytes: budget for raw outputs, embeddings and masks together (about 1 MB per
            (image, prompt), 4 MB per SAM embedding, at most H x W bytes per mask).
        look_ahead: how masks below the box threshold are decoded ahead; default: up to 8 boxes
            within `look_ahead.PREFETCH_MARGIN`, in the first run of an (image, prompt).
            `LookAhead.background(...)` is for interactive use on a CPU, not for ZeroGPU, where
            CUDA may only be used inside a request.
    """

    def __init__(
        self,
        detector: Detector,
        segmenter: BoxSegmenter,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        look_ahead: LookAhead = DEFAULT_LOOK_AHEAD,
    ) -> None:
        self.look_ahead = look_ahead
        self.cache = ResultCache(cache_bytes)
        self.runner = ModelRunner(detector, segmenter, self.cache)
        self._lock = threading.Lock()  # held while models run
        self.background = BackgroundDecoder(self._lock, self._decode_ahead)
        self.preparer = ImagePreparer(self._lock, self._embed_ahead)
        self._runs = itertools.count()  # numbers runs as they take the lock

    @property
    def detector(self) -> Detector:
        return self.runner.detector

    @property
    def segmenter(self) -> BoxSegmenter:
        return self.runner.segmenter

    @property
    def stats(self) -> PipelineStats:
        return self.runner.stats

    def run(
        self,
        image: Image.Image | np.ndarray,
        prompt: str,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        nms_threshold: float | None = None,
        max_detections: int | None = None,
        *,
        cache_only: bool = False,
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
            cache_only: answer from the caches only, or raise CacheMiss (a process that cannot
                run the models itself, like ZeroGPU's main process, tries this first).

        Raises:
            CacheMiss: `cache_only` and something is not cached.
            ValueError: an empty prompt, thresholds outside [0, 1], `max_detections` < 0, or an
                unusable image (also one too thin to detect in: `images.check_shape`).
        """
        if max_detections is not None and max_detections < 0:
            raise ValueError(f"max_detections must be >= 0 or None, got {max_detections}")
        pixels = rgb_array(image)
        check_shape(pixels.shape[1], pixels.shape[0])
        caption = normalize_caption(prompt)
        thresholds = (box_threshold, text_threshold, nms_threshold)
        with self.hold(), self._lock:
            order = next(self._runs)
            result, job = self._run(pixels, caption, thresholds, max_detections, cache_only)
        if self.look_ahead.background_boxes > 0 and job is not None:
            job.order = order
            self.background.submit(job)
        return result

    def prepare(self, image: Image.Image | np.ndarray) -> None:
        """Start SAM's image embedding of `image` (and on the CPU the detector's image features)
        in a background thread, before a run asks for them (the app calls this on upload). Not
        on ZeroGPU, where CUDA may only be used inside a request. Nothing happens when the
        embedding is cached; a newer image replaces one still waiting.

        Raises:
            ValueError: an unusable image, as `run`.
        """
        pixels = rgb_array(image)
        check_shape(pixels.shape[1], pixels.shape[0])
        key = image_key(pixels)
        if self.cache.embedding(key) is None:
            self.preparer.submit(key, pixels)

    def _embed_ahead(self, key: str, pixels: np.ndarray) -> None:
        self.runner.encoded_image(pixels, key)
        self.runner.embedding(pixels, key, cache_only=False)

    def hold(self) -> contextlib.AbstractContextManager[None]:
        """Pause the background thread meanwhile (it finishes the chunk it is decoding).

        `run` holds it; a caller that goes on to draw or export a result should hold it over
        both, so that on a 2-core CPU the background does not slow the answer down.
        """
        return self.background.hold()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the background thread has nothing left to decode; False on timeout."""
        return self.background.wait_idle(timeout)

    def adopt(self, entries: list[tuple[Hashable, Any, int]]) -> None:
        """Put cache entries computed elsewhere (`cache.recording()` in a forked process) into
        this pipeline's cache."""
        self.cache.adopt(entries)

    def _run(
        self,
        pixels: np.ndarray,
        caption: str,
        thresholds: tuple[float, float, float | None],
        max_detections: int | None,
        cache_only: bool,
    ) -> tuple[SegmentedDetections, LookAheadJob | None]:
        """`run` itself, under the lock; also what the background thread may decode next."""
        runner, key = self.runner, image_key(pixels)
        raw, fresh = runner.raw_prediction(pixels, key, caption, cache_only)
        detections = runner.detector.select(raw, *thresholds)
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
        embedding = runner.embedding(pixels, key, cache_only)
        ahead = self.look_ahead
        prefetch = runner.boxes_below(
            raw, thresholds, ahead.margin, ahead.prefetch_boxes if fresh else 0
        )
        masks, mask_scores = runner.masks(key, embedding, detections.boxes, prefetch, cache_only)
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
        return result, LookAheadJob(key, raw, embedding, thresholds)

    def _decode_ahead(self, job: LookAheadJob) -> bool:
        """The background thread's chunk of `job` (under the lock); True when it is done."""
        ahead = self.look_ahead
        return self.runner.decode_ahead(job, ahead.background_boxes, ahead.margin)
