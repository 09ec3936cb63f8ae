"""Saving our detector as a transformers-format checkpoint, so fine-tuned models can go to the Hub.

The directory holds `config.json`, `model.safetensors` and, given a tokenizer, the tokenizer files
and `processor_config.json`. `grounding.load_detector(directory)`,
`transformers.GroundingDinoForObjectDetection.from_pretrained(directory)` and
`transformers.AutoProcessor.from_pretrained(directory)` all read it offline.

How the names are found. Inverting the loader's regular-expression rules in general is impractical
(callable replacements, alternations, `#q/#k/#v` packing). Instead transformers' model is built on
the meta device (no memory) from the config, every key of its state dict is run forward through the
loader's own rules (`transformers_keys.transformers_rules`), and the resulting map transformers key
-> (our key, q/k/v third) is read backwards. The saver therefore covers exactly what the loader
reads and needs no second table; it checks that every transformers tensor has a source of the right
shape and that every tensor of ours is written.

How the files are written. The meta model's own `save_pretrained(state_dict=...)` writes them, so
they are exactly what transformers writes for this architecture:
- transformers ties `bbox_embed.{i}` (i > 0) to `bbox_embed.0` and `model.decoder.bbox_embed.{i}`
  to `bbox_embed.{i}` (`_tied_weights_keys`); all 2 x decoder_layers names map to our one shared
  box head. `transformers_state_dict` puts the same tensor under all of them, as transformers' own
  state dict does; safetensors refuses shared storage, so `save_pretrained` keeps only
  `bbox_embed.0` and `from_pretrained` re-ties the rest. The encoder-output box head
  (`model.encoder_output_bbox_embed`) is separate (`two_stage_bbox_embed_share=False`), and the
  contrastive class heads have no parameters.
- the Swin backbone is renamed back to the transformers 4.x names (`conv_encoder.model.encoder...
  attention.self.query`), which transformers 4.x and 5 both read and our loader modernises.
- `swin.layernorm` (SwinModel's final norm, which `SwinBackbone` never applies, dropped on load) is
  written as an identity LayerNorm.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from grounding.config import GroundingDINOConfig
from grounding.key_mapping import KeyMappingError
from grounding.model import GroundingDINO
from grounding.predictor import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_SIZE, Detector
from grounding.transformers_keys import transformers_rules

if TYPE_CHECKING:
    from transformers import GroundingDinoForObjectDetection

_PARTS = ("q", "k", "v")
# transformers tensors that the loader drops, and the value written for them.
_UNUSED_VALUES = {
    "model.backbone.conv_encoder.model.swin.layernorm.weight": torch.ones,
    "model.backbone.conv_encoder.model.swin.layernorm.bias": torch.zeros,
}
# Our source of one transformers tensor: (our state-dict key, "q"/"k"/"v" third of a packed
# projection or "" for the whole tensor); None for the tensors of `_UNUSED_VALUES`.
Source = tuple[str, str] | None


def transformers_config(config: GroundingDINOConfig):
    """The `transformers.GroundingDinoConfig` of our architecture (inverse of
    `config.from_transformers_config`).

    `config.text == {}` becomes bert-base-uncased's `BertConfig` (transformers' defaults). Dropout
    is 0, as in the reference (`dropout = 0.0` in `GroundingDINO_SwinT_OGC.py`) and in our model.

    Raises:
        ValueError: a position temperature with a fraction (transformers' field is an int).
    """
    from transformers import BertConfig
    from transformers import GroundingDinoConfig as HFGroundingDinoConfig
    from transformers import SwinConfig as HFSwinConfig

    swin = config.backbone
    backbone = HFSwinConfig(
        embed_dim=swin.embed_dim,
        depths=list(swin.depths),
        num_heads=list(swin.num_heads),
        window_size=swin.window_size,
        patch_size=swin.patch_size,
        mlp_ratio=swin.mlp_ratio,
        # transformers counts the patch embedding as stage 0.
        # Handled by SwinConfig.__post_init__ (it is not a field): transformers' types lack it.
        out_indices=[i + 1 for i in swin.out_indices],  # type: ignore[call-arg]
        layer_norm_eps=swin.layer_norm_eps,
        drop_path_rate=swin.drop_path_rate,
    )
    if not float(config.position_temperature).is_integer():
        raise ValueError(
            f"position_temperature {config.position_temperature} has a fraction: "
            "transformers' config stores it as an int"
        )
    return HFGroundingDinoConfig(
        backbone_config=backbone,
        text_config=BertConfig(**config.text),
        d_model=config.hidden_dim,
        num_queries=config.num_queries,
        num_feature_levels=config.num_feature_levels,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        encoder_attention_heads=config.encoder_heads,
        decoder_attention_heads=config.decoder_heads,
        encoder_ffn_dim=config.encoder_ffn_dim,
        decoder_ffn_dim=config.decoder_ffn_dim,
        encoder_n_points=config.encoder_points,
        decoder_n_points=config.decoder_points,
        max_text_len=config.max_text_len,
        positional_embedding_temperature=int(config.position_temperature),
        layer_norm_eps=config.layer_norm_eps,
        fusion_droppath=config.fusion_drop_path,
        dropout=0.0,
        two_stage=True,
        embedding_init_target=True,
        decoder_bbox_embed_share=True,
        two_stage_bbox_embed_share=False,
        query_dim=4,
    )


def to_transformers_config(config: GroundingDINOConfig) -> dict:
    """`config.json` of a transformers checkpoint with our architecture, as a dict."""
    return transformers_config(config).to_dict()


def transformers_skeleton(config: GroundingDINOConfig) -> GroundingDinoForObjectDetection:
    """transformers' `GroundingDinoForObjectDetection` for `config` on the meta device (no memory):
    its state-dict keys, shapes and tied names, without weights."""
    from transformers import GroundingDinoForObjectDetection

    with torch.device("meta"):
        return GroundingDinoForObjectDetection(transformers_config(config)).eval()


def transformers_key_map(
    config: GroundingDINOConfig,
    transformers_keys: Iterable[str],
) -> dict[str, Source]:
    """Our source of every transformers key, found by the loader's rules.

    Raises:
        KeyMappingError: a key that the loader's rules do not cover.
    """
    compiled = [
        (re.compile(pattern), replacement) for pattern, replacement in transformers_rules(config)
    ]
    mapping: dict[str, Source] = {}
    unmatched = []
    for key in transformers_keys:
        for pattern, replacement in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if replacement is None:
                if key not in _UNUSED_VALUES:
                    raise KeyMappingError(f"{key} is dropped on load and has no value to write")
                mapping[key] = None
            else:
                target = replacement(match) if callable(replacement) else match.expand(replacement)
                ours, _, part = target.partition("#")
                mapping[key] = (ours, part)
            break
        else:
            unmatched.append(key)
    if unmatched:
        raise KeyMappingError(
            f"{len(unmatched)} transformers key(s) have no counterpart in our "
            f"model: {', '.join(unmatched[:10])}"
        )
    return mapping


def transformers_state_dict(
    model: GroundingDINO,
    dtype: torch.dtype = torch.float32,
    skeleton: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Our weights under transformers' current key names.

    Every key of transformers' state dict is present; the tied aliases of the box head hold one
    shared tensor, as in transformers' own model. Other tensors are fresh contiguous copies.

    Args:
        model: our `GroundingDINO` (any device, dtype or mode).
        dtype: of the floating-point tensors.
        skeleton: `transformers_skeleton(model.config)`, when the caller has one already.
        device: of the returned tensors ("meta" checks the layout of a model on the meta device
            without allocating weights).

    Raises:
        KeyMappingError: a transformers tensor without a source in our model, a shape mismatch,
            or a tensor of ours that no transformers key receives.
    """
    skeleton = transformers_skeleton(model.config) if skeleton is None else skeleton
    expected = skeleton.state_dict()
    mapping = transformers_key_map(model.config, expected)
    ours = model.state_dict()
    missing = sorted({source[0] for source in mapping.values() if source} - set(ours))
    if missing:
        raise KeyMappingError(f"transformers needs tensors our model lacks: {missing[:10]}")
    # One copy per source, so the tied aliases of the box head share it.
    converted = {
        source: _copy(ours[source[0]], source[1], dtype, device)
        for source in set(mapping.values())
        if source is not None
    }
    state_dict = {
        key: converted[source]
        if source is not None
        else _UNUSED_VALUES[key](expected[key].shape, dtype=dtype, device=device)
        for key, source in mapping.items()
    }
    problems = [
        f"{key}: transformers {tuple(expected[key].shape)}, ours {tuple(tensor.shape)}"
        for key, tensor in state_dict.items()
        if tensor.shape != expected[key].shape
    ]
    parts: dict[str, set[str]] = {}
    for source in converted:
        parts.setdefault(source[0], set()).add(source[1])
    unwritten = sorted(
        key for key in ours if "" not in parts.get(key, ()) and parts.get(key) != set(_PARTS)
    )
    if unwritten:
        problems.append(f"tensors of ours that no transformers key receives: {unwritten[:10]}")
    if problems:
        raise KeyMappingError(
            "cannot express this model in transformers' layout: " + "; ".join(problems[:10])
        )
    return state_dict


def _copy(
    tensor: torch.Tensor,
    part: str,
    dtype: torch.dtype,
    device: str | torch.device,
) -> torch.Tensor:
    """A contiguous copy on `device` of `tensor` or of its q/k/v third, floats cast to `dtype`."""
    tensor = tensor.detach()
    if part:  # (3 C, ...) packed q/k/v -> (C, ...) the third of this part
        tensor = tensor.chunk(3)[_PARTS.index(part)]
    cast = dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device, dtype=cast, copy=True).contiguous()


