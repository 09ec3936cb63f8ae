"""What every section shares: the constants and targets, the `Context` (arguments, inputs and
models on the device) and how it is built, and the precision, synchronisation and timing
helpers."""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import benchmark_peers as peers  # scripts/benchmark_peers.py, beside gpu_check.py
import numpy as np
import torch

import grounding
from gpu_sections.report import Report
from grounding.predictor import Detector
from grounding.transforms import preprocess
from segmentation.sam_attention import accelerate_sam

CAPTION = peers.CAPTION
TEXT_THRESHOLD = peers.TEXT_THRESHOLD
BOXES = 5
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Targets.
PARITY_BOX_ATOL, PARITY_LOGIT_RTOL, PARITY_EMBED_RTOL, PARITY_MASK_IOU = 1e-3, 1e-3, 1e-3, 0.99
AUTOCAST_MATCH, AUTOCAST_CELLS, AUTOCAST_MASK_IOU = 0.9, 0.9, 0.95
# Detections within this of the threshold may flip either way under rounding: not counted.
AUTOCAST_MARGIN = 0.02


@dataclass
class Context:
    """Everything the sections share: arguments, inputs and models (on the device)."""

    args: argparse.Namespace
    device: torch.device
    image: np.ndarray  # (H, W, 3) uint8
    pixels: torch.Tensor  # (1, 3, H, W) on the device, the detector's input
    boxes: np.ndarray  # (BOXES, 4) fixed SAM prompts, pixels
    detector: Detector
    sam: torch.nn.Module
    hf_model: torch.nn.Module | None = None
    processor: object = None
    _fast: dict[str, torch.nn.Module] | None = None  # {label: accelerated SAM}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def n_tokens(self) -> int:
        return len(self.detector.tokenizer(CAPTION)["input_ids"])

    def fast_sams(self) -> dict[str, torch.nn.Module]:
        """Copies of SAM through `accelerate_sam`: as `build_sam` returns it ("accelerate_sam")
        and with the whole mask in one SDPA call per block ("accelerate_sam 1-call",
        bias_elements=0). Built once."""
        if self._fast is None:
            settings = {"accelerate_sam": None, "accelerate_sam 1-call": 0}
            self._fast = {label: accelerate_sam(copy.deepcopy(self.sam), bias_elements=elements)
                          .to(self.device).eval() for label, elements in settings.items()}
        return self._fast

    def our_sam(self) -> torch.nn.Module:
        """SAM as `segmentation.build_sam` returns it (`accelerate_sam`: SDPA attention off the
        CPU, the CPU blocks of `segmentation.sam_block` on it): what "ours" runs. `sam` stays
        segment_anything's own, for the peers."""
        return self.fast_sams()["accelerate_sam"]


def build_context(args: argparse.Namespace, device: torch.device, report: Report) -> Context:
    height, width = args.size or ((256, 384) if args.tiny else (800, 1200))
    image = np.random.default_rng(args.seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        hf_model, processor = peers.save_random_transformers_model(
            Path(directory), args.tiny, (height, width), args.seed)
        detector = grounding.load_detector(directory, device=device)
    if "bench" in args.sections:
        hf_model.to(device)
    else:
        hf_model = processor = None
    sam = build_random_sam(args.sam_variant, args.tiny, args.seed).to(device).eval()
    pixels = preprocess(image, detector.image_size, detector.max_size)[None].to(device)
    report.data["build_seconds"] = time.perf_counter() - start
    return Context(args, device, image, pixels, peers.fixed_boxes(BOXES, height, width, args.seed),
                   detector, sam, hf_model, processor)


def build_random_sam(variant: str, tiny: bool, seed: int) -> torch.nn.Module:
    """segment_anything's `variant` after a fixed seed; all-zero parameters get N(0, 0.02^2)."""
    if tiny:
        from segmentation.tiny_models import tiny_sam

        return tiny_sam(seed)
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    sam = sam_model_registry[variant](checkpoint=None)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sam.parameters():
            if not parameter.any():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return sam


@contextlib.contextmanager
def precision(device: torch.device, name: str):
    """"fp32" (TF32 off for matmuls and convolutions), "tf32" (on for both), or "bf16" / "fp16"
    autocast (TF32 off); the switches are restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        if name in DTYPES:
            with torch.autocast(device.type, dtype=DTYPES[name]):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, runs: int,
              deadline: float) -> tuple[float, list[float]]:
    """Median milliseconds of `fn` over up to `runs` calls after one warm-up (fewer past
    `deadline`, at least one)."""
    fn()
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() > deadline:
            break
    return statistics.median(times), times
