"""Swin image backbone: parity with transformers' `SwinBackbone`, official key layout, autocast."""

import copy

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from transformers import GroundingDinoConfig, GroundingDinoModel
from transformers import SwinConfig as HFSwinConfig

from grounding.config import (
    GroundingDINOConfig,
    SwinConfig,
    from_transformers_config,
    swinb_cogcoor,
)
from grounding.image_backbone import ImageBackbone
from grounding.official_format import official_rules
from grounding.transformers_keys import transformers_rules
from tests.helpers import rename_block
from tests.key_lists import read_key_list

# (embed_dim, depths, num_heads, window_size): shifted blocks in every stage with window 4, and
# a window (7) larger than most maps with single-block stages.
TINY_SWINS = [(16, (2, 2, 2, 2), (1, 2, 2, 4), 4), (8, (1, 2, 3, 2), (1, 2, 2, 4), 7)]
# Not multiples of the window, of 32, nor (101, 147, 45) of the patch size; the last two give
# stage maps smaller than the window (transformers' SwinBackbone, like the reference, then keeps
# the full window and the shift: it runs its stages with always_partition=True).
IMAGE_SIZES = [(100, 148), (224, 224), (260, 300), (101, 147), (64, 96), (33, 45)]


def _hf_backbone(embed_dim, depths, num_heads, window_size):
    """The Swin backbone of a tiny transformers Grounding DINO, with perturbed random weights."""
    swin = HFSwinConfig(
        embed_dim=embed_dim,
        depths=list(depths),
        num_heads=list(num_heads),
        window_size=window_size,
        out_indices=[2, 3, 4],
    )
    text = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=swin,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=10,
    )
    conv_encoder = GroundingDinoModel(config).eval().backbone.conv_encoder
    with torch.no_grad():  # non-trivial norms and relative position biases
        for parameter in conv_encoder.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return config, conv_encoder


@pytest.fixture(scope="module", params=TINY_SWINS, ids=["window4", "window7"])
def backbones(request):
    torch.manual_seed(0)
    hf_config, conv_encoder = _hf_backbone(*request.param)
    config = from_transformers_config(hf_config.to_dict()).backbone
    ours = ImageBackbone(config).eval()
    # conv_encoder.model is what the full model prefixes `model.backbone.conv_encoder.model.`.
    renamed = rename_block(
        conv_encoder.model.state_dict(),
        transformers_rules(GroundingDINOConfig(backbone=config)),
        "model.backbone.conv_encoder.model.",
        "backbone.",
    )
    ours.load_state_dict(renamed, strict=True)
    return conv_encoder, ours


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_transformers_swin_backbone(backbones, size):
    conv_encoder, ours = backbones
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = [feature for feature, _ in conv_encoder(pixels, torch.ones(2, *size).long())]
        actual = ours(pixels)
    assert len(actual) == 3
    for j, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape
        assert a.shape[1] == ours.out_channels[j]
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_strides_and_full_window_on_small_maps(backbones):
    _, ours = backbones
    window = ours.config.window_size
    for stage in ours.swin.layers:
        for index, block in enumerate(stage.blocks):
            assert block.window_size == (window, window)
            assert block.shift_size == ((window // 2,) * 2 if index % 2 else (0, 0))
    with torch.no_grad():
        features = ours(torch.randn(1, 3, 260, 300))
    assert [f.shape[-2:] for f in features] == [(33, 38), (17, 19), (9, 10)]  # ceil(/8, /16, /32)


def test_stock_timm_block_differs(backbones):
    """The `_attn` override matters: timm's own order (shift, then pad) gives other numbers."""
    _, ours = backbones
    stock = copy.deepcopy(ours)
    for stage in stock.swin.layers:
        for block in stage.blocks:
            block.__class__ = SwinTransformerBlock
    pixels = torch.randn(1, 3, 100, 148)
    with torch.no_grad():
        assert not torch.allclose(stock(pixels)[-1], ours(pixels)[-1], atol=1e-3)


def test_autocast_bfloat16_close_to_float32(backbones):
    _, ours = backbones
    pixels = torch.randn(1, 3, 100, 148)
    with torch.no_grad():
        expected = ours(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = ours(pixels)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        assert torch.isfinite(a).all()
        assert (a.float() - e).abs().mean() < 0.03 * e.abs().mean()  # measured ~0.01


def _official_backbone_state(key_file):
    """Pseudo-random tensors for the `backbone.0.*` keys of a key list, prefix stripped."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape, dtype, _ in read_key_list(key_file, "backbone.0."):
        if dtype == "int64":
            state[key.removeprefix("backbone.0.")] = torch.randint(0, 9, shape, generator=generator)
        else:
            state[key.removeprefix("backbone.0.")] = torch.randn(shape, generator=generator)
    return state


@pytest.mark.parametrize(
    ("key_file", "config"),
    [
        ("gdino_swint_ogc_keys.txt", SwinConfig()),
        ("gdino_swinb_keys.txt", swinb_cogcoor().backbone),
    ],
    ids=["swint", "swinb"],
)
def test_official_layout_loads_strictly(key_file, config):
    official = _official_backbone_state(key_file)
    rules = official_rules(GroundingDINOConfig(backbone=config))
    renamed = rename_block(official, rules, "backbone.0.", "backbone.")
    with torch.device("meta"):  # layout only: skip the random initialisation
        backbone = ImageBackbone(config)
    assert renamed.keys() == backbone.state_dict().keys()
    backbone.load_state_dict(renamed, strict=True, assign=True)  # also checks every shape
    state = backbone.state_dict()
    # Patch merging moves one stage on; stage norms follow out_indices.
    torch.testing.assert_close(
        state["swin.layers.1.downsample.reduction.weight"],
        official["layers.0.downsample.reduction.weight"],
    )
    torch.testing.assert_close(state["norms.0.weight"], official["norm1.weight"])
    torch.testing.assert_close(
        state["swin.layers.2.blocks.1.attn.qkv.weight"],
        official["layers.2.blocks.1.attn.qkv.weight"],
    )
