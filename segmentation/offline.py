"""Offline mode's models: the small Grounding DINO and small SAM trained here on synthetic shapes.

Both ship in `assets/` (fp16, about 12 MB together; how they were trained is in
`assets/README.md`), so offline mode needs no download and gives real results, but only for what
they learned: the 12 names of `grounding.shapes_categories.CATEGORIES` ("red circle", "blue
square", ..., "yellow triangle") on flat shapes. Anything else ("a dog") finds little or nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grounding import Detector, load_detector
from grounding.devices import default_device
from grounding.shapes_categories import CATEGORIES
from segmentation.small_sam import load_small_sam

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DETECTOR_DIR = ASSETS / "shapes_detector"
SAM_WEIGHTS = ASSETS / "small_sam_shapes.safetensors"
# What the offline models know, in the generator's order.
KNOWN_NAMES: tuple[str, ...] = CATEGORIES
EXAMPLE_PROMPT = "red circle . blue square . green triangle . yellow circle ."


def known_names_text() -> str:
    """The known names as one line: "red circle, red square, ... and yellow triangle"."""
    return ", ".join(KNOWN_NAMES[:-1]) + " and " + KNOWN_NAMES[-1]


def _shipped(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"offline mode needs {path}, which ships in the repository's "
            "assets/ folder: run from a checkout of the repository"
        )
    return path


def shapes_detector(device: str | torch.device | None = None) -> Detector:
    """The shapes-trained Grounding DINO (fp32 on `device`; resizes as it was trained)."""
    return load_detector(_shipped(DETECTOR_DIR), device=device)


def shapes_sam(device: str | torch.device | None = None):
    """The shapes-trained small SAM (segment_anything's `Sam`, fp32, eval mode)."""
    device = torch.device(device or default_device())
    return load_small_sam(_shipped(SAM_WEIGHTS), device=device)
