"""A small SAM for box -> mask (Kirillov et al., arXiv 2304.02643, §3 and App. A): its sizes
(`SmallSamConfig`), its construction (`build_small_sam`) and its weights files (`export_fp16`,
`load_small_sam`).

The model is segment_anything's own `Sam` (ImageEncoderViT, PromptEncoder, MaskDecoder with a
TwoWayTransformer) at small sizes, so `segmentation.sam.BoxSegmenter` (SamPredictor) runs it as it
runs the official weights: SamPredictor resizes to `image_encoder.img_size`, the prompt encoder's
`input_image_size` is that square, and `postprocess_masks` upsamples the decoder's low-resolution
logits (4 x the embedding grid) to it. Default size (`SmallSamConfig`): a 256-pixel input, 16-pixel
patches (a 16 x 16 embedding, 64 x 64 mask logits), a 4-block, 128-wide encoder with global
attention (256 tokens need no windows), a 128-wide 2-block decoder: 1.86 M parameters, 3.7 MB in
fp16. On the 2-core probe machine a step of 8 shapes images (~20 boxes) took 0.39 s with two
torch threads and 0.54 s with one when the machine was otherwise idle, 0.6-0.8 s with one while
other jobs ran (two threads then slow down many times over: pass `--threads 1` on a shared
machine); the validation mean mask IoU reached 0.62 / 0.72 / 0.78 after 200 / 300 / 400 steps. A
64 x 64 logit grid can represent the shapes' masks to a mean IoU of 0.965 (ideal logits, same
resizes), so the size is not what limits the IoU.

Weights: `segmentation.sam_training` writes `best.safetensors` (fp32, the config in the file's
metadata) and `last.pt` (the config under its `config` key); `export_fp16` rewrites either as fp16
safetensors, and `load_small_sam` loads any of them strictly, in fp32, with the recorded config or
a `sam_config.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import Tensor, nn

from grounding.checkpoint import load_strict
from segmentation.sam_attention import accelerate_sam

CONFIG_METADATA_KEY = "sam_config"


@dataclass(frozen=True)
class SmallSamConfig:
    """The sizes of a small SAM (see the module docstring for the defaults' rationale).

    Attributes:
        image_size: the encoder's square input side; images are resized so their long side is
            this, then padded.
        patch_size: the encoder's patch side; the embedding grid is image_size / patch_size and
            the mask logits 4 x that.
        prompt_dim: the encoder's output channels and the prompt encoder's and decoder's width.
    """

    image_size: int = 256
    patch_size: int = 16
    encoder_dim: int = 128
    encoder_depth: int = 4
    encoder_heads: int = 4
    prompt_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    mask_in_chans: int = 16
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> SmallSamConfig:
        """The inverse of `dataclasses.asdict` (JSON lists back to tuples); unknown keys raise."""
        unknown = set(values) - {field.name for field in fields(cls)}
        if unknown:
            raise ValueError(f"unknown SAM config keys {sorted(unknown)}")
        converted: dict[str, Any] = {
            key: tuple(value) if isinstance(value, list) else value for key, value in values.items()
        }
        return cls(**converted)


def build_small_sam(config: SmallSamConfig = SmallSamConfig()) -> Sam:
    """A randomly initialised `Sam` of segment_anything's modules at `config`'s sizes."""
    grid = config.image_size // config.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_heads,
            mlp_ratio=4,
            out_chans=config.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=0,
            global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_dim,
                mlp_dim=4 * config.prompt_dim,
                num_heads=config.decoder_heads,
            ),
            transformer_dim=config.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=config.prompt_dim,
        ),
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    )


# ------------------------------------------------------------------------- weights and export


def _save_safetensors(
    state_dict: dict[str, Tensor],
    path: Path,
    config: SmallSamConfig,
    dtype: torch.dtype,
    **metadata,
) -> None:
    from safetensors.torch import save_file

    tensors = {
        key: value.detach().to("cpu", dtype).contiguous() for key, value in state_dict.items()
    }
    temporary = path.with_name(path.name + ".partial")
    save_file(
        tensors,
        temporary,
        metadata={
            CONFIG_METADATA_KEY: json.dumps(asdict(config)),
            **{key: str(v) for key, v in metadata.items()},
        },
    )
    os.replace(temporary, path)


def _read_weights(path: Path) -> tuple[dict[str, Tensor], SmallSamConfig | None]:
    """The state dict and (when recorded) config of a `last.pt` or a `.safetensors` file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, "pt") as handle:
            recorded = (handle.metadata() or {}).get(CONFIG_METADATA_KEY)
        config = SmallSamConfig.from_dict(json.loads(recorded)) if recorded else None
        return load_file(path, device="cpu"), config
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"], SmallSamConfig.from_dict(state["config"])


def export_fp16(checkpoint: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the weights of `checkpoint` (`last.pt` or an fp32 `.safetensors`) as fp16
    safetensors, with the config in the file's metadata."""
    state_dict, config = _read_weights(Path(checkpoint))
    if config is None:
        raise ValueError(f"{checkpoint} records no SAM config")
    path = Path(path)
    _save_safetensors(state_dict, path, config, torch.float16)
    return path


def load_small_sam(
    weights_path: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> Sam:
    """A trained small SAM in fp32 and eval mode, loaded strictly.

    Args:
        weights_path: `.safetensors` (fp32 or fp16) or `last.pt`.
        config_path: its `sam_config.json`; None to use the config recorded in the file.

    Raises:
        ValueError: no config, or weights that do not fit it (names the keys).
    """
    state_dict, config = _read_weights(Path(weights_path))
    if config_path is not None:
        config = SmallSamConfig.from_dict(json.loads(Path(config_path).read_text()))
    if config is None:
        raise ValueError(f"{weights_path} records no SAM config: pass its sam_config.json")
    sam = build_small_sam(config)
    state_dict = {key: value.float() for key, value in state_dict.items()}
    load_strict(sam, state_dict, source=str(weights_path), target=str(config), error=ValueError)
    return accelerate_sam(sam.to(device).eval())
