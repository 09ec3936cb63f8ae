"""Training a small SAM for box -> mask (Kirillov et al., arXiv 2304.02643, §3 and App. A): the
loop (`SamTrainer`, `train`) and the command line.

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
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch.utils.data import DataLoader

from grounding.devices import default_device
from segmentation.sam_data import (
    MaskBatch,
    SamMaskDataset,
    collate,
    evaluate_mask_iou,
    predict_masks,
    read_coco_folder,
)
from segmentation.sam_losses import sam_loss
from segmentation.small_sam import SmallSamConfig, _save_safetensors, build_small_sam, export_fp16

logger = logging.getLogger(__name__)

CHECKPOINT_FILE, BEST_FILE = "last.pt", "best.safetensors"
CONFIG_FILE, METRICS_FILE = "sam_config.json", "metrics.jsonl"


# ------------------------------------------------------------------------------- training loop


class TrainingStopped(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the last good checkpoint."""


@dataclass
class TrainingOptions:
    """The loop's settings: the command-line flags of the same names.

    `epochs` sets the schedule (warm-up, then cosine to 0 at the last step of the last epoch);
    `max_steps` only stops early, so a short run follows the long run's schedule. A checkpoint
    (and an evaluation, with `val_dir`) comes every `checkpoint_every` steps, by default at the
    end of every epoch, and always at the end.
    """

    train_dir: Path
    out_dir: Path
    val_dir: Path | None = None
    epochs: int = 20
    batch_size: int = 8
    masks_per_image: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    clip_grad_norm: float = 1.0
    seed: int = 0
    max_steps: int | None = None
    log_every: int = 10
    checkpoint_every: int | None = None
    val_max_images: int | None = None
    device: str = "cpu"
    workers: int = 0
    progress: bool = True


@dataclass
class Progress:
    """Where training stands (saved in `last.pt`); `position` counts the batches of the current
    epoch's order already consumed, `seconds` the training time of all runs so far."""

    epoch: int = 0
    position: int = 0
    step: int = 0
    best_iou: float | None = None
    best_step: int | None = None
    seconds: float = 0.0
    saved_step: int | None = None


