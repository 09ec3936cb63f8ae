"""Decoding masks ahead: the boxes just below the box threshold, so lowering it is instant.

SAM's decoder costs about 0.1 s per box on 2 CPU cores. `LookAhead`, given to `GroundedSAM`,
says how the boxes the threshold drops get decoded before anyone asks for them:

- "prefetch": in the first run of an (image, prompt), in the same decoder call as the shown boxes
  (synchronous; on ZeroGPU the GPU call does it, where CUDA may only be used inside a request);
- "background": after every run, by a `BackgroundDecoder` thread, best first, one chunk at a
  time, giving way to any new request (interactive use on a CPU);
- "none": never.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # `segmentation.models` imports this module without loading torch
    import numpy as np

    from grounding import RawPrediction
    from segmentation.sam import ImageEmbedding

# Boxes decoded ahead synchronously score at most this much below the box threshold.
PREFETCH_MARGIN = 0.1
# Boxes per background decoder call: a request arriving meanwhile waits for at most one call
# (about 0.1 s per box on 2 CPU cores; batching more saves little per box).
BACKGROUND_CHUNK = 1

log = logging.getLogger(__name__)

Mode = Literal["none", "prefetch", "background"]


@dataclass(frozen=True)
class LookAhead:
    """How `GroundedSAM` decodes masks ahead (see the module's docstring).

    Attributes:
        mode: "prefetch", "background" or "none".
        boxes: the most boxes decoded ahead per (image, prompt) ("prefetch") or per run
            ("background"), the best first.
        margin: only boxes scoring at most this much below the box threshold (1.0: any).
    """

    mode: Mode = "prefetch"
    boxes: int = 8
    margin: float = PREFETCH_MARGIN

    def __post_init__(self) -> None:
        if self.mode not in ("none", "prefetch", "background"):
            raise ValueError(f"look-ahead mode must be none, prefetch or background: {self.mode}")
        if self.boxes < 0 or not 0 <= self.margin <= 1:
            raise ValueError(f"look-ahead boxes must be >= 0 and margin in [0, 1]: {self}")

    @classmethod
    def prefetch(cls, boxes: int = 8, margin: float = PREFETCH_MARGIN) -> LookAhead:
        return cls("prefetch", boxes, margin)

    @classmethod
    def background(cls, boxes: int = 48, margin: float = 1.0) -> LookAhead:
        return cls("background", boxes, margin)

    @classmethod
    def off(cls) -> LookAhead:
        return cls("none", 0)

    @property
    def prefetch_boxes(self) -> int:
        """Boxes decoded ahead in a first run (0 unless "prefetch")."""
        return self.boxes if self.mode == "prefetch" else 0

    @property
    def background_boxes(self) -> int:
        """Boxes decoded ahead by the background thread after a run (0 unless "background")."""
        return self.boxes if self.mode == "background" else 0


DEFAULT_LOOK_AHEAD = LookAhead()


@dataclass
class LookAheadJob:
    """Boxes below the threshold of one run, to decode in the background."""

    image_key: str
    raw: RawPrediction
    embedding: ImageEmbedding
    thresholds: tuple[float, float, float | None]  # box, text, NMS
    order: int = 0  # when its run took the lock: a larger number is a newer request
    boxes: np.ndarray | None = None  # (K, 4), best first; chosen by the background thread
    done: int = 0  # boxes of `boxes` handled


class _OnDemandThread:
    """One daemon thread, started when work arrives and ending when the work runs out.

    `stop` drops the waiting work and waits for the thread; it is registered with `atexit` on the
    first start: a daemon thread still inside torch when the interpreter shuts down aborts the
    process ("terminate called without an active exception"). Subclasses keep their fields under
    `_state` and define `_work` (ending with `_finished()`, under `_state`) and `_drop`.
    """

    def __init__(self, name: str) -> None:
        self._state = threading.Condition()  # guards the fields of subclasses too
        self._name = name
        self._worker: threading.Thread | None = None
        self._stop_registered = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the thread has nothing left to do; False on timeout."""
        with self._state:
            return self._state.wait_for(lambda: self._worker is None, timeout)

    def stop(self, timeout: float = 30.0) -> bool:
        """Drop the waiting work and wait until the thread has finished what it is doing and
        ended; False on timeout."""
        with self._state:
            self._drop()
            self._state.notify_all()
        return self.wait_idle(timeout)

    def _start(self) -> None:
        """Start the thread unless it runs (call under `_state`)."""
        if self._worker is None:
            if not self._stop_registered:
                atexit.register(self.stop)
                self._stop_registered = True
            self._worker = threading.Thread(target=self._work, daemon=True, name=self._name)
            self._worker.start()

    def _finished(self) -> None:
        """The thread's last step (under `_state`)."""
        self._worker = None
        self._state.notify_all()

    def _drop(self) -> None:
        raise NotImplementedError

    def _work(self) -> None:
        raise NotImplementedError


class BackgroundDecoder(_OnDemandThread):
    """A thread that works on the newest `LookAheadJob` whenever no request is waiting.

    Args:
        lock: held by requests while models run; the thread takes it for each chunk.
        decode_chunk: decodes the next chunk of a job (under `lock`); True when none are left.
    """

    def __init__(self, lock: threading.Lock, decode_chunk: Callable[[LookAheadJob], bool]):
        super().__init__("grounded-sam-lookahead")
        self._lock = lock
        self._decode_chunk = decode_chunk
        self._requests = 0  # runs and other holders (`hold`): the thread gives way
        self.job: LookAheadJob | None = None
        self._newest = -1  # `order` of the newest job handed over

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Pause the thread meanwhile (it finishes the chunk it is decoding)."""
        with self._state:
            self._requests += 1
        try:
            yield
        finally:
            with self._state:
                self._requests -= 1
                self._state.notify_all()

    def submit(self, job: LookAheadJob) -> None:
        """Make `job` the thread's job, replacing any older one; a job of an older request than
        the newest seen (its run finished after a newer one's) is dropped."""
        with self._state:
            if job.order < self._newest:
                return
            self._newest = job.order
            self.job = job
            self._start()

    def _drop(self) -> None:
        self.job = None

    def _work(self) -> None:
        """Decode the latest job a chunk at a time whenever no request is waiting; exit when
        there is nothing left."""
        while True:
            with self._state:
                self._state.wait_for(lambda: self._requests == 0)
                job = self.job
                if job is None:
                    self._finished()
                    return
            with self._lock:
                if self._requests or job is not self.job:
                    continue  # a request came in first, or replaced the job
                try:
                    finished = self._decode_chunk(job)
                except Exception:  # a failed guess must not take the app down
                    log.exception("decoding masks ahead failed; stopping for this request")
                    finished = True
            if finished:
                with self._state:
                    if self.job is job:
                        self.job = None


class ImagePreparer(_OnDemandThread):
    """A thread that computes SAM's image embedding of the newest image handed to it before any
    request asks for it (in the app: on upload, while the user types the prompt; the embedding
    is more than half of a first run on a CPU).

    Args:
        lock: held by requests while models run; the thread holds it for one embedding, so a
            request arriving meanwhile waits for it (and then finds it cached if it is the
            same image).
        embed: computes and caches the embedding of (key, pixels), under `lock`.
    """

    def __init__(self, lock: threading.Lock, embed: Callable[[str, np.ndarray], object]):
        super().__init__("grounded-sam-prepare")
        self._lock = lock
        self._embed = embed
        self._next: tuple[str, np.ndarray] | None = None  # only the newest image waits

    def submit(self, key: str, pixels: np.ndarray) -> None:
        """Embed `pixels` (cache key `key`) next, replacing an image still waiting."""
        with self._state:
            self._next = (key, pixels)
            self._start()

    def _drop(self) -> None:
        self._next = None

    def _work(self) -> None:
        while True:
            with self._state:
                item, self._next = self._next, None
                if item is None:
                    self._finished()
                    return
            with self._lock:
                try:
                    self._embed(*item)
                except Exception:  # a failed guess must not take the app down
                    log.exception("embedding an image ahead failed")
