"""Loss and evaluation curves of training runs, from their `metrics.jsonl`, as one PNG.

    python scripts/plot_training.py RUN_DIR [RUN_DIR ...] --out curves.png

Each run gets one row: its training loss terms (left, log scale, smoothed over 5 logged steps)
and its evaluation metrics (right: COCO AP and AP50 for `grounding.train` runs, mean mask IoU for
`segmentation.sam_training` runs), both against the optimiser step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Training terms drawn per run kind (the first found in the log are used).
TRAIN_TERMS = ("loss", "loss_class", "loss_l1", "loss_giou", "loss_class_enc", "focal", "dice",
               "iou_mse")
EVAL_TERMS = ("AP", "AP50", "val_mean_iou")


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of a run folder's metrics.jsonl."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
    return ([line for line in lines if line.get("type") == "train"],
            [line for line in lines if line.get("type") == "eval"])


def smooth(values: list[float], window: int = 5) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot(runs: list[Path], out: Path) -> None:
    figure, axes = plt.subplots(len(runs), 2, figsize=(12, 3.6 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        train, evaluations = read_metrics(run)
        steps = [line["step"] for line in train]
        for term in TRAIN_TERMS:
            if train and term in train[0]:
                row[0].plot(steps, smooth([line[term] for line in train]), label=term)
        row[0].set_yscale("log")
        row[0].set_title(f"{run.name}: training loss")
        row[0].set_xlabel("step")
        row[0].legend(fontsize=8)
        for term in EVAL_TERMS:
            points = [(line["step"], line[term]) for line in evaluations
                      if line.get(term) is not None]
            if points:
                row[1].plot(*zip(*points, strict=True), marker="o", label=term)
        row[1].set_ylim(0, 1)
        row[1].set_title(f"{run.name}: validation")
        row[1].set_xlabel("step")
        row[1].grid(alpha=0.3)
        if row[1].lines:
            row[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders with metrics.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    plot(args.runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
