"""Factories: a ready `Detector` from an official `.pth`, a transformers directory, or the Hub."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from grounding import hub
from grounding.checkpoint import load_official, load_transformers, read_transformers_config
from grounding.config import BERT_ARCHITECTURE_KEYS, PRESETS, GroundingDINOConfig
from grounding.model import GroundingDINO, build_model
from grounding.native_format import is_native, load_native, read_native_config
from grounding.predictor import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_SIZE, Detector


def load_detector(
    checkpoint: str | os.PathLike | None = None,
    *,
    config: str | GroundingDINOConfig = "swint_ogc",
    text_encoder: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> Detector:
    """A Grounding DINO detector with loaded weights, in eval mode, on `device`.

    Args:
        checkpoint: an official `.pth`; a transformers-format directory (`config.json` +
            `model.safetensors`, which then defines the architecture), a directory of our own
            format (`grounding_config.json`, see `native_format`), or a Hub id such as
            "IDEA-Research/grounding-dino-tiny"; or None for
            `$GROUNDING_DINO_CHECKPOINT`, else the official file for `config` from the Hub.
        config: "swint_ogc", "swinb_cogcoor" or a `GroundingDINOConfig` (for `.pth` files).
        text_encoder: a directory with BERT's config.json and vocab.txt, or a Hub id; default
            the transformers directory itself, else `$GROUNDING_DINO_TEXT_ENCODER`, else
            `bert-base-uncased`. Only the tokenizer and the architecture come from it: the BERT
            weights are inside the checkpoint.
        device: default CUDA when available, else CPU.

    Raises:
        FileNotFoundError: a named file is missing (`hub.OfflineError` when offline).
        KeyMappingError: the checkpoint does not fit the architecture (names the keys).
    """
    from transformers import BertTokenizer

    if checkpoint is not None and hub.is_hub_id(checkpoint):
        checkpoint = hub.transformers_checkpoint_dir(str(checkpoint))
    elif checkpoint is not None and not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if checkpoint is not None and Path(checkpoint).is_dir() and is_native(checkpoint):
        directory = Path(checkpoint)
        tokenizer_dir = hub.text_encoder_dir(text_encoder or directory)
        model = build_model(read_native_config(directory))
        load_native(model, directory)
    elif checkpoint is not None and Path(checkpoint).is_dir():
        directory = Path(checkpoint)
        model_config = read_transformers_config(directory)
        tokenizer_dir = hub.text_encoder_dir(text_encoder or directory)
        model = build_model(model_config)
        load_transformers(model, directory)
    else:
        if isinstance(config, GroundingDINOConfig):
            model_config = config
        elif isinstance(config, str) and config in PRESETS:
            model_config = PRESETS[config]()
        else:
            raise ValueError(
                f"unknown config {config!r}; choose one of {sorted(PRESETS)} "
                "or pass a GroundingDINOConfig"
            )
        if checkpoint is None:
            if not isinstance(config, str):
                raise ValueError("a custom config has no official checkpoint: pass checkpoint=")
            checkpoint = hub.official_checkpoint(config)
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        tokenizer_dir = hub.text_encoder_dir(text_encoder)
        model_config = _with_text_architecture(model_config, tokenizer_dir)
        model = build_model(model_config)
        load_official(model, checkpoint)
    tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir), do_lower_case=True)
    image_size, max_size = (
        _resize(Path(checkpoint))
        if checkpoint is not None and Path(checkpoint).is_dir()
        else (DEFAULT_IMAGE_SIZE, DEFAULT_MAX_SIZE)
    )
    return Detector(model, tokenizer, device=device, image_size=image_size, max_size=max_size)


def _resize(directory: Path) -> tuple[int, int]:
    """(short side, longest side) a checkpoint directory's processor config asks for: transformers
    5's `processor_config.json` (also ours), 4.x's `preprocessor_config.json`, else 800 / 1333."""
    for name, section in (
        ("processor_config.json", "image_processor"),
        ("preprocessor_config.json", None),
    ):
        path = directory / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
        size = (values.get(section) or {} if section else values).get("size") or {}
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size.get("longest_edge", DEFAULT_MAX_SIZE))
    return DEFAULT_IMAGE_SIZE, DEFAULT_MAX_SIZE


def save_detector(
    detector: Detector | GroundingDINO,
    directory: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
    max_size: int | None = None,
) -> Path:
    """Write a detector (or a bare model and `tokenizer`) as a directory `load_detector` reads.

    transformers' format (`transformers_format.save_pretrained`: transformers and the Hub read it
    too) whenever it can hold the model; our own (`native_format`) for a model with
    `config.contrastive_bias`, which it cannot.

    Args:
        tokenizer: overrides the detector's; without any, no tokenizer files are written.
        dtype: of the stored floating-point weights (torch.float16 to ship small files).
        image_size, max_size: the resize the model expects, which `load_detector` restores;
            default the detector's, else the reference's 800 / 1333.
    """
    from grounding import native_format, transformers_format

    model = detector.model if isinstance(detector, Detector) else detector
    if isinstance(detector, Detector):
        tokenizer = detector.tokenizer if tokenizer is None else tokenizer
        image_size = image_size or detector.image_size
        max_size = max_size or detector.max_size
    size = dict(image_size=image_size or DEFAULT_IMAGE_SIZE, max_size=max_size or DEFAULT_MAX_SIZE)
    if model.config.contrastive_bias:
        return native_format.save_native(model, directory, tokenizer, dtype=dtype, **size)
    return transformers_format.save_pretrained(model, directory, tokenizer, dtype=dtype, **size)


def _with_text_architecture(config: GroundingDINOConfig, directory: Path) -> GroundingDINOConfig:
    """`config` with BERT's architecture read from `directory/config.json`, when it has one."""
    path = directory / "config.json"
    if not path.is_file():
        return config
    with open(path, encoding="utf-8") as handle:
        bert = json.load(handle)
    return replace(config, text={key: bert[key] for key in BERT_ARCHITECTURE_KEYS if key in bert})
