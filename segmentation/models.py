"""Which models to serve: the model flags and environment variables that the CLI
(`segmentation.cli`) and the app (app.py, `ui.handlers`) share, resolved into a `ModelChoice`,
and `load_models` for it.

The tables behind the choices have one home each: detector presets in
`grounding.config.DETECTOR_PRESETS` (names, CLI aliases, official files, display names), SAM
variants in `segmentation.sam.SAM_CHECKPOINTS`, quantize modes in
`segmentation.fast_modes.QUANTIZE_MODES`, the default device in `grounding.devices`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from grounding import hub
from grounding.config import DETECTOR_PRESETS, detector_preset
from grounding.devices import default_device
from segmentation.fast_modes import QUANTIZE_MODES
from segmentation.look_ahead import DEFAULT_LOOK_AHEAD, LookAhead
from segmentation.sam import SAM_CHECKPOINTS

SAM_VARIANTS = tuple(SAM_CHECKPOINTS)
DEFAULT_DETECTOR = "swint_ogc"
ENV_DETECTOR = "GROUNDED_SAM_DETECTOR"
ENV_SAM = "GROUNDED_SAM_SAM"
ENV_DEVICE = "GROUNDED_SAM_DEVICE"
ENV_OFFLINE = "GROUNDED_SAM_OFFLINE"
ENV_QUANTIZE = "GROUNDED_SAM_QUANTIZE"
ENV_COMPILE = "GROUNDED_SAM_COMPILE"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class ModelChoice:
    """Which models to load, where.

    Attributes:
        detector: a preset name of `grounding.config.DETECTOR_PRESETS` ("swint_ogc"), a Hub id
            ("IDEA-Research/grounding-dino-tiny") or a checkpoint path (`.pth` or a
            transformers-format directory).
        sam: a SAM variant of `segmentation.sam.SAM_CHECKPOINTS` ("vit_b", "vit_l", "vit_h").
        device: a torch device string ("cpu", "cuda", "cuda:1").
        offline: the small models trained here on synthetic shapes, shipped in `assets/`
            (no downloads; they know 12 names such as "red circle": `segmentation.offline`).
        sam_checkpoint: a local SAM `.pth` for `sam`; None: `$SAM_CHECKPOINT`, else the cached
            or downloaded official file.
        quantize: "none", or "int8": int8 Linear layers in the image parts of both models
            (CPU only; `segmentation.fast_modes`).
        compile: `torch.compile` SAM's image encoder (eager, after a warning, without a
            compiler; `segmentation.fast_modes`).
    """

    detector: str
    sam: str
    device: str
    offline: bool
    sam_checkpoint: str | None = None
    quantize: str = "none"
    compile: bool = False

    def describe(self) -> str:
        """A one-line summary for banners and logs."""
        preset = DETECTOR_PRESETS.get(self.detector)
        if preset is not None:
            detector = preset.display_name
        elif hub.is_hub_id(self.detector):
            detector = self.detector
        else:
            detector = Path(self.detector).name
        modes = "".join(
            text
            for text, on in (
                (", int8 Linear layers", self.quantize == "int8"),
                (", torch.compile (SAM encoder)", self.compile),
            )
            if on
        )
        if self.offline:
            return (
                f"small Grounding DINO + small SAM trained on synthetic shapes (offline) "
                f"on {self.device}{modes}"
            )
        return (
            f"Grounding DINO {detector} + SAM {SAM_CHECKPOINTS[self.sam].display_name} "
            f"on {self.device}, "
            f"pretrained weights{modes}"
        )


def _detector_names() -> str:
    """ "swint (default), swinb": the short names of the presets, for help texts."""
    names = [
        (preset.aliases[0] if preset.aliases else preset.name)
        + (" (default)" if preset.name == DEFAULT_DETECTOR else "")
        for preset in DETECTOR_PRESETS.values()
    ]
    return ", ".join(names)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--detector, --sam, --sam-checkpoint, --device, --offline, --quantize, --compile (with
    environment fallbacks)."""
    group = parser.add_argument_group(
        "models", "each flag falls back to the environment variable named in its help"
    )
    group.add_argument(
        "--detector",
        default=None,
        help=f"{_detector_names()}, a Hub id such as IDEA-Research/grounding-dino-tiny, or the "
        f"path of a SwinT .pth or of a transformers-format directory; env {ENV_DETECTOR}. A "
        f"local SwinB .pth: --detector swinb with GROUNDING_DINO_CHECKPOINT=PATH",
    )
    group.add_argument(
        "--sam",
        default=None,
        choices=SAM_VARIANTS,
        help=f"SAM encoder; default vit_h on a GPU, vit_b on CPU; env {ENV_SAM}",
    )
    group.add_argument(
        "--sam-checkpoint",
        default=None,
        help="a local SAM .pth for --sam (default: env SAM_CHECKPOINT, else the "
        "official file, downloaded once)",
    )
    group.add_argument(
        "--device",
        default=None,
        help=f"cpu, cuda, cuda:1, ...; default cuda when available; env {ENV_DEVICE}",
    )
    group.add_argument(
        "--offline",
        action="store_true",
        default=None,
        help=f"the small shapes models shipped in assets/: no downloads; they "
        f"know 12 names such as 'red circle'; env {ENV_OFFLINE}=1",
    )
    group.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE_MODES,
        help=f"int8: dynamic int8 Linear layers in the image parts of both models, CPU only "
        f"(about 1.4x faster on full-size models, slightly different scores; an error on "
        f"CUDA); default none; env {ENV_QUANTIZE}",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help=f"torch.compile SAM's image encoder (the first image waits for the compiler; "
        f"eager, after a warning, without one); env {ENV_COMPILE}=1",
    )


