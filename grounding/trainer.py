"""The training loop of `python -m grounding.train` (paper §3.5): steps, checkpoints, evaluation.

One optimiser step = `accumulate` consecutive batches of the epoch's order
(`grounding.training_step`). A checkpoint (`grounding.training_checkpoint`) is written after every
epoch and when `max_steps` stops the run; with a validation set, COCO AP is measured first (every
`eval_every` epochs and at the end) and `best/` kept.

Exact resume: the epoch's order comes from (seed, epoch), each sample's randomness from
(seed, epoch, index) (`CocoGroundingDataset.set_epoch`), and the checkpoint stores the model, the
optimiser, the schedule, the position in the epoch and the RNG states (for drop path and dropout).
Evaluation and saving run under `torch.random.fork_rng`, so they never change the training's
random numbers: with or without them, and interrupted or not, a run computes the same steps.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from grounding.dataset import CocoGroundingDataset, GroundingBatch
from grounding.losses import SetCriterion
from grounding.model import GroundingDINO
from grounding.optim import rng_state, set_training_mode
from grounding.training_checkpoint import MetricsLog, save_checkpoint
from grounding.training_step import (
    TrainingStopped,
    accumulate_gradients,
    epoch_batches,
    steps_per_epoch,
)

logger = logging.getLogger(__name__)

SHOWN_TERMS = ("loss_class", "loss_l1", "loss_giou")  # on the progress bar; all in metrics


@dataclass
class TrainingOptions:
    """The loop's settings (see `grounding.train` for the command-line flags)."""

    out_dir: Path
    epochs: int
    batch_size: int
    accumulate: int = 1
    clip_max_norm: float = 0.1
    max_steps: int | None = None
    log_every: int = 10
    eval_every: int = 1
    seed: int = 0
    workers: int = 0
    bf16: bool = False
    val_images: Path | None = None
    val_annotations: Path | None = None
    val_max_images: int | None = None
    eval_size: int = 800
    eval_max_size: int = 1333
    progress: bool = True


@dataclass
class Progress:
    """Where training stands; saved in the checkpoint.

    Attributes:
        epoch: the epoch in progress, 0-based (= epochs completed).
        position: batches of that epoch's order already consumed.
        step: optimiser steps done.
        best_ap: the best validation AP so far, or None.
        best_step: the step of `best_ap`.
        seconds: training time of earlier runs (before a resume).
        saved_step: the step of the checkpoint in `last/`, or None.
    """

    epoch: int = 0
    position: int = 0
    step: int = 0
    best_ap: float | None = None
    best_step: int | None = None
    seconds: float = 0.0
    saved_step: int | None = None


class _Resize(TypedDict):
    """The evaluation resize of `Trainer._resize` (keyword arguments of `save_checkpoint`)."""

    image_size: int
    max_size: int


