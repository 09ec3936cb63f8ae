"""`load_pipeline`: Grounding DINO and SAM with their weights, as one `GroundedSAM`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from grounding import hub, load_detector
from grounding.config import PRESETS
from grounding.devices import default_device
from segmentation.fast_modes import apply_fast_modes, check_quantize
from segmentation.look_ahead import DEFAULT_LOOK_AHEAD, LookAhead
from segmentation.offline import shapes_detector, shapes_sam
from segmentation.pipeline import GroundedSAM
from segmentation.result_cache import DEFAULT_CACHE_BYTES
from segmentation.sam import BoxSegmenter, build_sam
from segmentation.sam import sam_checkpoint as official_sam_checkpoint


def load_pipeline(
    *,
    detector: str | os.PathLike = "swint_ogc",
    sam: str = "vit_b",
    device: str | torch.device | None = None,
    offline: bool = False,
    sam_checkpoint: str | os.PathLike | None = None,
    detector_config: str = "swint_ogc",
    text_encoder: str | os.PathLike | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    quantize: str | None = None,
    compile: bool = False,
    look_ahead: LookAhead = DEFAULT_LOOK_AHEAD,
) -> GroundedSAM:
    """Grounding DINO + SAM, weights loaded, on `device`.

    Args:
        detector: a preset of `grounding.config.DETECTOR_PRESETS`, "swint_ogc" or
            "swinb_cogcoor" (official weights from the Hub, or `$GROUNDING_DINO_CHECKPOINT`);
            a Hub id of a transformers-format model ("IDEA-Research/grounding-dino-tiny"); or
            the path of an official `.pth` or of a transformers-format directory.
        sam: "vit_b", "vit_l" or "vit_h".
        device: default CUDA when available, else CPU.
        offline: the small shapes models shipped in `assets/` instead (`segmentation.offline`:
            no downloads; they know 12 names such as "red circle"). Every other model argument
            is then ignored.
        sam_checkpoint: a SAM `.pth` for `sam`; default `$SAM_CHECKPOINT`, else the official file
            (downloaded once into `$SAM_CACHE_DIR` or ~/.cache/grounded-sam).
        detector_config: the architecture of a `.pth` passed as `detector`.
        text_encoder: BERT's tokenizer directory or Hub id (see `grounding.load_detector`).
        cache_bytes: the pipeline's cache budget.
        quantize: None or "none"; "int8": int8 Linear layers in both models (CPU only;
            `segmentation.fast_modes`). Applies to offline mode too.
        compile: `torch.compile` SAM's image encoder (eager, after one warning, without a
            compiler). Applies to offline mode too.
        look_ahead: how the pipeline decodes masks below the box threshold ahead
            (`segmentation.look_ahead`).

    Raises:
        FileNotFoundError: `detector` is a path that does not exist.
        ValueError: an unknown detector or quantize mode, or int8 on a device other than the
            CPU (before anything loads).
        grounding.hub.OfflineError: a weight file is missing and cannot be downloaded (the
            message names the file and how to supply it).
    """
    resolved = torch.device(device or default_device())
    check_quantize(quantize, resolved)
    if offline:
        grounding_detector, segment_anything = shapes_detector(resolved), shapes_sam(resolved)
        apply_fast_modes(
            grounding_detector,
            segment_anything,
            quantize=quantize,
            compile=compile,
            device=resolved,
        )
        return GroundedSAM(
            grounding_detector,
            BoxSegmenter(segment_anything),
            cache_bytes=cache_bytes,
            look_ahead=look_ahead,
        )
    if not (detector in PRESETS or Path(detector).exists() or hub.is_hub_id(detector)):
        if hub.looks_like_path(detector) or "/" in str(detector):
            raise FileNotFoundError(f"detector checkpoint {detector} does not exist")
        raise ValueError(
            f"unknown detector {detector!r}: choose one of {sorted(PRESETS)}, a Hub id such as "
            "IDEA-Research/grounding-dino-tiny, or give the path of a checkpoint"
        )
    # Resolved first, so a missing SAM file is reported before the detector spends time loading.
    sam_path = sam_checkpoint if sam_checkpoint is not None else official_sam_checkpoint(sam)
    if detector in PRESETS:
        grounding_detector = load_detector(
            config=detector, text_encoder=text_encoder, device=device
        )
    else:
        grounding_detector = load_detector(
            detector, config=detector_config, text_encoder=text_encoder, device=device
        )
    segment_anything = build_sam(sam, sam_path, device=device)
    apply_fast_modes(
        grounding_detector, segment_anything, quantize=quantize, compile=compile, device=resolved
    )
    return GroundedSAM(
        grounding_detector,
        BoxSegmenter(segment_anything),
        cache_bytes=cache_bytes,
        look_ahead=look_ahead,
    )
