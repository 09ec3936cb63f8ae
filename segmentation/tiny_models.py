"""Tiny random-weight models: no files, no downloads, fast on a CPU.

They exercise the whole pipeline (tokenizer, both models, every resize and cache) with the real
code paths and image geometry, but their boxes and masks are noise: for tests that need a model
answering any prompt, and for the benchmarks' `--tiny` runs. Offline mode uses the trained shapes
models instead (`segmentation.offline`).
"""

from __future__ import annotations

import string
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

from grounding import Detector, build_model
from grounding.config import tiny_config

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CHARACTERS = string.ascii_lowercase + string.digits + ".?,!'-:;()/&"
# The detector's logits scale with its decoder's last LayerNorm. Random weights give logits with a
# standard deviation of about 5, so every box scores ~1.0; this brings their max-over-tokens scores
# into (0, 1), so the threshold sliders visibly change the result.
_LOGIT_SCALE = 0.15


def tiny_tokenizer():
    """A BERT WordPiece tokenizer whose vocabulary is single characters (no file needed).

    Words split into characters ("cat" -> c ##a ##t), and "." / "?" / [CLS] / [SEP] exist, which
    is all the detector needs to find phrases and decode labels.
    """
    from transformers import BertTokenizer

    tokens = [*SPECIAL_TOKENS, *_CHARACTERS, *("##" + c for c in _CHARACTERS)]
    return BertTokenizer(
        vocab={token: index for index, token in enumerate(tokens)}, do_lower_case=True
    )


def tiny_detector(device: str | torch.device | None = None, seed: int = 0) -> Detector:
    """A random tiny Grounding DINO with `tiny_tokenizer`; the same weights for the same seed."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = build_model(tiny_config(len(tokenizer)))
    _perturb(model, seed)
    with torch.no_grad():
        model.decoder.norm.weight.mul_(_LOGIT_SCALE)
        model.decoder.norm.bias.mul_(_LOGIT_SCALE)
    return Detector(model, tokenizer, device=device)


def tiny_sam(seed: int = 0, *, image_size: int = 1024) -> Sam:
    """A random SAM with the real layout but a 1-block, 32-wide encoder and decoder.

    `image_size` is the encoder's input side; 1024 (as every real SAM) keeps SamPredictor's
    resize and the mask geometry exactly as with real weights. About 0.05 s per image embedding
    and 0.01 s per box on a CPU.
    """
    torch.manual_seed(seed)
    patch, width = 16, 32
    grid = image_size // patch
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch,
            embed_dim=width,
            depth=1,
            num_heads=2,
            mlp_ratio=2,
            out_chans=width,
            qkv_bias=True,
            use_rel_pos=True,
            window_size=14,
            global_attn_indexes=(),
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=width,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=width, mlp_dim=64, num_heads=2),
            transformer_dim=width,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    _perturb(sam, seed)
    return sam.eval()


def _perturb(model: nn.Module, seed: int) -> None:
    """Noise on every parameter: some layers start at zero, which would make outputs constant."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
