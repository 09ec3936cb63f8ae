"""The pipeline's parts on their own: the typed result cache and the look-ahead configuration."""

from __future__ import annotations

import numpy as np
import pytest

from segmentation.look_ahead import LookAhead
from segmentation.result_cache import MaskEntry, ResultCache


def test_a_mask_entry_keeps_only_its_true_window_and_pastes_back_exactly():
    mask = np.zeros((40, 60), bool)
    mask[5:9, 10:30] = True
    mask[20, 12] = True
    entry = MaskEntry.of(mask, 0.9)
    assert (entry.top, entry.left, entry.crop.shape) == (5, 10, (16, 20))
    pasted = np.zeros_like(mask)
    entry.paste(pasted)
    np.testing.assert_array_equal(pasted, mask)
    empty = MaskEntry.of(np.zeros((4, 4), bool), 0.1)
    assert empty.crop.size == 0 and empty.nbytes == 64


def test_the_cache_keeps_masks_per_image_and_box_within_its_byte_budget():
    box = np.array([1, 2, 3, 4], np.float32)
    entry = MaskEntry.of(np.ones((10, 10), bool), 0.5)  # 100 + 64 bytes
    cache = ResultCache(max_bytes=2 * entry.nbytes)
    cache.put_mask("image-a", box, entry)
    assert cache.has_mask("image-a", box) and not cache.has_mask("image-b", box)
    assert cache.mask("image-a", box + 1) is None and cache.raw("image-a", "cat .") is None
    for name in ("image-b", "image-c"):  # a third entry evicts the least recently used one
        cache.put_mask(name, box, MaskEntry.of(np.ones((10, 10), bool), 0.5))
    assert not cache.has_mask("image-a", box) and cache.has_mask("image-c", box)


def test_look_ahead_modes_say_how_many_boxes_each_mechanism_decodes():
    assert LookAhead.prefetch(8).prefetch_boxes == 8 and LookAhead.prefetch(8).background_boxes == 0
    assert LookAhead.background(48).background_boxes == 48
    assert LookAhead.background(48).prefetch_boxes == 0
    assert LookAhead.off().prefetch_boxes == LookAhead.off().background_boxes == 0
    with pytest.raises(ValueError, match="mode"):
        LookAhead(mode="sometimes")
    with pytest.raises(ValueError, match="boxes"):
        LookAhead.prefetch(-1)


EXIT_SCRIPT = """
import threading, time, torch
from segmentation.look_ahead import BackgroundDecoder, LookAheadJob
torch.set_num_threads(2)
started = threading.Event()
def decode_chunk(job):
    started.set()
    a = torch.randn(1500, 1500)
    for _ in range(40):
        a = (a @ a).tanh()  # inside torch, on OpenMP threads, when the interpreter exits
    return False
decoder = BackgroundDecoder(threading.Lock(), decode_chunk)
decoder.submit(LookAheadJob("image", None, None, (0.3, 0.25, None)))
started.wait(30)
"""


def test_exiting_while_the_background_thread_decodes_is_clean():
    """The process ends with status 0 and no "terminate called": at exit the decoder drops its
    job and waits for the chunk it is in (a daemon thread inside torch aborts the interpreter's
    shutdown otherwise)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "terminate called" not in result.stderr


def test_stop_drops_the_job_and_ends_the_thread():
    import threading
    import time

    from segmentation.look_ahead import BackgroundDecoder, LookAheadJob

    chunks = []

    def decode_chunk(job):
        chunks.append(job)
        time.sleep(0.05)
        return False  # never finished on its own

    decoder = BackgroundDecoder(threading.Lock(), decode_chunk)
    decoder.submit(LookAheadJob("image", None, None, (0.3, 0.25, None)))
    while not chunks:
        time.sleep(0.01)
    assert decoder.stop(timeout=10)
    assert decoder.job is None and decoder.wait_idle(timeout=0)
    count = len(chunks)
    time.sleep(0.2)
    assert len(chunks) == count  # nothing decoded after stop
