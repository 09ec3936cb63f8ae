"""The command line of `python -m grounding.train`: its flags, their checks, and `--resume`'s.

The recipe behind the defaults and the run folder's contents are described in `grounding.train`.
`--resume` continues a run exactly, so the flags in `RESUME_FIXED` must be those the run was
started with (`training_state.pt` records them, `recorded_flags`); the others (`--epochs`,
`--workers`, ...) may change.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from grounding.config import PRESETS, GroundingDINOConfig, shapes_config, tiny_config
from grounding.dataset import MULTI_SCALE_SIZES
from grounding.optim import FREEZABLE, SCHEDULES

# The first line of `grounding.train`'s docstring.
DESCRIPTION = (
    "Fine-tune (or train from scratch) Grounding DINO on a COCO-format detection set (paper §3.5)."
)


def _preset_with_vocabulary(name: str) -> Callable[[int], GroundingDINOConfig]:
    def config(vocab_size: int) -> GroundingDINOConfig:
        preset = PRESETS[name]()
        return replace(preset, text={**preset.text, "vocab_size": vocab_size})

    return config


# `--config NAME` without `--checkpoint`: random initialisation; takes the tokenizer's vocab size.
SCRATCH_CONFIGS: dict[str, Callable[[int], GroundingDINOConfig]] = {
    "tiny": tiny_config,
    "shapes": shapes_config,
    **{name: _preset_with_vocabulary(name) for name in PRESETS},
}
# Flags that must not change on --resume (others, such as --epochs or --workers, may).
RESUME_FIXED = (
    "batch_size",
    "accumulate",
    "lr",
    "lr_backbone",
    "lr_text",
    "weight_decay",
    "schedule",
    "lr_drop_epochs",
    "lr_drop_factor",
    "warmup_steps",
    "freeze",
    "train_text",
    "seed",
    "sizes",
    "max_size",
    "negatives",
    "distractors",
    "bf16",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grounding.train",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train-images",
        type=Path,
        required=True,
        help="folder the annotations' file_names are relative to",
    )
    data.add_argument("--train-annotations", type=Path, required=True, help="COCO JSON")
    data.add_argument("--val-images", type=Path, help="validation images (COCO AP per epoch)")
    data.add_argument("--val-annotations", type=Path, help="COCO JSON")
    data.add_argument("--val-max-images", type=int, help="evaluate on the first N images only")
    data.add_argument("--out", type=Path, required=True, help="run folder")
    data.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(MULTI_SCALE_SIZES),
        help="training short sides, one drawn per image",
    )
    data.add_argument("--max-size", type=int, default=1333, help="longest side after resizing")
    data.add_argument("--eval-size", type=int, help="evaluation short side (default max --sizes)")
    data.add_argument("--negatives", type=int, default=50, help="absent categories per caption")
    data.add_argument(
        "--distractors",
        type=int,
        default=0,
        help="phrases of random vocabulary words per caption, naming nothing (for "
        "datasets of few categories: unknown names then find nothing)",
    )
    init = parser.add_argument_group("initialisation")
    init.add_argument("--checkpoint", help="official .pth, transformers directory or Hub id")
    init.add_argument(
        "--config",
        choices=sorted(SCRATCH_CONFIGS),
        help="architecture: of a .pth checkpoint, or to train from scratch",
    )
    init.add_argument(
        "--text-encoder",
        help="folder with BERT's vocab.txt (or the vocab file); "
        "needed from scratch, optional with a .pth",
    )
    init.add_argument("--resume", action="store_true", help="continue from OUT/last")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=12, help="may grow on --resume")
    optim.add_argument("--batch-size", type=int, default=4, help="images per batch")
    optim.add_argument("--accumulate", type=int, default=1, help="batches per optimiser step")
    optim.add_argument("--lr", type=float, default=1e-4, help="AdamW rate of the detector")
    optim.add_argument("--lr-backbone", type=float, default=1e-5, help="of the Swin backbone")
    optim.add_argument("--lr-text", type=float, default=1e-5, help="of BERT, when it trains")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="on all parameters")
    optim.add_argument("--clip-max-norm", type=float, default=0.1, help="0 disables clipping")
    optim.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    optim.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="step",
        help="per-step: drops at --lr-drop-epochs, or a cosine to 0",
    )
    optim.add_argument(
        "--lr-drop-epochs",
        type=int,
        nargs="*",
        default=[11],
        help="step schedule: multiply by --lr-drop-factor after these epochs",
    )
    optim.add_argument("--lr-drop-factor", type=float, default=0.1)
    optim.add_argument(
        "--freeze",
        nargs="+",
        default=[],
        choices=sorted(FREEZABLE),
        metavar="PART",
        help=f"parts to keep fixed: {', '.join(FREEZABLE)}",
    )
    optim.add_argument(
        "--train-text",
        action="store_true",
        help="train BERT too when fine-tuning (frozen by default)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    run.add_argument("--device", help="default cuda when available, else cpu")
    run.add_argument("--workers", type=int, default=2, help="data-loading processes")
    run.add_argument(
        "--threads",
        type=int,
        help="torch's CPU threads (default: torch's; on a shared machine 1 avoids "
        "threads waiting on each other)",
    )
    run.add_argument("--seed", type=int, default=0, help="initialisation, data order, samples")
    run.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    run.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    run.add_argument("--log-every", type=int, default=10, help="steps between metrics lines")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.resume and args.checkpoint is None and args.config is None:
        parser.error("pass --checkpoint to fine-tune, or --config to train from scratch")
    if args.checkpoint is not None and args.config not in (None, *PRESETS):
        parser.error(
            f"--config {args.config} has no official checkpoint; "
            "drop --checkpoint to train it from scratch"
        )
    if (args.val_images is None) != (args.val_annotations is None):
        parser.error("--val-images and --val-annotations go together")
    if args.train_text and "text" in args.freeze:
        parser.error("--train-text contradicts --freeze text")
    for name in ("epochs", "batch_size", "accumulate", "eval_every", "log_every", "max_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.sizes) < 1 or args.workers < 0 or args.warmup_steps < 0:
        parser.error("--sizes must be positive, --workers and --warmup-steps not negative")
    if args.eval_size is None:
        args.eval_size = max(args.sizes)
    return args


def _plain(value):
    """A flag's value as something `torch.load(weights_only=True)` reads back."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def recorded_flags(args: argparse.Namespace) -> dict:
    """Every flag's value as `training_state.pt` records it (see `check_resume_flags`)."""
    return {key: _plain(value) for key, value in vars(args).items()}


def check_resume_flags(saved: dict, args: argparse.Namespace) -> None:
    """Raises ValueError naming each flag of `RESUME_FIXED` that `args` changes from `saved`.

    Args:
        saved: the run's `recorded_flags`; a flag newer than the run is taken at its default.
        args: this invocation's flags (`parse_args`).
    """
    defaults = build_parser()
    saved = {key: saved.get(key, _plain(defaults.get_default(key))) for key in RESUME_FIXED}
    changed = [
        f"--{key.replace('_', '-')} {saved[key]!r} -> {_plain(getattr(args, key))!r}"
        for key in RESUME_FIXED
        if saved[key] != _plain(getattr(args, key))
    ]
    if changed:
        raise ValueError(
            "--resume continues the run exactly, so these flags must not change: "
            + "; ".join(changed)
        )
