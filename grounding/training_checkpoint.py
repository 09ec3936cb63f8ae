"""Checkpoints of `grounding.trainer`'s runs: the weights, `training_state.pt` and `metrics.jsonl`.

A checkpoint directory is `grounding.save_detector`'s (transformers' format, or ours for a model
with `config.contrastive_bias`), plus `training_state.pt` (what `--resume` needs besides the
weights: optimiser, schedule, progress, RNG states, flags) and, for `best/`, `metrics.json`.
Saving writes beside the directory and renames over it, so an interrupted save leaves the old one
intact; resuming drops the `metrics.jsonl` lines logged after the checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from grounding.build import save_detector
from grounding.model import GroundingDINO

STATE_FILE = "training_state.pt"


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
