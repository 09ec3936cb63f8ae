"""Feature enhancer: transformers parity, official key layout, padding and batching invariance."""

from __future__ import annotations

import pytest
import torch
from transformers import GroundingDinoConfig, GroundingDinoModel

from grounding.config import GroundingDINOConfig
from grounding.feature_enhancer import FeatureEnhancer
from grounding.official_format import official_rules
from grounding.transformers_keys import transformers_rules
from tests.helpers import rename_block, tiny_swin_and_bert
from tests.key_lists import SWINT_OGC_KEYS, key_shapes

HIDDEN = 32
SHAPES = [(6, 5), (3, 3), (2, 2)]
OURS = GroundingDINOConfig(
    hidden_dim=HIDDEN,
    num_feature_levels=len(SHAPES),
    encoder_layers=2,
    encoder_heads=4,
    encoder_ffn_dim=64,
    encoder_points=2,
)


@pytest.fixture(scope="module")
def hf_encoder():
    """transformers' encoder of a tiny GroundingDinoModel, with all weights perturbed."""
    torch.manual_seed(0)
    swin, bert = tiny_swin_and_bert()  # only the encoder is used
    config = GroundingDinoConfig(
        backbone_config=swin,
        text_config=bert,
        d_model=HIDDEN,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        encoder_n_points=2,
        num_feature_levels=len(SHAPES),
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        num_queries=10,
    )
    encoder = GroundingDinoModel(config).encoder.eval()
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if name.endswith(("vision_param", "text_param")):
                param.uniform_(0.5, 1.5)  # layer scale: make the fusion matter
            else:
                param.add_(0.2 * torch.randn_like(param))
    return encoder


@pytest.fixture(scope="module")
def ours(hf_encoder):
    """Our enhancer with the transformers weights, loaded through `transformers_rules`, strictly."""
    model = FeatureEnhancer(OURS).eval()
    renamed = rename_block(
        hf_encoder.state_dict(), transformers_rules(OURS), "model.encoder.", "feature_enhancer."
    )
    model.load_state_dict(renamed, strict=True)
    return model


def _text_inputs(phrases: list[list[int]], length: int):
    """[CLS] phrase ... phrase [SEP] [PAD]...: token mask, sub-sentence mask, position ids.

    `phrases[b]` lists the token count of each phrase (its "." included), as the reference's
    `generate_masks_with_special_tokens_and_transfer_map` builds them.
    """
    batch = len(phrases)
    token_mask = torch.zeros(batch, length, dtype=torch.bool)
    attend = torch.eye(length, dtype=torch.bool).repeat(batch, 1, 1)
    position_ids = torch.zeros(batch, length, dtype=torch.long)
    for b, counts in enumerate(phrases):
        start = 1
        for count in counts:
            attend[b, start : start + count, start : start + count] = True
            position_ids[b, start : start + count] = torch.arange(count)
            start += count
        token_mask[b, : start + 1] = True  # [CLS] ... [SEP]
    return token_mask, attend, position_ids


def _flatten_padded(maps: list[torch.Tensor], valid: list[list[tuple[int, int]]]):
    """Per-level (B, H, W, C) maps -> (B, S, C), padding mask, valid ratios (w, h)."""
    batch = maps[0].shape[0]
    masks, ratios = [], []
    for level, grid in enumerate(maps):
        _, height, width, _ = grid.shape
        mask = torch.ones(batch, height, width, dtype=torch.bool)
        for b in range(batch):
            h, w = valid[b][level]
            mask[b, :h, :w] = False
        masks.append(mask.flatten(1))
        ratios.append(
            torch.stack([(~mask[:, 0, :]).sum(1) / width, (~mask[:, :, 0]).sum(1) / height], -1)
        )
    return (
        torch.cat([m.flatten(1, 2) for m in maps], 1),
        torch.cat(masks, 1),
        torch.stack(ratios, 1),
    )