class Trainer:
    """Runs epochs of optimiser steps, evaluates, checkpoints (see the module docstring).

    Args:
        model: the detector, on `device`, with frozen parameters' `requires_grad` off.
        tokenizer: its tokenizer (saved with every checkpoint).
        criterion: the loss.
        optimizer, scheduler: over the trainable parameters (the scheduler steps per step).
        dataset: the training set.
        options: the loop's settings.
        frozen_modules: submodules kept in eval mode (`optim.freeze`).
        extra_state: saved in `training_state.pt` as is (configuration, flags).
    """

    def __init__(
        self,
        model: GroundingDINO,
        tokenizer,
        criterion: SetCriterion,
        optimizer: torch.optim.Optimizer,
        scheduler,
        dataset: CocoGroundingDataset,
        options: TrainingOptions,
        device: torch.device,
        *,
        frozen_modules: list[str],
        extra_state: dict,
    ) -> None:
        self.model, self.tokenizer, self.criterion = model, tokenizer, criterion
        self.optimizer, self.scheduler, self.dataset = optimizer, scheduler, dataset
        self.options, self.device = options, device
        self.frozen_modules, self.extra_state = frozen_modules, extra_state
        self.special_token_ids = (
            tokenizer.cls_token_id,
            tokenizer.sep_token_id,
            *tokenizer.convert_tokens_to_ids([".", "?"]),
        )
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.progress = Progress()
        self.log = MetricsLog(options.out_dir / "metrics.jsonl")
        self.batches_per_epoch = math.ceil(len(dataset) / options.batch_size)
        self.steps_per_epoch = steps_per_epoch(len(dataset), options.batch_size, options.accumulate)
        self.skipped_batches = 0
        self._started, self._seconds_before = time.perf_counter(), 0.0

    def state_dict(self) -> dict:
        """Everything `--resume` needs besides the weights and the RNG states."""
        return {
            "progress": asdict(self.progress),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **self.extra_state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Optimiser, schedule and progress (restore the RNG states last, when all is built)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = Progress(**state["progress"])
        self.log.keep_until(self.progress.step)

    def fit(self) -> dict:
        """Train until `epochs` (or `max_steps`); returns a summary."""
        options, progress = self.options, self.progress
        self._started, self._seconds_before = time.perf_counter(), progress.seconds
        steps_at_start = progress.step
        while progress.epoch < options.epochs and not self._reached_max_steps():
            epoch_done = self._run_epoch()
            if epoch_done:
                progress.epoch, progress.position = progress.epoch + 1, 0
            evaluate = options.val_images is not None and (
                self._reached_max_steps()
                or epoch_done
                and (progress.epoch % options.eval_every == 0 or progress.epoch == options.epochs)
            )
            self._checkpoint(evaluate)
        seconds = time.perf_counter() - self._started
        return {
            "steps": progress.step,
            "epochs": progress.epoch,
            "seconds": seconds,
            "steps_per_second": (progress.step - steps_at_start) / max(seconds, 1e-9),
            "skipped_batches": self.skipped_batches,
            "best_ap": progress.best_ap,
            "best_step": progress.best_step,
            "last": str(options.out_dir / "last"),
            "best": str(options.out_dir / "best") if progress.best_ap is not None else None,
        }

    def _elapsed(self) -> float:
        """Training seconds, earlier runs included."""
        return self._seconds_before + time.perf_counter() - self._started

    def _reached_max_steps(self) -> bool:
        return self.options.max_steps is not None and self.progress.step >= self.options.max_steps

    def _run_epoch(self) -> bool:
        """Steps through the rest of the current epoch; True when it was finished."""
        from tqdm import tqdm

        options, progress = self.options, self.progress
        set_training_mode(self.model, self.frozen_modules)
        loader = epoch_batches(
            self.dataset,
            batch_size=options.batch_size,
            seed=options.seed,
            epoch=progress.epoch,
            start=progress.position,
            workers=options.workers,
        )
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=progress.position // options.accumulate,
            desc=f"epoch {progress.epoch + 1}/{options.epochs}",
            unit="step",
            disable=not options.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        window: list[GroundingBatch] = []
        consumed = 0
        with bar:
            for batch in loader:
                consumed += 1
                if batch is None:
                    self.skipped_batches += 1
                else:
                    window.append(batch)
                end_of_epoch = progress.position + consumed == self.batches_per_epoch
                if consumed % options.accumulate and not end_of_epoch:
                    continue
                progress.position += consumed
                consumed = 0
                if window:
                    record = self._step(window)
                    bar.set_postfix(
                        {
                            name.removeprefix("loss_"): f"{record[name]:.3g}"
                            for name in ("loss", *SHOWN_TERMS)
                        },
                        refresh=False,
                    )
                else:
                    logger.warning(
                        "epoch %d: no readable image in batches up to %d; no step",
                        progress.epoch + 1,
                        progress.position,
                    )
                window = []
                bar.update(1)
                if self._reached_max_steps():
                    break
        return progress.position >= self.batches_per_epoch

    def _step(self, window: list[GroundingBatch]) -> dict:
        """One optimiser step on the window; logs it every `log_every` steps."""
        options, progress = self.options, self.progress
        rates = {f"lr_{group['name']}": group["lr"] for group in self.optimizer.param_groups}
        try:
            loss, terms = accumulate_gradients(
                self.model,
                self.criterion,
                window,
                self.device,
                self.special_token_ids,
                options.bf16,
            )
            max_norm = options.clip_max_norm if options.clip_max_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, max_norm))
            if not np.isfinite(grad_norm):
                raise TrainingStopped(f"the gradient norm is {grad_norm}")
        except TrainingStopped as error:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingStopped(self._stop_message(str(error))) from None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        progress.step += 1
        record = {
            "type": "train",
            "step": progress.step,
            "epoch": progress.epoch + 1,
            "lr": rates.get("lr_detector", self.optimizer.param_groups[-1]["lr"]),
            **rates,
            "loss": loss,
            **terms,
            "grad_norm": grad_norm,
            "images": sum(len(batch) for batch in window),
            "seconds": round(self._elapsed(), 3),
        }
        if progress.step % options.log_every == 0 or progress.step == 1:
            self.log.write(record)
        return record

    def _stop_message(self, problem: str) -> str:
        progress, last = self.progress, self.options.out_dir / "last"
        kept = (
            f"the last good checkpoint is {last} (step {progress.saved_step}); continue "
            "from it with --resume, for example with a lower --lr or --clip-max-norm"
            if progress.saved_step is not None
            else "no checkpoint was saved before it (none is written before the first epoch "
            "ends or --max-steps is reached)"
        )
        return (
            f"training stopped at step {progress.step + 1} (epoch {progress.epoch + 1}): "
            f"{problem}. Nothing was saved from this step; {kept}."
        )

    def _checkpoint(self, evaluate: bool) -> None:
        """Evaluate (when asked), save `best/` when it improved, then `last/`; RNG untouched."""
        progress = self.progress
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # The RNG states a continuing run starts from: taken before anything else runs.
            random_state = rng_state()
            if evaluate:
                metrics = self.evaluate()
                self.log.write(
                    {
                        "type": "eval",
                        "step": progress.step,
                        "epoch": progress.epoch,
                        **metrics,
                        "seconds": round(self._elapsed(), 3),
                    }
                )
                ap = metrics["AP"]
                if ap is not None and (progress.best_ap is None or ap > progress.best_ap):
                    progress.best_ap, progress.best_step = ap, progress.step
                    save_checkpoint(
                        self.options.out_dir / "best",
                        self.model,
                        self.tokenizer,
                        metrics={"step": progress.step, "epoch": progress.epoch, **metrics},
                        **self._resize,
                    )
            progress.seconds, progress.saved_step = self._elapsed(), progress.step
            save_checkpoint(
                self.options.out_dir / "last",
                self.model,
                self.tokenizer,
                training_state={**self.state_dict(), "rng": random_state},
                **self._resize,
            )
        set_training_mode(self.model, self.frozen_modules)

    @property
    def _resize(self) -> _Resize:
        """The evaluation resize, saved with each checkpoint (`load_detector` restores it)."""
        return {"image_size": self.options.eval_size, "max_size": self.options.eval_max_size}

    def evaluate(self) -> dict:
        """COCO box AP on the validation set (the model is back in training mode afterwards)."""
        from grounding.evaluate_inference import predict_dataset
        from grounding.evaluate_metrics import evaluate_predictions, read_annotations
        from grounding.predictor import Detector

        options = self.options
        # Only called with a validation set (`val_images` and `val_annotations` come together).
        assert options.val_images is not None and options.val_annotations is not None
        annotations = read_annotations(options.val_annotations)
        detector = Detector(self.model, self.tokenizer, self.device)
        try:
            predictions = predict_dataset(
                detector,
                options.val_images,
                annotations,
                batch_size=options.batch_size,
                max_images=options.val_max_images,
                size=options.eval_size,
                max_size=options.eval_max_size,
                workers=options.workers,
                progress=options.progress,
            )
        finally:
            set_training_mode(self.model, self.frozen_modules)
        return evaluate_predictions(annotations, predictions.results, predictions.image_ids)
