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
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from grounding.config import LossConfig
from grounding.dataset import CocoGroundingDataset
from grounding.devices import default_device
from grounding.losses import SetCriterion
from grounding.model import GroundingDINO, build_model
from grounding.native_format import config_from_dict, config_to_dict, is_native, load_native
from grounding.optim import build_scheduler, freeze, parameter_groups, set_rng_state
from grounding.train_args import SCRATCH_CONFIGS, check_resume_flags, parse_args, recorded_flags
from grounding.trainer import Trainer, TrainingOptions
from grounding.training_checkpoint import STATE_FILE, read_training_state
from grounding.training_step import TrainingStopped, steps_per_epoch

logger = logging.getLogger(__name__)


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
    """(model, tokenizer): from `--checkpoint`, or random weights for `--config`.

    `--text-encoder` is read as `load_tokenizer` reads it in both cases: a folder with vocab.txt,
    a Hub id, or the vocabulary file itself.
    """
    if args.checkpoint is None:
        tokenizer = load_tokenizer(args.text_encoder)
        return build_model(SCRATCH_CONFIGS[args.config](len(tokenizer))), tokenizer
    from grounding.build import load_detector

    def load(text_encoder: str | None):
        return load_detector(
            args.checkpoint,
            config=args.config or "swint_ogc",
            text_encoder=text_encoder,
            device="cpu",
        )

    if args.text_encoder is None or not Path(args.text_encoder).is_file():
        detector = load(args.text_encoder)
        return detector.model, detector.tokenizer
    # `load_detector` takes a folder holding vocab.txt (or a Hub id), not the file: the file goes
    # into a folder of its own for it, and the tokenizer is the one `--config` would use.
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(args.text_encoder, Path(folder) / "vocab.txt")
        detector = load(folder)
    return detector.model, load_tokenizer(args.text_encoder)


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
        if not (last_dir / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume: {last_dir} has no {STATE_FILE}")
        state = read_training_state(last_dir)
        check_resume_flags(state["args"], args)
        model = build_model(config_from_dict(state["model_config"]))
        # `save_detector` wrote it: our own format for what transformers cannot hold
        # (`contrastive_bias`, e.g. --config shapes), transformers' otherwise.
        (load_native if is_native(last_dir) else load_transformers)(model, last_dir)
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
            "args": recorded_flags(args),
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
