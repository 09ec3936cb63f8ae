"""A small random SAM whose image encoder has windowed and global blocks (the attention tests)."""

from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn


def small_sam(use_rel_pos: bool = True, seed: int = 0) -> Sam:
    """A random SAM on 256-pixel inputs (16 x 16 tokens): blocks 0 and 2 use 6 x 6 windows (the
    grid pads to 18 x 18), block 1 attends globally over all 256 tokens."""
    torch.manual_seed(seed)
    width, grid = 32, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=256, patch_size=16, embed_dim=width, depth=3, num_heads=2, mlp_ratio=2,
            out_chans=width, use_rel_pos=use_rel_pos, window_size=6, global_attn_indexes=(1,),
            norm_layer=partial(nn.LayerNorm, eps=1e-6)),
        prompt_encoder=PromptEncoder(embed_dim=width, image_embedding_size=(grid, grid),
                                     input_image_size=(256, 256), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=width, mlp_dim=64, num_heads=2),
            transformer_dim=width, iou_head_depth=2, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # some layers (rel_pos, pos_embed) start at zero
        for parameter in sam.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        for name, parameter in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                parameter.normal_()
    return sam.eval()
