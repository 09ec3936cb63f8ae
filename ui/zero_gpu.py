"""Hugging Face ZeroGPU: CUDA only inside `@spaces.GPU` calls, which run in a forked worker.

The `spaces` package exists only on Spaces (a no-op there off ZeroGPU); elsewhere `gpu` leaves a
function as it is. app.py imports `spaces` first, before torch initialises CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

try:
    import spaces
except ImportError:  # not on a Space
    spaces = None

from grounding import devices  # after `spaces`: it imports torch

GPU_DURATION_S = 40


def gpu(fn: Callable) -> Callable:
    """`spaces.GPU` when the `spaces` package is present (a no-op off ZeroGPU); else `fn`.

    On ZeroGPU the result runs `fn` in a forked worker process: its arguments and its result are
    pickled, while `fn` itself (a bound method included) and what it reaches are inherited by
    the fork, so the models are never pickled.
    """
    return spaces.GPU(duration=GPU_DURATION_S)(fn) if spaces is not None else fn


def on_zero_gpu(environ: Mapping[str, str] = os.environ) -> bool:
    """A ZeroGPU Space (`grounding.devices.on_zero_gpu`, the one test, also behind the CLI's
    default device). `gpu` functions then run in a forked worker process that holds the GPU."""
    return devices.on_zero_gpu(environ, has_spaces=spaces is not None)
