"""Training a small SAM for box -> mask (Kirillov et al., arXiv 2304.02643, §3 and App. A): `train`
and the command line; the loop itself (`SamTrainer`) is in `segmentation.sam_training_loop`.

The model and its default size are in `segmentation.small_sam`, the data (COCO folders) and the
evaluation in `segmentation.sam_data`, the loss in `segmentation.sam_losses`.

Recipe (paper App. A), with our choices where it is silent:
- One mask per box (`multimask_output=False`, SAM's single-output token for unambiguous prompts).
- Boxes are jittered in training, at most 20 pixels of SAM's 1024 frame (`segmentation.sam_data`).
- Loss (`segmentation.sam_losses`): 20 x focal + 1 x dice + 1 x MSE of the IoU head against the
  actual IoU. The decoder's logits are upscaled bilinearly to the padded input square (the first
  step of `Sam.postprocess_masks`) and compared with the ground truth resized to the input frame
  (area average, then >= 0.5); the padding is left out.
- AdamW (no weight decay on biases and norms), linear warm-up then cosine decay to 0 over
  `epochs`, gradient-norm clipping. Training starts from random weights (no pre-training).

Randomness (annotation choice, jitter) comes from (seed, epoch, index) and the epoch's order from
(seed, epoch); the model has no dropout, so a run resumed from `last.pt` computes exactly the steps
of an uninterrupted one.

    python -m segmentation.sam_training --train shapes/train --val shapes/val --out runs/sam
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from grounding.devices import default_device
from segmentation.sam_training_loop import (
    BEST_FILE,
    CHECKPOINT_FILE,
    SamTrainer,
    TrainingOptions,
    TrainingStopped,
)
from segmentation.small_sam import SmallSamConfig, build_small_sam, export_fp16

logger = logging.getLogger(__name__)

CONFIG_FILE = "sam_config.json"


def train(
    options: TrainingOptions, config: SmallSamConfig | None = None, *, resume: bool = False
) -> dict:
    """Train a small SAM (see the module docstring); returns `SamTrainer.fit`'s summary.

    Args:
        options: the loop's settings.
        config: the model's sizes; default `SmallSamConfig()`, or the checkpoint's on resume.
        resume: continue from `out_dir/last.pt` (with the same options, the same results as an
            uninterrupted run).

    Raises:
        TrainingStopped: a non-finite loss or gradient.
        FileExistsError: `out_dir/last.pt` exists and `resume` is False.
        FileNotFoundError: `resume` without `out_dir/last.pt`.
    """
    out_dir = Path(options.out_dir)
    last = out_dir / CHECKPOINT_FILE
    state = None
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"cannot resume: {last} does not exist")
        state = torch.load(last, map_location="cpu", weights_only=True)
        recorded = SmallSamConfig.from_dict(state["config"])
        if config is not None and config != recorded:
            logger.warning(
                "resuming with the checkpoint's model config %s, not %s", recorded, config
            )
        config = recorded
    elif last.exists():
        raise FileExistsError(
            f"{last} exists: pass --resume to continue that run, or choose another --out"
        )
    config = config or SmallSamConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    sam = build_small_sam(config).to(options.device)
    trainer = SamTrainer(sam, config, options)
    if state is not None:
        trainer.load_state_dict(state)
    (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=1) + "\n")
    return trainer.fit()


# --------------------------------------------------------------------------------- command line

_MODEL_FLAGS = (
    "image_size",
    "patch_size",
    "encoder_dim",
    "encoder_depth",
    "encoder_heads",
    "prompt_dim",
    "decoder_depth",
    "decoder_heads",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m segmentation.sam_training",
        description="Train a small SAM for box -> mask on a COCO folder (images/ + "
        "annotations.json with masks). Writes OUT/metrics.jsonl, OUT/last.pt, "
        "OUT/best.safetensors and OUT/sam_config.json.",
    )
    parser.add_argument("--train", type=Path, required=True, help="training COCO folder")
    parser.add_argument("--val", type=Path, help="validation COCO folder (mean mask IoU)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    defaults = TrainingOptions(Path(), Path())
    for flag, kind, help_text in (
        ("epochs", int, "epochs (they set the schedule)"),
        ("batch-size", int, "images"),
        ("masks-per-image", int, "boxes drawn per image"),
        ("lr", float, "AdamW rate"),
        ("weight-decay", float, "AdamW decay"),
        ("warmup", int, "warm-up steps"),
        ("clip-grad-norm", float, "0 = no clipping"),
        ("seed", int, "seed"),
        ("max-steps", int, "stop after this many steps (same schedule)"),
        ("log-every", int, "steps between metrics lines"),
        ("checkpoint-every", int, "steps between checkpoints (default: each epoch)"),
        ("val-max-images", int, "evaluate on the first N val images"),
        ("workers", int, "data loader processes"),
    ):
        name = "warmup_steps" if flag == "warmup" else flag.replace("-", "_")
        parser.add_argument(
            f"--{flag}",
            type=kind,
            default=getattr(defaults, name),
            dest=name,
            help=f"{help_text} (default %(default)s)",
        )
    parser.add_argument("--resume", action="store_true", help="continue OUT/last.pt")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--export-fp16",
        type=Path,
        metavar="PATH",
        help="at the end, write best.safetensors as fp16 safetensors to PATH",
    )
    model = parser.add_argument_group("model size (default SmallSamConfig; ignored on --resume)")
    for name in _MODEL_FLAGS:
        model.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            help=f"default {getattr(SmallSamConfig(), name)}",
        )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1: training stopped, 2: bad arguments)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {name: getattr(args, name) for name in _MODEL_FLAGS if getattr(args, name)}
    options = TrainingOptions(
        train_dir=args.train,
        out_dir=args.out,
        val_dir=args.val,
        device=args.device,
        progress=not args.no_progress,
        **{
            f.name: getattr(args, f.name)
            for f in fields(TrainingOptions)
            if f.name not in ("train_dir", "out_dir", "val_dir", "device", "progress")
        },
    )
    try:
        summary = train(options, SmallSamConfig(**sizes) if sizes else None, resume=args.resume)
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.export_fp16:
        summary["fp16"] = str(export_fp16(args.out / BEST_FILE, args.export_fp16))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
