"""Optimiser pieces of the fine-tuning recipe (paper §3.5): freezing, parameter groups, schedule.

Recipe (Open-GroundingDino `config/cfg_coco.py`, `cfg_odvg.py`; MM-Grounding-DINO
`configs/grounding_dino/*finetune*`): AdamW, lr 1e-4 for the detector, 1e-5 for the Swin backbone
(`lr_backbone_names = ['backbone.0', 'bert']`) and for BERT, weight decay 1e-4 on every parameter
(Open-GroundingDino's `param_dict_type = 'ddetr_in_mmdet'` exempts neither norms nor biases),
gradient-norm clipping at 0.1 and a step drop of the learning rate (x 0.1) late in training.

Deviation: Open-GroundingDino also gives `ref_point_head` and `sampling_offsets` their own rate,
lr x `lr_linear_proj_mult` (1e-5 in its configs, so 1e-9: practically frozen, which looks
unintended); we keep them in the detector's group, as mmdetection's Grounding DINO configs do
(their `paramwise_cfg` multiplies the rates of `backbone` and `language_model` only).

The schedule is a function of the optimiser step, so a resumed run (which restores the step)
continues it exactly; `torch.optim.lr_scheduler.LambdaLR` carries it and its state.

Also here: the RNG states of Python, NumPy and torch as tensors and lists, so that they go through
`torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np
import torch
from torch import nn

# What `--freeze` accepts: name -> parameter-name prefixes of our `GroundingDINO`. "text" is BERT
# alone (Open-GroundingDino's `freeze_keywords=['bert']`); its 768 -> 256 projection (`feat_map`)
# stays trainable unless "text_projection" is named too.
FREEZABLE: dict[str, tuple[str, ...]] = {
    "backbone": ("backbone.",),
    "text": ("text_backbone.bert.",),
    "text_projection": ("text_backbone.projection.",),
    "input_proj": ("input_proj.", "level_embed"),
    "feature_enhancer": ("feature_enhancer.",),
    "query_selection": ("query_selection.",),
    "decoder": ("decoder.", "bbox_embed."),
}
# Parameter groups with their own learning rate (the rest is the "detector" group).
BACKBONE_PREFIX = "backbone."
TEXT_PREFIX = "text_backbone.bert."
SCHEDULES = ("step", "cosine")


def freeze(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Stop the gradients of the named parts (see `FREEZABLE`).

    Returns:
        the dotted names of the submodules that hold only frozen parameters and should run in
        eval mode (no dropout or drop path): `set_training_mode` takes them.

    Raises:
        ValueError: an unknown name.
    """
    names = list(dict.fromkeys(names))
    unknown = [name for name in names if name not in FREEZABLE]
    if unknown:
        raise ValueError(f"cannot freeze {unknown}; choose from {sorted(FREEZABLE)}")
    prefixes = tuple(prefix for name in names for prefix in FREEZABLE[name])
    for name, parameter in model.named_parameters():
        if name.startswith(prefixes):
            parameter.requires_grad_(False)
    return [prefix.rstrip(".") for prefix in prefixes if prefix.endswith(".")]


def set_training_mode(model: nn.Module, frozen_modules: Sequence[str]) -> None:
    """`model.train()`, with the frozen submodules (from `freeze`) in eval mode."""
    model.train()
    for name in frozen_modules:
        model.get_submodule(name).eval()


def parameter_groups(
    model: nn.Module, *, lr: float, lr_backbone: float, lr_text: float, weight_decay: float
) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: "backbone", "text", "detector".

    Empty groups (everything frozen) are left out. Each group carries its `name`.
    """
    grouped: dict[str, list[nn.Parameter]] = {"backbone": [], "text": [], "detector": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        group = (
            "backbone"
            if name.startswith(BACKBONE_PREFIX)
            else "text"
            if name.startswith(TEXT_PREFIX)
            else "detector"
        )
        grouped[group].append(parameter)
    rates = {"backbone": lr_backbone, "text": lr_text, "detector": lr}
    groups = [
        {"name": name, "params": params, "lr": rates[name], "weight_decay": weight_decay}
        for name, params in grouped.items()
        if params
    ]
    if not groups:
        raise ValueError("every parameter is frozen: nothing to train")
    return groups


def learning_rate_factor(
    step: int,
    *,
    schedule: str,
    warmup_steps: int,
    steps_per_epoch: int,
    total_steps: int,
    drop_epochs: Sequence[int] = (),
    drop_factor: float = 0.1,
) -> float:
    """Multiplier of every group's base learning rate for optimiser step `step` (0-based).

    Linear warm-up from 1 / (warmup_steps + 1) to 1 over the first `warmup_steps` steps, times
    - "step": `drop_factor` for each epoch e in `drop_epochs` already completed (the drop takes
      effect at step e * steps_per_epoch: "--lr-drop-epochs 11" means the 12th epoch runs at
      0.1 x, MM-Grounding-DINO's 1x schedule);
    - "cosine": a half cosine from 1 after the warm-up to 0 at `total_steps`.
    """
    warmup = min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps > 0 else 1.0
    if schedule == "step":
        drops = sum(step >= epoch * steps_per_epoch for epoch in drop_epochs)
        return warmup * drop_factor**drops
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return warmup * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    **schedule,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step `LambdaLR` of `learning_rate_factor` (keyword arguments other than `step`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, **schedule)
    )


def rng_state() -> dict:
    """The RNG states of Python, NumPy and torch (CPU and every CUDA device), as tensors/lists."""
    version, python_state, gauss = random.getstate()
    # legacy=True (the default) gives the tuple form for the global MT19937 RandomState.
    kind, keys, position, has_gauss, cached_gauss = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state()
    )
    return {
        "python": [version, torch.tensor(python_state, dtype=torch.int64), gauss],
        "numpy": [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached_gauss),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (CUDA states only when as many devices are present)."""
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(int(value) for value in python_state.tolist()), gauss))
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if (
        state["cuda"]
        and torch.cuda.is_available()
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])