def save_pretrained(
    detector_or_model: Detector | GroundingDINO,
    directory: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
    max_size: int | None = None,
) -> Path:
    """Write a transformers-format checkpoint directory; returns its path.

    Args:
        detector_or_model: a `Detector` (its model and tokenizer) or a bare `GroundingDINO`.
        directory: created if missing; existing files of the same names are overwritten.
        tokenizer: overrides the detector's. Without any, no tokenizer or processor files are
            written, and `load_detector` then needs `text_encoder=`.
        dtype: of the stored floating-point weights (float32 by default; `config.json` says so).
        image_size, max_size: the resize the model expects (short side, longest side), written
            into the processor's config; default the detector's, else the reference's 800 / 1333.
    """
    from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

    if isinstance(detector_or_model, Detector):
        model = detector_or_model.model
        tokenizer = detector_or_model.tokenizer if tokenizer is None else tokenizer
        image_size = image_size or detector_or_model.image_size
        max_size = max_size or detector_or_model.max_size
    else:
        model = detector_or_model
    if model.config.contrastive_bias:
        raise ValueError(
            "transformers' format has no place for the scaled, biased "
            "classification head (config.contrastive_bias): save with "
            "grounding.save_detector, which writes our own format for it"
        )
    directory = Path(directory)
    # transformers wraps PreTrainedModel.to with functools.wraps, which loses `self` in its type.
    skeleton = transformers_skeleton(model.config).to(dtype)  # type: ignore[arg-type]
    state_dict = transformers_state_dict(model, dtype, skeleton)
    # transformers' own writer: drops the tied aliases, restores its on-disk (4.x) Swin names.
    skeleton.save_pretrained(directory, state_dict=state_dict)
    if tokenizer is not None:
        # ImageNet normalisation and, by default, the reference's resize (800, max 1333), as in
        # the Hub's IDEA-Research/grounding-dino-* repositories.
        size = {
            "shortest_edge": image_size or DEFAULT_IMAGE_SIZE,
            "longest_edge": max_size or DEFAULT_MAX_SIZE,
        }
        processor = GroundingDinoProcessor(
            image_processor=GroundingDinoImageProcessor(size=size), tokenizer=tokenizer
        )
        processor.save_pretrained(directory)
    return directory
