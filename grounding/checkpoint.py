"""Loading weights: official `.pth` checkpoints and transformers-format directories.

Both paths are pure functions from a file to a strictly loaded model: every checkpoint key must map
to one of our parameters or buffers (or be on a short, documented drop list) and every one of ours
must be filled. The rename rules of each format live in one module, as timm's
`checkpoint_filter_fn`: `official_format.official_rules` for the official `.pth`
(`{"model": state_dict}`; SwinT-OGC's keys carry a `module.` prefix, SwinB's do not) and
`transformers_keys.transformers_rules` for the transformers format (`config.json` +
`model.safetensors`, as `IDEA-Research/grounding-dino-tiny` publishes), whose 4.x names
`transformers_keys.modernise_transformers_keys` brings up to date first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from grounding.config import GroundingDINOConfig, from_transformers_config
from grounding.key_mapping import KeyMappingError, rename_state_dict
from grounding.official_format import official_rules
from grounding.transformers_keys import modernise_transformers_keys, transformers_rules

if TYPE_CHECKING:
    from grounding.model import GroundingDINO


def read_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official `.pth`, with any `module.` prefix removed."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a Grounding DINO checkpoint (no state dict inside)")
    state_dict = checkpoint.get("model", checkpoint)
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def load_official(
    model: GroundingDINO, path: str | os.PathLike, *, assign: bool = False
) -> dict[str, int]:
    """Load an official `.pth` into `model` strictly. Returns a small report of what was mapped.

    `assign=True` makes the checkpoint's tensors the model's (`load_state_dict(assign=True)`), so a
    model built on the meta device needs no memory of its own.
    """
    state_dict = read_official_state_dict(path)
    renamed = rename_state_dict(state_dict, official_rules(model.config))
    load_strict(model, renamed, source=str(path), assign=assign)
    return {"checkpoint_keys": len(state_dict), "loaded_tensors": len(renamed)}


def read_transformers_config(directory: str | Path) -> GroundingDINOConfig:
    """Our config from the `config.json` of a transformers-format checkpoint directory."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a transformers-format checkpoint directory "
            "needs config.json and model.safetensors"
        )
    with open(path, encoding="utf-8") as handle:
        return from_transformers_config(json.load(handle))


def load_transformers(model: GroundingDINO, directory: str | Path) -> dict[str, int]:
    """Load `model.safetensors` of a transformers-format directory into `model` strictly."""
    from safetensors.torch import load_file

    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    state_dict = modernise_transformers_keys(load_file(str(path), device="cpu"))
    renamed = rename_state_dict(state_dict, transformers_rules(model.config))
    load_strict(model, renamed, source=str(path))
    return {"checkpoint_keys": len(state_dict), "loaded_tensors": len(renamed)}


def load_strict(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str,
    target: str | None = None,
    error: type[Exception] = KeyMappingError,
    hint: str = "",
    assign: bool = False,
) -> None:
    """`load_state_dict(strict=True)` with errors that name the keys and shapes at fault: the one
    strict loader of the detector's formats and of SAM (`segmentation.sam`, `small_sam`).

    Args:
        source: the file the weights come from, for the message.
        target: what they should fit, for the message; default "this model (its backbone)".
        error: the exception type to raise (SAM raises ValueError).
        hint: a sentence appended to the message.
        assign: passed to `load_state_dict` (the state dict's tensors become the model's).
    """
    if target is None:
        backbone = getattr(getattr(model, "config", None), "backbone", None)
        target = f"this model ({backbone})" if backbone is not None else "this model"
    if not isinstance(state_dict, dict):
        raise error(f"{source}: expected a state dict, got {type(state_dict).__name__}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)}, model {tuple(expected[key].shape)}"
        for key in expected.keys() & state_dict.keys()
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, not in the checkpoint: {_shorten(missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected keys, unknown to the model: {_shorten(unexpected)}"
        )
    if wrong_shape:
        problems.append(f"shape mismatch: {_shorten(sorted(wrong_shape))}")
    if problems:
        raise error(f"{source} does not fit {target}: " + "; ".join(problems) + hint)
    model.load_state_dict(state_dict, strict=True, assign=assign)


def _shorten(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")