def learning_rate_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then a half cosine to 0 at `total_steps`."""
    warmup = min(1.0, (step + 1) / (warmup_steps + 1))
    done = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    return warmup * 0.5 * (1.0 + math.cos(math.pi * done))


class SamTrainer:
    """Optimiser steps over a `SamMaskDataset`, evaluation and checkpoints in `options.out_dir`."""

    def __init__(self, sam: Sam, config: SmallSamConfig, options: TrainingOptions) -> None:
        self.sam, self.config, self.options = sam, config, options
        self.device = torch.device(options.device)
        self.out_dir = Path(options.out_dir)
        self.dataset = SamMaskDataset(
            options.train_dir, config, seed=options.seed, masks_per_image=options.masks_per_image
        )
        if not len(self.dataset):
            raise ValueError(f"{options.train_dir} has no image with a usable mask annotation")
        self.batches_per_epoch = math.ceil(len(self.dataset) / options.batch_size)
        total_steps = options.epochs * self.batches_per_epoch
        decayed = [p for p in sam.parameters() if p.ndim >= 2]
        not_decayed = [p for p in sam.parameters() if p.ndim < 2]  # biases and norms
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decayed, "weight_decay": options.weight_decay},
                {"params": not_decayed, "weight_decay": 0.0},
            ],
            lr=options.lr,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: learning_rate_factor(
                step, warmup_steps=options.warmup_steps, total_steps=total_steps
            ),
        )
        self.val_entries = read_coco_folder(options.val_dir) if options.val_dir else None
        self.progress = Progress()

    def state_dict(self) -> dict:
        """Everything `load_state_dict` needs; `torch.load(..., weights_only=True)` reads it."""
        return {
            "model": self.sam.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "progress": asdict(self.progress),
            "rng": {"torch": torch.get_rng_state()},
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        self.sam.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = Progress(**state["progress"])
        torch.set_rng_state(state["rng"]["torch"])
        metrics = self.out_dir / METRICS_FILE
        if metrics.exists():  # drop what a run logged after its last checkpoint
            lines = metrics.read_text(encoding="utf-8").splitlines()
            metrics.write_text(
                "".join(
                    line + "\n"
                    for line in lines
                    if line.strip() and json.loads(line)["step"] <= self.progress.step
                ),
                encoding="utf-8",
            )

    def fit(self) -> dict:
        """Train to the end of `epochs` (or `max_steps`); returns a summary."""
        from tqdm import tqdm

        options, progress = self.options, self.progress
        self._started, self._seconds_before = time.perf_counter(), progress.seconds
        first_step, images = progress.step, 0
        last_step = options.epochs * self.batches_per_epoch
        if options.max_steps is not None:
            last_step = min(last_step, options.max_steps)
        self.sam.train()
        with tqdm(
            total=last_step,
            initial=progress.step,
            unit="step",
            file=sys.stderr,
            disable=not options.progress,
            dynamic_ncols=True,
        ) as bar:
            while progress.epoch < options.epochs and not self._reached_max_steps():
                for batch in self._epoch_batches():
                    progress.position += 1
                    if batch is None:
                        logger.warning(
                            "epoch %d: batch %d has no readable image; no step",
                            progress.epoch + 1,
                            progress.position,
                        )
                    else:
                        record = self._step(batch)
                        images += len(batch.image_ids)
                        bar.update(1)
                        bar.set_postfix(
                            loss=f"{record['loss']:.3g}",
                            iou=f"{record['mask_iou']:.3f}",
                            refresh=False,
                        )
                    epoch_ended = progress.position == self.batches_per_epoch
                    if epoch_ended:
                        progress.epoch, progress.position = progress.epoch + 1, 0
                    if self._checkpoint_due(epoch_ended):
                        self._checkpoint()
                    if epoch_ended or self._reached_max_steps():
                        break
        seconds = time.perf_counter() - self._started
        return {
            "steps": progress.step,
            "epochs": progress.epoch,
            "seconds": round(seconds, 3),
            "steps_per_second": (progress.step - first_step) / max(seconds, 1e-9),
            "images_per_second": images / max(seconds, 1e-9),
            "best_val_mean_iou": progress.best_iou,
            "best_step": progress.best_step,
            "last": str(self.out_dir / CHECKPOINT_FILE),
            "best": str(self.out_dir / BEST_FILE),
        }

    def _epoch_batches(self) -> DataLoader:
        """The rest of the current epoch's batches; the order is a function of (seed, epoch)."""
        options, progress = self.options, self.progress
        self.dataset.set_epoch(progress.epoch)
        order = (
            np.random.default_rng((options.seed, progress.epoch))
            .permutation(len(self.dataset))
            .tolist()
        )
        batches = [
            order[i : i + options.batch_size] for i in range(0, len(order), options.batch_size)
        ]
        return DataLoader(
            self.dataset,
            batch_sampler=batches[progress.position :],
            collate_fn=collate,
            num_workers=options.workers,
        )

    def _elapsed(self) -> float:
        return self._seconds_before + time.perf_counter() - self._started

    def _reached_max_steps(self) -> bool:
        return self.options.max_steps is not None and self.progress.step >= self.options.max_steps

    def _checkpoint_due(self, epoch_ended: bool) -> bool:
        options, progress = self.options, self.progress
        if progress.saved_step == progress.step:
            return False
        finished = self._reached_max_steps() or (epoch_ended and progress.epoch == options.epochs)
        if options.checkpoint_every:
            return finished or progress.step % options.checkpoint_every == 0
        return finished or epoch_ended

    def _step(self, batch: MaskBatch) -> dict:
        options, progress = self.options, self.progress
        logits, iou_predictions = predict_masks(
            self.sam, batch.pixels.to(self.device), [boxes.to(self.device) for boxes in batch.boxes]
        )
        targets = torch.cat(batch.masks).to(self.device)  # (M, S, S)
        total, terms = sam_loss(
            logits, iou_predictions, targets, batch.valid_mask().to(self.device)
        )
        if not bool(torch.isfinite(total)):
            values = ", ".join(f"{name}={value.item():.4g}" for name, value in terms.items())
            raise TrainingStopped(
                self._stop_message(
                    f"the loss is {total.item()} ({values}) on images {batch.image_ids}"
                )
            )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        max_norm = options.clip_grad_norm if options.clip_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.sam.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingStopped(self._stop_message(f"the gradient norm is {grad_norm}"))
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        progress.step += 1
        record = {
            "type": "train",
            "step": progress.step,
            "epoch": progress.epoch + 1,
            "loss": float(total.detach()),
            **{name: float(value.detach()) for name, value in terms.items()},
            "lr": learning_rate,
            "grad_norm": grad_norm,
            "images": len(batch.image_ids),
            "masks": len(targets),
            "seconds": round(self._elapsed(), 3),
        }
        if progress.step % options.log_every == 0 or progress.step == 1:
            self._log(record)
        return record

    def _stop_message(self, problem: str) -> str:
        progress, last = self.progress, self.out_dir / CHECKPOINT_FILE
        kept = (
            f"the last good checkpoint is {last} (step {progress.saved_step}); continue from "
            "it with --resume, for example with a lower --lr"
            if progress.saved_step is not None
            else "no checkpoint was saved before it"
        )
        return (
            f"training stopped at step {progress.step + 1} (epoch {progress.epoch + 1}): "
            f"{problem}. Nothing from this step was kept; {kept}."
        )

    def _log(self, record: dict) -> None:
        with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _checkpoint(self) -> None:
        """Evaluate (with a val set), write `best.safetensors` when better, then `last.pt`.

        Without a val set, `best.safetensors` is the latest checkpoint's weights.
        """
        options, progress = self.options, self.progress
        improved, extra = True, {}
        if self.val_entries is not None:
            result = evaluate_mask_iou(
                self.sam, self.val_entries, max_images=options.val_max_images
            )
            self._log(
                {
                    "type": "eval",
                    "step": progress.step,
                    "epoch": progress.epoch,
                    "val_mean_iou": result["mean_iou"],
                    "val_masks": result["masks"],
                    "val_images": result["images"],
                    "seconds": round(self._elapsed(), 3),
                }
            )
            iou = result["mean_iou"]
            improved = iou is not None and (progress.best_iou is None or iou > progress.best_iou)
            if improved:
                progress.best_iou, extra = iou, {"val_mean_iou": iou}
        if improved:
            progress.best_step = progress.step
            _save_safetensors(
                self.sam.state_dict(),
                self.out_dir / BEST_FILE,
                self.config,
                torch.float32,
                step=progress.step,
                **extra,
            )
        progress.seconds, progress.saved_step = self._elapsed(), progress.step
        temporary = self.out_dir / (CHECKPOINT_FILE + ".partial")
        torch.save(self.state_dict(), temporary)
        os.replace(temporary, self.out_dir / CHECKPOINT_FILE)
        self.sam.train()


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
