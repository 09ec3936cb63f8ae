"""Loading weights: official `.pth` checkpoints and transformers-format directories.

Both paths are pure functions from a file to a strictly loaded model: every checkpoint key must map
to one of our parameters or buffers (or be on a short, documented drop list) and every one of ours
must be filled. The rename rules live next to the modules they describe; this file lifts them to
full keys.

Official `.pth` (`{"model": state_dict}`): SwinT-OGC keys carry a `module.` prefix, SwinB's do not;
the shared decoder box head is stored under `bbox_embed.{i}` and
`transformer.decoder.bbox_embed.{i}`.

transformers format (`config.json` + `model.safetensors`, as `IDEA-Research/grounding-dino-tiny`
publishes): files saved by transformers 4.x name the Swin backbone the old way
(`conv_encoder.model.encoder...attention.self.query`); `_LEGACY_TRANSFORMERS_RULES` brings them to
the current names first, as transformers' own conversion mapping does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from grounding import decoder, feature_enhancer, image_backbone, query_selection, text_backbone
from grounding.config import GroundingDINOConfig, from_transformers_config
from grounding.key_mapping import KeyMappingError, Rule, prefixed, rename_state_dict

if TYPE_CHECKING:
    from grounding.model import GroundingDINO

_IDENTITY: list[Rule] = [(r"(.*)", r"\1")]


def official_rules(config: GroundingDINOConfig) -> list[Rule]:
    """Rules from official checkpoint keys (without `module.`) to ours."""
    return [
        # The shared box head, under both of its official names (checked equal when aliased).
        (
            r"(?:transformer\.decoder\.)?bbox_embed\.\d+\.(layers\.\d+\.(?:weight|bias))",
            r"bbox_embed.\1",
        ),
        *prefixed("backbone.0.", "backbone.", image_backbone.official_rules(config.backbone)),
        *prefixed("input_proj.", "input_proj.", _IDENTITY),
        (r"transformer\.level_embed", "level_embed"),
        *text_backbone.OFFICIAL_RULES,
        *prefixed("transformer.encoder.", "feature_enhancer.", feature_enhancer.OFFICIAL_RULES),
        *prefixed("transformer.decoder.", "decoder.", decoder.OFFICIAL_RULES),
        *prefixed("transformer.", "query_selection.", query_selection.OFFICIAL_RULES),
    ]


def transformers_rules(config: GroundingDINOConfig) -> list[Rule]:
    """Rules from transformers `GroundingDinoForObjectDetection` keys (current names) to ours."""
    return [
        (r"(?:model\.decoder\.)?bbox_embed\.\d+\.(layers\.\d+\.(?:weight|bias))", r"bbox_embed.\1"),
        *prefixed(
            "model.backbone.conv_encoder.model.",
            "backbone.",
            image_backbone.hf_rules(config.backbone),
        ),
        *prefixed("model.input_proj_vision.", "input_proj.", _IDENTITY),
        (r"model\.level_embed", "level_embed"),
        *text_backbone.HF_RULES,
        *prefixed("model.encoder.", "feature_enhancer.", feature_enhancer.HF_RULES),
        *prefixed("model.decoder.", "decoder.", decoder.HF_RULES),
        *prefixed("model.", "query_selection.", query_selection.HF_RULES),
    ]


# transformers 4.x names of the Swin backbone -> the names transformers 5 uses.
_LEGACY_TRANSFORMERS_RULES: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"conv_encoder\.model\.(embeddings|encoder)\.", r"conv_encoder.model.swin.\1."),
    (
        r"attention\.self\.relative_position_bias_table",
        "attention.relative_position_bias.relative_position_bias_table",
    ),
    (r"attention\.self\.(query|key|value)\.", lambda m: f"attention.{m.group(1)[0]}_proj."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
    (r"(blocks\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
    (r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]
# Buffers that older files persisted and that are recomputed from the config.
_LEGACY_DROPPED = re.compile(r".*(relative_position_index|embeddings\.position_ids)")


def _modernise_transformers_key(key: str) -> str:
    if not key.startswith("model.backbone."):
        return key
    for pattern, replacement in _LEGACY_TRANSFORMERS_RULES:
        key = re.sub(pattern, replacement, key)
    return key


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
    state_dict = {
        _modernise_transformers_key(key): value
        for key, value in load_file(str(path), device="cpu").items()
        if not _LEGACY_DROPPED.fullmatch(key)
    }
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
