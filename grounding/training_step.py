"""One optimiser step's worth of `grounding.trainer`'s loop (paper §3.5): batches and gradients.

One optimiser step = `accumulate` consecutive batches of the epoch's order. Their losses are
weighted by their share of the window's target boxes (the criterion divides by the boxes of its
own batch), so accumulating N batches of b images gives the gradient of one batch of N x b.

The epoch's order comes from (seed, epoch), each sample's randomness from (seed, epoch, index)
(`CocoGroundingDataset.set_epoch`), so a resumed run sees exactly the batches of an uninterrupted
one.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from grounding.dataset import CocoGroundingDataset, GroundingBatch, collate
from grounding.losses import SetCriterion
from grounding.text_masks import sub_sentence_masks


class TrainingStopped(RuntimeError):
    """A non-finite loss, output or gradient; the message says where, and what was kept."""


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
