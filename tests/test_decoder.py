"""Cross-modality decoder: parity with transformers, padding invariance, official key layout."""

import torch
from torch import nn

from grounding.config import GroundingDINOConfig
from grounding.decoder import CrossModalityDecoder
from grounding.heads import MLP
from grounding.key_mapping import rename_state_dict
from grounding.official_format import official_rules
from grounding.transformers_keys import transformers_rules
from tests.helpers import rename_block, tiny_swin_and_bert
from tests.key_lists import SWINT_OGC_KEYS, key_shapes

TINY = GroundingDINOConfig(
    hidden_dim=32,
    decoder_layers=2,
    decoder_heads=4,
    decoder_ffn_dim=64,
    num_queries=6,
    num_feature_levels=3,
    decoder_points=2,
    max_text_len=8,
)


def _random_(module: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module.eval()


def _transformers_decoder():
    """The decoder of a tiny transformers `GroundingDinoModel`, with a shared box head set up as
    `GroundingDinoForObjectDetection` does (`model.decoder.bbox_embed` = the tied per-layer heads,
    all one MLP since `decoder_bbox_embed_share=True`)."""
    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        GroundingDinoMLPPredictionHead,
        GroundingDinoModel,
    )

    swin, bert = tiny_swin_and_bert()
    config = GroundingDinoConfig(
        backbone_config=swin,
        text_config=bert,
        d_model=32,
        encoder_layers=1,
        decoder_layers=TINY.decoder_layers,
        encoder_attention_heads=4,
        decoder_attention_heads=TINY.decoder_heads,
        encoder_ffn_dim=64,
        decoder_ffn_dim=TINY.decoder_ffn_dim,
        num_queries=TINY.num_queries,
        max_text_len=TINY.max_text_len,
        num_feature_levels=TINY.num_feature_levels,
        encoder_n_points=2,
        decoder_n_points=TINY.decoder_points,
    )
    torch.manual_seed(0)
    decoder = GroundingDinoModel(config).decoder
    box_head = GroundingDinoMLPPredictionHead(32, 32, 4, 3)
    decoder.bbox_embed = nn.ModuleList([box_head] * config.decoder_layers)
    _random_(decoder, seed=1)
    return decoder, box_head


def _ours_from_transformers(hf_decoder, hf_box_head) -> tuple[CrossModalityDecoder, MLP]:
    block = {k: v for k, v in hf_decoder.state_dict().items() if not k.startswith("bbox_embed.")}
    decoder = CrossModalityDecoder(TINY).eval()
    renamed = rename_block(block, transformers_rules(TINY), "model.decoder.", "decoder.")
    decoder.load_state_dict(renamed, strict=True)
    box_head = MLP(32, 32, 4, 3).eval()
    box_head.load_state_dict(hf_box_head.state_dict(), strict=True)
    return decoder, box_head