def _run_hf(encoder, vision, pos, padding, ratios, text, token_mask, attend, position_ids, shapes):
    spatial = torch.tensor(shapes)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    out = encoder(
        vision_features=vision,
        vision_attention_mask=padding,
        vision_position_embedding=pos,
        spatial_shapes=spatial,
        spatial_shapes_list=shapes,
        level_start_index=start,
        valid_ratios=ratios,
        text_features=text,
        text_attention_mask=~token_mask,
        text_position_embedding=None,
        text_self_attention_masks=~attend,
        text_position_ids=position_ids,
        return_dict=True,
    )
    return out.last_hidden_state_vision, out.last_hidden_state_text


@pytest.mark.parametrize("padded", [False, True])
def test_matches_transformers(hf_encoder, ours, padded):
    torch.manual_seed(1)
    maps = [torch.randn(2, h, w, HIDDEN) for h, w in SHAPES]
    valid = [SHAPES, [(4, 3), (2, 2), (1, 1)] if padded else SHAPES]
    vision, padding, ratios = _flatten_padded(maps, valid)
    pos = torch.randn_like(vision)
    token_mask, attend, position_ids = _text_inputs([[3, 3], [2]], 8)
    text = torch.randn(2, 8, HIDDEN)
    expected = _run_hf(
        hf_encoder, vision, pos, padding, ratios, text, token_mask, attend, position_ids, SHAPES
    )
    with torch.no_grad():
        out = ours(vision, pos, SHAPES, ratios, padding, text, token_mask, attend, position_ids)
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], expected[1], atol=1e-5, rtol=1e-5)


def _valid_index(shapes, valid):
    """Flat indices of the valid cells of a padded (B=1) level stack, in unpadded order."""
    index, offset = [], 0
    for (height, width), (h, w) in zip(shapes, valid, strict=True):
        rows = torch.arange(h)[:, None] * width + torch.arange(w)[None]
        index.append(offset + rows.flatten())
        offset += height * width
    return torch.cat(index)


def _alone(model, maps, pos_maps, phrases, text):
    """One image (B=1 maps (1, H, W, C)) and caption, no padding anywhere."""
    shapes = [tuple(m.shape[1:3]) for m in maps]
    token_mask, attend, position_ids = _text_inputs([phrases], text.shape[1])
    vision = torch.cat([m.flatten(1, 2) for m in maps], 1)
    pos = torch.cat([p.flatten(1, 2) for p in pos_maps], 1)
    return model(
        vision,
        pos,
        shapes,
        torch.ones(1, len(shapes), 2),
        None,
        text,
        token_mask,
        attend,
        position_ids,
    )


def _pad_maps(maps, shapes, fill):
    """Embed (1, h, w, C) maps bottom / right into `shapes`, the rest filled with `fill`."""
    out = []
    for grid, (height, width) in zip(maps, shapes, strict=True):
        padded = torch.full((1, height, width, grid.shape[-1]), fill)
        padded[:, : grid.shape[1], : grid.shape[2]] = grid
        out.append(padded)
    return out


