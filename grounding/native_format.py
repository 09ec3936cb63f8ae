"""Our own checkpoint directory, for models that transformers' format cannot hold.

A model trained from scratch with `GroundingDINOConfig.contrastive_bias` has a scaled, biased
classification head that transformers' `GroundingDinoForObjectDetection` lacks (and any config this
implementation supports beyond transformers' fits here too). The directory holds:

- `grounding_config.json`: the `GroundingDINOConfig` (dataclass fields, as JSON);
- `model.safetensors`: our state dict, under our own key names (fp32, or fp16 to ship small);
- the tokenizer's files (`tokenizer.save_pretrained`), when a tokenizer is given;
- `processor_config.json`: the resize the model expects, under the keys transformers' processor
  uses (`image_processor.size.shortest_edge` / `longest_edge`), so one reader serves both formats.

`grounding.load_detector(directory)` recognises it by `grounding_config.json` and loads it strictly.
`grounding.save_detector` picks this format only when transformers' cannot express the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from grounding.checkpoint import load_strict
from grounding.config import GroundingDINOConfig, SwinConfig

if TYPE_CHECKING:
    from grounding.model import GroundingDINO

CONFIG_FILE = "grounding_config.json"
WEIGHTS_FILE = "model.safetensors"
PROCESSOR_FILE = "processor_config.json"
FORMAT_VERSION = 1


def is_native(directory: str | os.PathLike) -> bool:
    """Whether `directory` is a checkpoint in this format."""
    return (Path(directory) / CONFIG_FILE).is_file()


def config_to_dict(config: GroundingDINOConfig) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists)."""
    return {"format_version": FORMAT_VERSION, **dataclasses.asdict(config)}


def config_from_dict(values: dict[str, Any]) -> GroundingDINOConfig:
    """The inverse of `config_to_dict`.

    Raises:
        ValueError: an unknown format version or field (a newer writer, or a corrupt file).
    """
    values = dict(values)
    version = values.pop("format_version", FORMAT_VERSION)  # absent: written as version 1
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{CONFIG_FILE} has format_version {version!r}; this version reads {FORMAT_VERSION}"
        )
    backbone = dict(values.pop("backbone", {}))
    known = {field.name for field in dataclasses.fields(GroundingDINOConfig)}
    swin_known = {field.name for field in dataclasses.fields(SwinConfig)}
    unknown = (set(values) - known) | {f"backbone.{key}" for key in set(backbone) - swin_known}
    if unknown:
        raise ValueError(f"{CONFIG_FILE} has unknown settings: {sorted(unknown)}")
    swin_values: dict[str, Any] = {
        key: tuple(value) if isinstance(value, list) else value for key, value in backbone.items()
    }
    swin = SwinConfig(**swin_values)
    return GroundingDINOConfig(backbone=swin, **values)


def read_native_config(directory: str | Path) -> GroundingDINOConfig:
    with open(Path(directory) / CONFIG_FILE, encoding="utf-8") as handle:
        return config_from_dict(json.load(handle))


def save_native(
    model: GroundingDINO,
    directory: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: torch.dtype = torch.float32,
    image_size: int = 800,
    max_size: int = 1333,
) -> Path:
    """Write `model` (a `GroundingDINO`) and, if given, its tokenizer to `directory`.

    Args:
        dtype: floating-point tensors are stored in this type (torch.float16 halves the file;
            they are loaded back into float32 models).
        image_size, max_size: the resize the model expects (short side, longest side).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        key: (value.to(dtype) if value.is_floating_point() else value).contiguous().cpu()
        for key, value in model.state_dict().items()
    }
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config_to_dict(model.config), indent=2) + "\n")
    processor = {
        "image_processor": {"size": {"shortest_edge": image_size, "longest_edge": max_size}}
    }
    (directory / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def load_native(model: GroundingDINO, directory: str | Path) -> dict[str, int]:
    """Load `model.safetensors` of a native directory into `model`, strictly."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    state = load_file(str(path), device="cpu")
    expected = model.state_dict()
    state = {
        key: value.to(expected[key].dtype) if key in expected else value
        for key, value in state.items()
    }
    load_strict(model, state, source=str(path))
    return {"checkpoint_keys": len(state), "loaded_tensors": len(state)}
