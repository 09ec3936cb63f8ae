"""Fine-tune (or train from scratch) Grounding DINO on a COCO-format detection set (paper §3.5).

Fine-tuning the official SwinT-OGC weights on a COCO-format set:

    python -m grounding.train --checkpoint groundingdino_swint_ogc.pth --config swint_ogc \\
        --train-images coco/train2017 \\
        --train-annotations coco/annotations/instances_train2017.json \\
        --val-images coco/val2017 --val-annotations coco/annotations/instances_val2017.json \\
        --out runs/coco --epochs 12 --lr-drop-epochs 11 --batch-size 4 --bf16

`--checkpoint` also takes a transformers-format directory or a Hub id such as
IDEA-Research/grounding-dino-tiny; `--config tiny --text-encoder DIR` trains a small model from
random weights instead (DIR holds BERT's vocab.txt). Continue an interrupted run with the same
command plus `--resume`.

Recipe and defaults (sources: Open-GroundingDino `config/cfg_coco.py` and `cfg_odvg.py`,
MM-Grounding-DINO `configs/grounding_dino/grounding_dino_swin-t_finetune_16xb2_1x_coco.py`):
- AdamW, lr 1e-4; Swin backbone 1e-5 (`lr_backbone`); BERT 1e-5, and frozen when fine-tuning
  (`freeze_keywords=['bert']`; `--train-text` trains it); weight decay 1e-4 on all parameters;
  gradient-norm clip 0.1 (both projects); no warm-up.
- 12 epochs with the learning rate x 0.1 from epoch 12 (`--lr-drop-epochs 11`: MM-Grounding-DINO's
  1x COCO schedule; Open-GroundingDino: 15 epochs, drop at 4); batch 4 per GPU (Open-GroundingDino).
- Data (`grounding.dataset`): captions of the image's categories plus 50 sampled negatives;
  horizontal flip and short side 480-800 (long side <= 1333).
- Losses (`grounding.losses`): focal 2, L1 5, GIoU 2 on every decoder layer and on the encoder's
  proposals; Hungarian matching with costs 2 / 5 / 2.
- Frozen parts run in eval mode (no dropout or drop path), as detection codebases treat frozen
  stages; Open-GroundingDino leaves BERT's dropout on.

Outputs in `--out`:
- `metrics.jsonl`: per logged step {"type": "train", step, epoch, lr (and lr_<group>), loss, every
  loss term, grad_norm, images, seconds}; per evaluation {"type": "eval", step, epoch, AP, AP50,
  ..., per_category, seconds}.
- `last/`: transformers-format checkpoint (`grounding.load_detector("OUT/last")`,
  `GroundingDinoForObjectDetection.from_pretrained("OUT/last")`) plus `training_state.pt`
  (optimiser, schedule, epoch, step, RNG states, best AP) for `--resume`, written after every epoch
  and when `--max-steps` stops the run.
- `best/`: the checkpoint with the best validation AP, with its `metrics.json`.

A non-finite loss stops training with exit status 1, naming the step and the last good checkpoint;
nothing is saved from the broken step. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from grounding.config import (
    PRESETS,
    GroundingDINOConfig,
    LossConfig,
    shapes_config,
    tiny_config,
)
from grounding.dataset import MULTI_SCALE_SIZES, CocoGroundingDataset
from grounding.devices import default_device
from grounding.losses import SetCriterion
from grounding.model import GroundingDINO, build_model
from grounding.native_format import config_from_dict, config_to_dict
from grounding.optim import (
    FREEZABLE,
    SCHEDULES,
    build_scheduler,
    freeze,
    parameter_groups,
    set_rng_state,
)
from grounding.trainer import (
    Trainer,
    TrainingOptions,
    TrainingStopped,
    read_training_state,
    steps_per_epoch,
)

logger = logging.getLogger(__name__)


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
        description=__doc__.split("\n")[0],
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


def choose_device(requested: str | None, bf16: bool) -> tuple[torch.device, bool]:
    """The device, and whether bfloat16 autocast is used (CUDA only; a warning otherwise)."""
    device = torch.device(requested or default_device())
    if bf16 and device.type != "cuda":
        logger.warning("--bf16 is for CUDA devices; training in float32 on %s", device)
        bf16 = False
    return device, bf16


def load_tokenizer(text_encoder: str | None):
    """A BERT tokenizer from a folder with vocab.txt, a vocab file, or (None) bert-base-uncased."""
    from transformers import BertTokenizer

    from grounding import hub

    if text_encoder is not None and Path(text_encoder).is_file():
        # transformers 5 ignores `vocab_file=`; the vocabulary goes in as `vocab=`.
        return BertTokenizer(vocab=str(text_encoder), do_lower_case=True)
    return BertTokenizer.from_pretrained(
        str(hub.text_encoder_dir(text_encoder)), do_lower_case=True
    )


def initial_model(args: argparse.Namespace) -> tuple[GroundingDINO, object]:
    """(model, tokenizer): from `--checkpoint`, or random weights for `--config`."""
    if args.checkpoint is not None:
        from grounding.build import load_detector

        detector = load_detector(
            args.checkpoint,
            config=args.config or "swint_ogc",
            text_encoder=args.text_encoder,
            device="cpu",
        )
        return detector.model, detector.tokenizer
    tokenizer = load_tokenizer(args.text_encoder)
    return build_model(SCRATCH_CONFIGS[args.config](len(tokenizer))), tokenizer


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(args: argparse.Namespace) -> dict:
    """Run training as `args` (from `parse_args`) say; returns the `Trainer.fit` summary.

    Raises:
        TrainingStopped: a non-finite loss or gradient (the message names the step and the last
            good checkpoint).
        FileExistsError: `--out` holds a run and `--resume` was not given.
    """
    from transformers import BertTokenizer

    from grounding.checkpoint import load_transformers

    out_dir, last_dir = args.out, args.out / "last"
    device, bf16 = choose_device(args.device, args.bf16)
    state = None
    if args.resume:
        if not (last_dir / "training_state.pt").is_file():
            raise FileNotFoundError(f"--resume: {last_dir} has no training_state.pt")
        state = read_training_state(last_dir)
        _check_resume_flags(state["args"], args)
        model = build_model(config_from_dict(state["model_config"]))
        load_transformers(model, last_dir)
        tokenizer = BertTokenizer.from_pretrained(str(last_dir), do_lower_case=True)
        from_scratch = state["from_scratch"]
    else:
        if last_dir.exists() or (out_dir / "metrics.jsonl").exists():
            raise FileExistsError(
                f"{out_dir} holds a run: continue it with --resume or choose another --out"
            )
        _seed_everything(args.seed)
        model, tokenizer = initial_model(args)
        from_scratch = args.checkpoint is None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)

    # From scratch BERT is random and must learn; fine-tuning keeps it (Open-GroundingDino).
    frozen = list(args.freeze) + (["text"] if not (from_scratch or args.train_text) else [])
    frozen_modules = freeze(model, frozen)
    optimizer = torch.optim.AdamW(
        parameter_groups(
            model,
            lr=args.lr,
            lr_backbone=args.lr_backbone,
            lr_text=args.lr_text,
            weight_decay=args.weight_decay,
        )
    )
    dataset = CocoGroundingDataset(
        args.train_images,
        args.train_annotations,
        tokenizer,
        train=True,
        max_text_len=model.config.max_text_len,
        negatives=args.negatives,
        distractors=args.distractors,
        sizes=args.sizes,
        max_size=args.max_size,
        seed=args.seed,
    )
    if len(dataset) == 0:
        raise ValueError(f"{args.train_annotations} lists no usable image")
    options = TrainingOptions(
        out_dir=out_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        accumulate=args.accumulate,
        clip_max_norm=args.clip_max_norm,
        max_steps=args.max_steps,
        log_every=args.log_every,
        eval_every=args.eval_every,
        seed=args.seed,
        workers=args.workers,
        bf16=bf16,
        val_images=args.val_images,
        val_annotations=args.val_annotations,
        val_max_images=args.val_max_images,
        eval_size=args.eval_size,
        eval_max_size=args.max_size,
        progress=not args.no_progress,
    )
    epoch_steps = steps_per_epoch(len(dataset), args.batch_size, args.accumulate)
    scheduler = build_scheduler(
        optimizer,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        steps_per_epoch=epoch_steps,
        total_steps=args.epochs * epoch_steps,
        drop_epochs=tuple(args.lr_drop_epochs),
        drop_factor=args.lr_drop_factor,
    )
    recorded_args = {key: _plain(value) for key, value in vars(args).items()}
    trainer = Trainer(
        model,
        tokenizer,
        SetCriterion(LossConfig()),
        optimizer,
        scheduler,
        dataset,
        options,
        device,
        frozen_modules=frozen_modules,
        extra_state={
            "model_config": config_to_dict(model.config),
            "args": recorded_args,
            "from_scratch": from_scratch,
            "frozen": frozen,
        },
    )
    if state is not None:
        trainer.load_state_dict(state)
        set_rng_state(state["rng"])  # last: building the pieces above may draw random numbers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "training %d of %d parameters on %s (frozen: %s); %d images, %d steps per epoch",
        trainable,
        sum(p.numel() for p in model.parameters()),
        device,
        ", ".join(frozen) or "nothing",
        len(dataset),
        epoch_steps,
    )
    return trainer.fit()


def _plain(value):
    """A flag's value as something `torch.load(weights_only=True)` reads back."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _check_resume_flags(saved: dict, args: argparse.Namespace) -> None:
    # A flag newer than the run was at its default then.
    saved = {key: saved.get(key, _plain(build_parser().get_default(key))) for key in RESUME_FIXED}
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


def main(argv: Sequence[str] | None = None) -> int:
    """Train; returns 0 when done, 1 when training stopped or could not start."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = train(args)
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"done: {summary['steps']} steps, {summary['epochs']} epochs in "
        f"{summary['seconds']:.0f} s; last checkpoint {summary['last']}"
        + (
            f", best AP {100 * summary['best_ap']:.1f} in {summary['best']}"
            if summary["best"]
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