@torch.no_grad()
def test_padding_invariance(ours):
    torch.manual_seed(2)
    valid = [(4, 3), (2, 2), (1, 1)]
    maps = [torch.randn(1, h, w, HIDDEN) for h, w in valid]
    pos_maps = [torch.randn(1, h, w, HIDDEN) for h, w in valid]
    text = torch.randn(1, 5, HIDDEN)
    alone_vision, alone_text = _alone(ours, maps, pos_maps, [3], text)
    vision, padding, ratios = _flatten_padded(_pad_maps(maps, SHAPES, 7.0), [valid])
    pos, _, _ = _flatten_padded(_pad_maps(pos_maps, SHAPES, -3.0), [valid])
    token_mask, attend, position_ids = _text_inputs([[3]], 5)
    out_vision, out_text = ours(
        vision, pos, SHAPES, ratios, padding, text, token_mask, attend, position_ids
    )
    torch.testing.assert_close(
        out_vision[:, _valid_index(SHAPES, valid)], alone_vision, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(out_text, alone_text, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_batch_equals_each_alone(ours):
    torch.manual_seed(3)
    small = [(4, 3), (2, 2), (1, 1)]
    maps_a = [torch.randn(1, h, w, HIDDEN) for h, w in SHAPES]
    pos_a = [torch.randn(1, h, w, HIDDEN) for h, w in SHAPES]
    maps_b = [torch.randn(1, h, w, HIDDEN) for h, w in small]
    pos_b = [torch.randn(1, h, w, HIDDEN) for h, w in small]
    text_a, text_b = torch.randn(1, 8, HIDDEN), torch.randn(1, 5, HIDDEN)
    alone_a = _alone(ours, maps_a, pos_a, [3, 3], text_a)
    alone_b = _alone(ours, maps_b, pos_b, [3], text_b)

    maps = [torch.cat(pair) for pair in zip(maps_a, _pad_maps(maps_b, SHAPES, 5.0), strict=True)]
    pos_maps = [torch.cat(pair) for pair in zip(pos_a, _pad_maps(pos_b, SHAPES, 1.0), strict=True)]
    vision, padding, ratios = _flatten_padded(maps, [SHAPES, small])
    pos, _, _ = _flatten_padded(pos_maps, [SHAPES, small])
    text = torch.cat([text_a, torch.cat([text_b, torch.randn(1, 3, HIDDEN)], 1)])
    token_mask, attend, position_ids = _text_inputs([[3, 3], [3]], 8)
    out_vision, out_text = ours(
        vision, pos, SHAPES, ratios, padding, text, token_mask, attend, position_ids
    )
    torch.testing.assert_close(out_vision[:1], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_text[:1], alone_a[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out_vision[1:, _valid_index(SHAPES, small)], alone_b[0], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(out_text[1:, :5], alone_b[1], atol=1e-5, rtol=1e-5)


def _padded_inputs():
    torch.manual_seed(4)
    maps = [torch.randn(2, h, w, HIDDEN) for h, w in SHAPES]
    vision, padding, ratios = _flatten_padded(maps, [SHAPES, [(4, 3), (2, 2), (1, 1)]])
    token_mask, attend, position_ids = _text_inputs([[3, 3], [2]], 8)
    return (
        vision,
        torch.randn_like(vision),
        SHAPES,
        ratios,
        padding,
        torch.randn(2, 8, HIDDEN),
        token_mask,
        attend,
        position_ids,
    )


@torch.no_grad()
def test_autocast_bfloat16(ours):
    inputs = _padded_inputs()
    expected = ours(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(*inputs)
    for got, want in zip(out, expected, strict=True):
        assert torch.isfinite(got).all()  # LayerNorm outputs float32 under autocast
        # as transformers under autocast (3 % with these perturbed weights)
        assert (got.float() - want).norm() / want.norm() < 0.06


def test_bfloat16_weights_and_training_step():
    model = FeatureEnhancer(OURS)
    (vision, pos, shapes, ratios, padding, text, token_mask, attend, position_ids) = (
        _padded_inputs()
    )
    with torch.no_grad():
        low = model.to(torch.bfloat16).eval()(
            vision.bfloat16(),
            pos.bfloat16(),
            shapes,
            ratios,
            padding,
            text.bfloat16(),
            token_mask,
            attend,
            position_ids,
        )
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t).all() for t in low)
    model.float().train()  # drop path active
    out_vision, out_text = model(
        vision, pos, shapes, ratios, padding, text, token_mask, attend, position_ids
    )
    (out_vision.square().mean() + out_text.square().mean()).backward()
    assert model.fusion_layers[0].gamma_v.grad is not None
    assert model.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0


def test_official_rules_match_checkpoint_layout():
    prefix = "transformer.encoder."
    shapes = key_shapes(SWINT_OGC_KEYS, prefix)
    checkpoint = {key: torch.zeros(shape) for key, shape in shapes.items()}
    assert len(checkpoint) == 276
    config = GroundingDINOConfig()
    renamed = rename_block(checkpoint, official_rules(config), "", "feature_enhancer.")
    model = FeatureEnhancer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in renamed.items()} == expected
    model.load_state_dict(renamed, strict=True)