def test_decoder_matches_transformers():
    hf_decoder, hf_box_head = _transformers_decoder()
    decoder, box_head = _ours_from_transformers(hf_decoder, hf_box_head)
    shapes = [(6, 8), (3, 4), (2, 2)]
    length = sum(h * w for h, w in shapes)
    generator = torch.Generator().manual_seed(2)
    target = torch.randn(2, 6, 32, generator=generator)
    reference_boxes = torch.rand(2, 6, 4, generator=generator) * 0.6 + 0.2
    vision = torch.randn(2, length, 32, generator=generator)
    text = torch.randn(2, 5, 32, generator=generator)
    token_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    valid_ratios = torch.ones(2, 3, 2)
    spatial_shapes = torch.tensor(shapes)
    with torch.no_grad():
        expected = hf_decoder(
            inputs_embeds=target,
            vision_encoder_hidden_states=vision,
            vision_encoder_attention_mask=torch.ones(2, length, dtype=torch.bool),
            text_encoder_hidden_states=text,
            text_encoder_attention_mask=~token_mask,
            reference_points=reference_boxes,
            spatial_shapes=spatial_shapes,
            spatial_shapes_list=shapes,
            level_start_index=torch.cat(
                [torch.zeros(1, dtype=torch.long), spatial_shapes.prod(1).cumsum(0)[:-1]]
            ),
            valid_ratios=valid_ratios,
            return_dict=True,
        )
        hidden, references = decoder(
            target, reference_boxes, vision, None, shapes, valid_ratios, text, token_mask, box_head
        )

    assert hidden.shape == (2, 2, 6, 32) and references.shape == (3, 2, 6, 4)
    torch.testing.assert_close(
        hidden, expected.intermediate_hidden_states.transpose(0, 1), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        references[1:], expected.intermediate_reference_points.transpose(0, 1), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(references[0], reference_boxes)
    # The boxes moved away from the inputs, and stayed where both inverse sigmoids agree.
    assert (references[1:] - references[:-1]).abs().max() > 1e-2
    assert references.min() > 1e-3 and references.max() < 1 - 1e-3


def _pad_levels(levels: list[torch.Tensor], padded_shapes, garbage: float):
    """Place each (h, w, C) level top-left in a (H, W, C) map full of `garbage`; flatten."""
    tokens, masks = [], []
    for level, (height, width) in zip(levels, padded_shapes, strict=True):
        canvas = torch.full((height, width, level.shape[-1]), garbage)
        mask = torch.ones(height, width, dtype=torch.bool)
        canvas[: level.shape[0], : level.shape[1]] = level
        mask[: level.shape[0], : level.shape[1]] = False
        tokens.append(canvas.flatten(0, 1))
        masks.append(mask.flatten())
    return torch.cat(tokens), torch.cat(masks)


def test_decoder_padding_invariance():
    decoder = _random_(CrossModalityDecoder(TINY), seed=3)
    box_head = _random_(MLP(32, 32, 4, 3), seed=4)
    padded_shapes = [(6, 8), (3, 4), (2, 2)]
    small_shapes = [(4, 5), (2, 3), (1, 2)]
    generator = torch.Generator().manual_seed(5)
    large = [torch.randn(h, w, 32, generator=generator) for h, w in padded_shapes]
    small = [torch.randn(h, w, 32, generator=generator) for h, w in small_shapes]
    target = torch.randn(2, 6, 32, generator=generator)
    reference_boxes = torch.rand(2, 6, 4, generator=generator) * 0.8 + 0.1
    text = torch.randn(2, 5, 32, generator=generator)
    token_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])

    large_tokens, large_mask = _pad_levels(large, padded_shapes, garbage=50.0)
    small_tokens, small_mask = _pad_levels(small, padded_shapes, garbage=50.0)
    small_ratios = torch.tensor(
        [[w / pw, h / ph] for (h, w), (ph, pw) in zip(small_shapes, padded_shapes, strict=True)]
    )
    valid_ratios = torch.stack([torch.ones(3, 2), small_ratios])
    with torch.no_grad():
        batched = decoder(
            target,
            reference_boxes,
            torch.stack([large_tokens, small_tokens]),
            torch.stack([large_mask, small_mask]),
            padded_shapes,
            valid_ratios,
            text,
            token_mask,
            box_head,
        )
        alone_large = decoder(
            target[:1],
            reference_boxes[:1],
            large_tokens[None],
            None,
            padded_shapes,
            torch.ones(1, 3, 2),
            text[:1],
            token_mask[:1],
            box_head,
        )
        alone_small = decoder(
            target[1:],
            reference_boxes[1:],
            torch.cat([x.flatten(0, 1) for x in small])[None],
            None,
            small_shapes,
            torch.ones(1, 3, 2),
            text[1:, :3],
            token_mask[1:, :3],
            box_head,
        )
    for index, (hidden, references) in enumerate((alone_large, alone_small)):
        torch.testing.assert_close(batched[0][:, index], hidden[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1][:, index], references[:, 0], atol=1e-5, rtol=1e-5)


def test_decoder_runs_under_bfloat16_autocast_and_trains():
    decoder = _random_(CrossModalityDecoder(TINY), seed=6).train()
    box_head = _random_(MLP(32, 32, 4, 3), seed=7)
    shapes = [(4, 4), (2, 2), (1, 1)]
    args = (
        torch.randn(2, 6, 32),
        torch.rand(2, 6, 4) * 0.5 + 0.25,
        torch.randn(2, 21, 32),
        None,
        shapes,
        torch.ones(2, 3, 2),
        torch.randn(2, 4, 32),
        torch.ones(2, 4, dtype=torch.bool),
        box_head,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        hidden, references = decoder(*args)
    assert torch.isfinite(hidden).all() and torch.isfinite(references).all()

    hidden, references = decoder(*args)
    hidden.sum().backward(retain_graph=True)
    assert all(p.grad is not None for p in decoder.parameters())
    # The refined boxes reach the next layer detached: the queries never see the box head ...
    assert box_head.layers[0].weight.grad is None
    # ... but the returned boxes keep their graph (DINO's "look forward twice").
    references[1].sum().backward()
    assert box_head.layers[0].weight.grad is not None


def test_official_rules_match_the_official_key_list():
    prefix = "transformer.decoder."
    tensors = {
        key: torch.zeros(shape)
        for key, shape in key_shapes(SWINT_OGC_KEYS, prefix).items()
        if not key.startswith(prefix + "bbox_embed.")
    }
    rules = official_rules(GroundingDINOConfig())
    # The decoder's box-head keys go to the model's shared head, not into this block.
    box_head = rename_state_dict({prefix + "bbox_embed.0.layers.0.weight": torch.zeros(1)}, rules)
    assert list(box_head) == ["bbox_embed.layers.0.weight"]
    renamed = rename_block(tensors, rules, "", "decoder.")
    ours = CrossModalityDecoder(GroundingDINOConfig()).state_dict()
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
