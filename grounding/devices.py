"""Where models run by default, and whether this is a Hugging Face ZeroGPU Space: one answer for
the library, the CLI and the app; and small host values put on a device without a sync."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ZERO_GPU_ENV = "SPACES_ZERO_GPU"
_ZERO_GPU_TRUE = ("1", "t", "true")  # as the `spaces` package reads the variable


def spaces_installed() -> bool:
    """Whether the `spaces` package (Hugging Face Spaces only) can be imported."""
    return importlib.util.find_spec("spaces") is not None


def on_zero_gpu(environ: Mapping[str, str] = os.environ, *, has_spaces: bool | None = None) -> bool:
    """A ZeroGPU Space: the `spaces` package is installed and SPACES_ZERO_GPU is set (read as
    the package itself reads it). CUDA is then usable inside `@spaces.GPU` calls only.

    Args:
        has_spaces: whether the `spaces` package is there; None: `spaces_installed()`.
    """
    flag = environ.get(ZERO_GPU_ENV, "").strip().lower()
    if flag not in _ZERO_GPU_TRUE:
        return False
    return spaces_installed() if has_spaces is None else has_spaces


def default_device(environ: Mapping[str, str] = os.environ) -> str:
    """ "cuda" on a GPU machine or a ZeroGPU Space, else "cpu"."""
    import torch

    return "cuda" if on_zero_gpu(environ) or torch.cuda.is_available() else "cpu"


def host_tensor(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)` without making the host wait for the GPU.

    `torch.tensor(..., device="cuda")` copies with `non_blocking=False`: a synchronisation
    (`torch.cuda.set_sync_debug_mode` counts it) that stalls the host until the GPU has run
    everything queued. Built on the CPU and copied with `non_blocking=True` instead: from
    pageable memory CUDA stages the values before the call returns, so they may be freed at
    once. On the CPU the tensor is simply returned.
    """
    import torch

    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
