"""The small SAM's training loop (`SamTrainer`): optimiser steps, evaluation and checkpoints.

`segmentation.sam_training` builds it (`train`) and is the command line; the recipe, and why a
run resumed from `last.pt` computes exactly the steps of an uninterrupted one, are described there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch.utils.data import DataLoader

from grounding.optim import build_scheduler
from segmentation.sam_data import (
    MaskBatch,
    SamMaskDataset,
    collate,
    evaluate_mask_iou,
    predict_masks,
    read_coco_folder,
)
from segmentation.sam_losses import sam_loss
from segmentation.small_sam import SmallSamConfig, _save_safetensors

logger = logging.getLogger(__name__)

CHECKPOINT_FILE, BEST_FILE, METRICS_FILE = "last.pt", "best.safetensors", "metrics.jsonl"


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
        self.scheduler = build_scheduler(
            self.optimizer,
            schedule="cosine",
            warmup_steps=options.warmup_steps,
            steps_per_epoch=self.batches_per_epoch,
            total_steps=total_steps,
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