def resolve_detector(detector: str) -> str:
    """A preset's name for a preset name or alias ("swint" -> "swint_ogc"); an existing path or
    a Hub id as it is.

    Raises:
        ValueError: a path that does not exist (named), or an unknown name.
    """
    preset = detector_preset(detector)
    if preset is not None:
        return preset.name
    if Path(detector).exists() or hub.is_hub_id(detector):
        return detector
    if hub.looks_like_path(detector) or "/" in detector:
        raise ValueError(
            f"detector checkpoint {detector} does not exist (flag --detector, env {ENV_DETECTOR})"
        )
    raise ValueError(
        f"unknown detector {detector!r}: use {_detector_names()}, a Hub id or the path of a "
        f"checkpoint (flag --detector, env {ENV_DETECTOR})"
    )


def model_choice(
    args: argparse.Namespace,
    environ: Mapping[str, str] = os.environ,
) -> ModelChoice:
    """Resolve the model flags: flag, else environment variable, else the default.

    Raises:
        ValueError: an unknown detector name (or a detector path that does not exist), SAM
            variant or quantize mode, int8 on a device other than the CPU, or a
            `GROUNDED_SAM_COMPILE` that is neither 1 nor 0.
    """
    offline = (
        args.offline
        if args.offline is not None
        else environ.get(ENV_OFFLINE, "").strip().lower() in _TRUE
    )
    device = args.device or environ.get(ENV_DEVICE) or default_device(environ)
    detector = resolve_detector(args.detector or environ.get(ENV_DETECTOR) or DEFAULT_DETECTOR)
    sam = args.sam or environ.get(ENV_SAM) or ("vit_b" if device == "cpu" else "vit_h")
    if sam not in SAM_VARIANTS:
        raise ValueError(
            f"unknown SAM variant {sam!r}: use one of {', '.join(SAM_VARIANTS)} "
            f"(flag --sam, env {ENV_SAM})"
        )
    quantize = (args.quantize or environ.get(ENV_QUANTIZE) or "none").strip().lower()
    if quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"unknown quantize mode {quantize!r}: use one of {', '.join(QUANTIZE_MODES)} "
            f"(flag --quantize, env {ENV_QUANTIZE})"
        )
    if quantize == "int8" and not device.startswith("cpu"):
        raise ValueError(
            f"--quantize int8 runs on the CPU only, not on {device}: drop it there (flag "
            f"--quantize, env {ENV_QUANTIZE}), or add --device cpu"
        )
    compile_flag = environ.get(ENV_COMPILE, "").strip().lower()
    if args.compile is None and compile_flag not in _TRUE + _FALSE:
        raise ValueError(
            f"{ENV_COMPILE}={environ[ENV_COMPILE]!r}: use 1 or 0 (or true / false) (flag --compile)"
        )
    return ModelChoice(
        detector=detector,
        sam=sam,
        device=device,
        offline=offline,
        sam_checkpoint=args.sam_checkpoint,
        quantize=quantize,
        compile=args.compile if args.compile is not None else compile_flag in _TRUE,
    )


def load_models(choice: ModelChoice, look_ahead: LookAhead = DEFAULT_LOOK_AHEAD):
    """The GroundedSAM pipeline for a choice (downloads weights on first use unless offline),
    decoding masks ahead as `look_ahead` says."""
    from segmentation.build import load_pipeline

    return load_pipeline(
        detector=choice.detector,
        sam=choice.sam,
        device=choice.device,
        offline=choice.offline,
        sam_checkpoint=choice.sam_checkpoint,
        quantize=choice.quantize,
        compile=choice.compile,
        look_ahead=look_ahead,
    )
