"""The one timer the benchmark scripts share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, tuple[float, float]]:
    """fn's result and (wall seconds, CPU-seconds per wall-second); waits for CUDA work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return result, (seconds, (time.process_time() - cpu) / seconds)
