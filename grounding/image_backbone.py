"""Swin image backbone (paper §3.1): timm's `SwinTransformer`, computing the reference's numbers.

The reference (GroundingDINO `backbone/swin_transformer.py`, an mmdet-style Swin) returns the
outputs of stages 1, 2 and 3 (strides 8, 16, 32), each after its own LayerNorm (`norm1..3`). We
build timm's `SwinTransformer` with the same sizes and weight layout and tap its stages ourselves.

Deviations from timm's `SwinTransformer` (1.0.31), needed to match the reference and transformers'
`SwinBackbone` for arbitrary image sizes:

- Cyclic shift order. timm's `SwinTransformerBlock._attn` rolls the feature map and then pads it to
  a multiple of the window; the reference pads (zeros, right/bottom, on the normalised map) and
  then rolls, building the shifted-window mask (value -100) on the padded size. Our blocks are
  `_ReferenceSwinBlock`, a subclass whose only override is `_attn` in the reference order; the
  instances timm builds get this class assigned after construction.
- Window size on small maps. timm shrinks the window (and drops the shift) when a feature map is
  not larger than the window; the reference always uses the full window and shifts odd blocks by
  window // 2. We build timm with `always_partition=True`.
- Input padding. timm's `PatchEmbed` rejects sizes that are not a multiple of the patch size; the
  reference zero-pads the image on the right/bottom first. `ImageBackbone.forward` pads.
- Taps. timm runs each patch merging at the start of the next stage, so timm stage i's output is the
  reference's stage-i output before its downsample (the checkpoint rules in `official_format` and
  `transformers_keys` move the patch-merging keys one stage on). We iterate the stages and apply our
  `norms` to the taps (NHWC), then return NCHW maps. timm's final `norm` and classifier head are
  unused and replaced by `nn.Identity` so the module holds only checkpoint tensors.

Checked and already equal in timm: patch merging concatenates the 2x2 neighbours in the order
(0,0), (1,0), (0,1), (1,1) and zero-pads odd sizes; q is scaled by head_dim^-0.5; the relative
position index follows the Swin paper; the stage drop-path schedule is linear over all blocks.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    window_partition,
    window_reverse,
)
from torch import nn

from grounding.config import SwinConfig
from grounding.fused_linear import fused_linear, is_exact_gelu


class _ReferenceSwinBlock(SwinTransformerBlock):
    """timm's Swin block with the reference's window attention order: pad, then shift."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """Shifted-window attention on a normalised map.

        Args:
            x: (B, H, W, C) output of `norm1`.

        Returns:
            (B, H, W, C) attention output, before the residual.
        """
        _, height, width, channels = x.shape
        window_h, window_w = self.window_size
        pad_h = (window_h - height % window_h) % window_h
        pad_w = (window_w - width % window_w) % window_w
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C), zeros right/bottom
        padded_h, padded_w = height + pad_h, width + pad_w
        shift_h, shift_w = self.shift_size
        if shift_h or shift_w:
            x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
        # (num_windows, N, N) with 0 / -100, built on the padded size; None without a shift.
        shift_mask = self.get_attn_mask(x)
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=shift_mask)  # (B * num_windows, N, C)
        windows = windows.view(-1, window_h, window_w, channels)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)  # (B, Hp, Wp, C)
        if shift_h or shift_w:
            x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
        return x[:, :height, :width].contiguous()


class _FusedMlp(Mlp):
    """timm's Swin MLP with fc1 + GELU and fc2 as single oneDNN calls in inference on the CPU
    (`grounding.fused_linear`); in training (dropout) or with another activation, timm's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not is_exact_gelu(self.act) or not isinstance(self.norm, nn.Identity):
            return super().forward(x)
        return fused_linear(fused_linear(x, self.fc1, "gelu"), self.fc2)


class ImageBackbone(nn.Module):
    """Swin backbone returning the LayerNorm'ed maps of `config.out_indices`.

    Args:
        config: Swin sizes, the stages to return and the stochastic depth (identity in eval).
    """

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        self.swin = SwinTransformer(
            patch_size=config.patch_size,
            num_classes=0,
            embed_dim=config.embed_dim,
            depths=config.depths,
            num_heads=config.num_heads,
            window_size=config.window_size,
            always_partition=True,
            strict_img_size=False,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=True,
            drop_path_rate=config.drop_path_rate,
        )
        self.swin.norm = nn.Identity()
        self.swin.head = nn.Identity()  # type: ignore[assignment]  # timm types it ClassifierHead
        for stage in self.swin.layers:
            for block in cast(SwinTransformerStage, stage).blocks:
                block.__class__ = _ReferenceSwinBlock
                if type(block.mlp) is Mlp:
                    block.mlp.__class__ = _FusedMlp
        self.norms = nn.ModuleList(
            nn.LayerNorm(channels, eps=config.layer_norm_eps) for channels in config.out_channels
        )

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of the returned maps, one per out index."""
        return self.config.out_channels

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Run Swin on unpadded images.

        Args:
            pixels: (B, 3, H, W) normalised images, any H and W (padded here to a multiple of the
                patch size with zeros, as the reference does).

        Returns:
            One (B, C_j, H_j, W_j) map per out index j, with C_j = `out_channels[j]` and
            H_j = ceil(H / (patch_size * 2**out_indices[j])) (strides 8, 16, 32 for Swin-T).
        """
        patch = self.config.patch_size
        height, width = pixels.shape[-2:]
        pad_h, pad_w = (patch - height % patch) % patch, (patch - width % patch) % patch
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h))  # zeros right/bottom
        x = self.swin.patch_embed(pixels)  # (B, H/4, W/4, C0), NHWC
        out_indices = self.config.out_indices
        features = []
        # A slice of a Sequential is a Sequential (torch types it Sequential | Module).
        stages = cast(nn.Sequential, self.swin.layers[: max(out_indices) + 1])
        for stage_index, stage in enumerate(stages):
            x = stage(x)  # (B, H_i, W_i, C_i): merging of stage i-1 (if i > 0), then blocks
            if stage_index in out_indices:
                normed = self.norms[out_indices.index(stage_index)](x)
                features.append(normed.permute(0, 3, 1, 2).contiguous())  # (B, C_i, H_i, W_i)
        return features
