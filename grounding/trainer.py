"""The training loop of `python -m grounding.train` (paper §3.5): steps, checkpoints, evaluation.

One optimiser step = `accumulate` consecutive batches of the epoch's order. Their losses are
weighted by their share of the window's target boxes (the criterion divides by the boxes of its
own batch), so accumulating N batches of b images gives the gradient of one batch of N x b.

Exact resume: the epoch's order comes from (seed, epoch), each sample's randomness from
(seed, epoch, index) (`CocoGroundingDataset.set_epoch`), and the checkpoint stores the model, the
optimiser, the schedule, the position in the epoch and the RNG states (for drop path and dropout).
Evaluation and saving run under `torch.random.fork_rng`, so they never change the training's
random numbers: with or without them, and interrupted or not, a run computes the same steps.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from grounding.build import save_detector
from grounding.dataset import CocoGroundingDataset, GroundingBatch, collate
from grounding.losses import SetCriterion
from grounding.model import GroundingDINO
from grounding.optim import rng_state, set_training_mode
from grounding.text_masks import sub_sentence_masks

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
SHOWN_TERMS = ("loss_class", "loss_l1", "loss_giou")  # on the progress bar; all in metrics


class TrainingStopped(RuntimeError):
    """A non-finite loss, output or gradient; the message says where, and what was kept."""


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


def steps_per_epoch(num_images: int, batch_size: int, accumulate: int) -> int:
    """Optimiser steps in an epoch (the last window may hold fewer batches)."""
    return math.ceil(math.ceil(num_images / batch_size) / accumulate)


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled item order of an epoch; a function of (seed, epoch) only."""
    return np.random.default_rng((seed, epoch)).permutation(num_items).tolist()


def epoch_batches(
    dataset: CocoGroundingDataset,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    workers: int = 0,
) -> DataLoader:
    """The epoch's batches from batch `start` on (None for a batch of unreadable images only)."""
    dataset.set_epoch(epoch)
    order = epoch_order(len(dataset), seed, epoch)[start * batch_size :]
    # Its own generator: creating the iterator then draws nothing from the global RNG.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        num_workers=workers,
        collate_fn=partial(collate, pad_token_id=dataset.pad_token_id),
        generator=generator,
    )


def batch_loss(
    model: nn.Module,
    criterion: SetCriterion,
    batch: GroundingBatch,
    special_token_ids: tuple[int, ...],
    bf16: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The criterion's total and terms on one batch (already on the model's device).

    Raises:
        TrainingStopped: the model's outputs are NaN (message completed by the caller).
    """
    text_masks = sub_sentence_masks(batch.input_ids, batch.token_mask, special_token_ids)
    device_type = batch.pixels.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        output = model(
            batch.pixels,
            batch.input_ids,
            batch.token_mask,
            batch.padding_mask,
            text_masks=text_masks,
            return_aux=True,
        )
    # (B, n) -> (B, max_text_len): the columns past the caption are padding (-inf logits).
    token_mask = F.pad(batch.token_mask, (0, output.logits.shape[-1] - batch.token_mask.shape[1]))
    real_logits = output.logits.transpose(1, 2)[token_mask]  # (real tokens, Q)
    if not (bool(torch.isfinite(real_logits).all()) and bool(torch.isfinite(output.boxes).all())):
        raise TrainingStopped("the model's outputs are not finite")
    return criterion(output, batch.targets, token_mask)


def accumulate_gradients(
    model: nn.Module,
    criterion: SetCriterion,
    batches: list[GroundingBatch],
    device: torch.device,
    special_token_ids: tuple[int, ...],
    bf16: bool = False,
) -> tuple[float, dict[str, float]]:
    """Backward of the window's loss, each batch weighted by its share of the target boxes.

    Returns:
        the window's loss and its terms, as the criterion would give them on one batch of all.

    Raises:
        TrainingStopped: a non-finite loss (message names the terms and images).
    """
    boxes = [sum(len(target) for target in batch.targets) for batch in batches]
    total_boxes = max(sum(boxes), 1)
    loss, terms = 0.0, dict[str, float]()
    for batch, count in zip(batches, boxes, strict=True):
        weight = max(count, 1) / total_boxes
        try:
            total, components = batch_loss(
                model, criterion, batch.to(device), special_token_ids, bf16
            )
            if not bool(torch.isfinite(total)):
                bad = [
                    f"{name}={float(value)}"
                    for name, value in components.items()
                    if not bool(torch.isfinite(value))
                ]
                raise TrainingStopped(
                    f"the loss is {float(total.detach())} ({', '.join(bad) or 'total'})"
                )
        except TrainingStopped as error:
            raise TrainingStopped(f"{error} on images {batch.image_ids}") from None
        (total * weight).backward()
        loss += float(total.detach()) * weight
        for name, value in components.items():
            terms[name] = terms.get(name, 0.0) + float(value) * weight
    return loss, terms


class _Resize(TypedDict):
    """The evaluation resize of `Trainer._resize` (keyword arguments of `save_checkpoint`)."""

    image_size: int
    max_size: int


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def keep_until(self, step: int) -> None:
        """Drop lines after `step` (logged by a run that ended after its last checkpoint)."""
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def save_checkpoint(
    directory: Path,
    model: GroundingDINO,
    tokenizer,
    *,
    training_state: dict | None = None,
    metrics: dict | None = None,
    image_size: int | None = None,
    max_size: int | None = None,
) -> None:
    """A checkpoint directory (`grounding.save_detector`: transformers' format, or ours for a
    model with `config.contrastive_bias`) + `training_state.pt` and `metrics.json`, written beside
    and then renamed over `directory`, so an interrupted save leaves the old one intact."""
    partial_dir = directory.with_name(directory.name + ".partial")
    old_dir = directory.with_name(directory.name + ".old")
    for leftover in (partial_dir, old_dir):
        shutil.rmtree(leftover, ignore_errors=True)
    # The evaluation resize goes with the weights: `load_detector` restores it.
    save_detector(model, partial_dir, tokenizer, image_size=image_size, max_size=max_size)
    if training_state is not None:
        torch.save(training_state, partial_dir / STATE_FILE)
    if metrics is not None:
        (partial_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if directory.exists():
        directory.rename(old_dir)
    partial_dir.rename(directory)
    shutil.rmtree(old_dir, ignore_errors=True)


def read_training_state(directory: Path) -> dict:
    """The `training_state.pt` of a `last/` checkpoint (tensors, lists and numbers only)."""
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)


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
        from grounding.evaluate import evaluate_predictions, predict_dataset, read_annotations
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
