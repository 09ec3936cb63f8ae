"""Language-guided query selection and the contrastive head: parity with transformers, planted
tokens, padding invariance, and the official checkpoint layout."""

from dataclasses import replace

import pytest
import torch

from grounding.config import GroundingDINOConfig
from grounding.heads import contrastive_logits
from grounding.key_mapping import rename_state_dict
from grounding.official_format import official_rules
from grounding.query_selection import (
    QuerySelection,
    encoder_output_proposals,
)
from grounding.transformers_keys import transformers_rules
from tests.helpers import rename_block, tiny_swin_and_bert
from tests.key_lists import SWINT_OGC_KEYS, key_shapes

HF_BLOCK_PREFIXES = (
    "enc_output.",
    "enc_output_norm.",
    "encoder_output_bbox_embed.",
    "query_position_embeddings.",
)
TINY = GroundingDINOConfig(hidden_dim=32, num_queries=6, num_feature_levels=3, max_text_len=8)
HF_TINY = replace(TINY, num_queries=10, max_text_len=12)  # as `_tiny_transformers_model()`


def _tiny_transformers_model(num_queries: int = 10, max_text_len: int = 12):
    """A tiny random transformers `GroundingDinoModel` (d_model 32 for GroupNorm(32))."""
    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoModel

    swin, bert = tiny_swin_and_bert()
    config = GroundingDinoConfig(
        backbone_config=swin,
        text_config=bert,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=num_queries,
        max_text_len=max_text_len,
        num_feature_levels=4,
        encoder_n_points=2,
        decoder_n_points=2,
    )
    torch.manual_seed(0)
    model = GroundingDinoModel(config).eval()
    with torch.no_grad():  # non-trivial values for every weight of this block
        for name, parameter in model.named_parameters():
            if name.startswith(HF_BLOCK_PREFIXES):
                parameter.normal_(0.0, 0.3)
    return model


def _ours_from_transformers(hf_model, config: GroundingDINOConfig) -> QuerySelection:
    block = {k: v for k, v in hf_model.state_dict().items() if k.startswith(HF_BLOCK_PREFIXES)}
    ours = QuerySelection(config).eval()
    renamed = rename_block(block, transformers_rules(config), "model.", "query_selection.")
    ours.load_state_dict(renamed, strict=True)
    return ours


def _random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module.eval()


@pytest.fixture(scope="module")
def hf_model():
    return _tiny_transformers_model()


def test_encoder_output_proposals_match_transformers(hf_model):
    # Level 0 is wide enough to have invalid border anchors (centre x < 0.01 or > 0.99).
    shapes = [(12, 60), (6, 30), (3, 15), (2, 8)]
    valid = [(10, 50), (5, 25), (3, 13), (2, 7)]
    length = sum(h * w for h, w in shapes)
    padding_mask = torch.zeros(2, length, dtype=torch.bool)
    start = 0
    for (height, width), (valid_h, valid_w) in zip(shapes, valid, strict=True):
        level = torch.ones(height, width, dtype=torch.bool)
        level[:valid_h, :valid_w] = False
        padding_mask[1, start : start + height * width] = level.flatten()
        start += height * width
    vision = torch.randn(2, length, 32)

    with torch.no_grad():
        hf_memory, hf_proposals = hf_model.generate_encoder_output_proposals(
            vision, padding_mask, shapes
        )
        memory, proposals = encoder_output_proposals(vision, padding_mask, shapes)
        ours = _ours_from_transformers(hf_model, HF_TINY)
        memory = ours.enc_output_norm(ours.enc_output(memory))

    assert torch.isinf(proposals[0]).any(), "image 0 has no padding but invalid border anchors"
    torch.testing.assert_close(proposals, hf_proposals)
    torch.testing.assert_close(memory, hf_memory)
    assert torch.equal(encoder_output_proposals(vision, None, shapes)[1][0], proposals[0])


def test_query_selection_matches_transformers_forward(hf_model):
    torch.manual_seed(1)
    input_ids = torch.randint(0, 50, (2, 7))
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    with torch.no_grad():
        out = hf_model(
            pixel_values=torch.randn(2, 3, 64, 64),
            input_ids=input_ids,
            attention_mask=attention_mask,
        )
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]  # strides 8, 16, 32, 64 of a 64x64 image
    vision = out.encoder_last_hidden_state_vision
    assert vision.shape[1] == sum(h * w for h, w in shapes)
    ours = _ours_from_transformers(hf_model, HF_TINY)
    with torch.no_grad():
        selection = ours(
            vision, None, shapes, out.encoder_last_hidden_state_text, attention_mask.bool()
        )

    hf_topk = out.enc_outputs_class.max(-1).values.topk(10, dim=1).indices
    assert torch.equal(selection.topk_indices, hf_topk)
    torch.testing.assert_close(selection.reference_boxes, out.init_reference_points)
    torch.testing.assert_close(selection.encoder_boxes, out.init_reference_points)
    expected_logits = torch.gather(out.enc_outputs_class, 1, hf_topk[..., None].expand(-1, -1, 12))
    torch.testing.assert_close(selection.encoder_logits, expected_logits)
    assert torch.isinf(selection.encoder_logits[1, :, 5:]).all()
    torch.testing.assert_close(
        selection.target, hf_model.query_position_embeddings.weight.expand(2, -1, -1)
    )


def test_top_k_picks_the_planted_tokens():
    config = replace(TINY, num_queries=2)
    selection = QuerySelection(config).eval()
    with torch.no_grad():  # output memory = LayerNorm(vision)
        selection.enc_output.weight.copy_(torch.eye(32))
        selection.enc_output.bias.zero_()
    shapes = [(4, 4), (2, 2), (1, 1)]
    text = torch.randn(1, 3, 32)
    text = text - text.mean(-1, keepdim=True)  # LayerNorm keeps zero-mean directions
    vision = torch.randn(1, 21, 32) * 0.1
    vision[0, 5] = text[0, 1]  # the best possible score: aligned with a token
    vision[0, 17] = text[0, 2] * 3
    token_mask = torch.tensor([[True, True, True]])
    with torch.no_grad():
        out = selection(vision, None, shapes, text, token_mask)
    assert set(out.topk_indices[0].tolist()) == {5, 17}
    # Masking the planted tokens' text tokens removes them from the selection.
    with torch.no_grad():
        out = selection(vision, None, shapes, text, torch.tensor([[True, False, False]]))
    assert not {5, 17} & set(out.topk_indices[0].tolist())


def _level_tokens(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(h, w, 32, generator=generator) for h, w in shapes]


def _pad_levels(levels, padded_shapes, fill):
    """Place each (h, w, C) level top-left in a (H, W, C) map filled with `fill`, flatten."""
    tokens, mask = [], []
    for level, (height, width) in zip(levels, padded_shapes, strict=True):
        canvas = fill(height, width)
        pad = torch.ones(height, width, dtype=torch.bool)
        canvas[: level.shape[0], : level.shape[1]] = level
        pad[: level.shape[0], : level.shape[1]] = False
        tokens.append(canvas.flatten(0, 1))
        mask.append(pad.flatten())
    return torch.cat(tokens), torch.cat(mask)


def _unpadded_index(index, small_shapes, padded_shapes):
    """Index in the padded flattened levels -> index in the unpadded ones."""
    start_padded = start_small = 0
    for (height, width), (small_h, small_w) in zip(padded_shapes, small_shapes, strict=True):
        if index < start_padded + height * width:
            row, col = divmod(index - start_padded, width)
            assert row < small_h and col < small_w, "a padded token was selected"
            return start_small + row * small_w + col
        start_padded += height * width
        start_small += small_h * small_w
    raise IndexError(index)


def test_padding_invariance_and_padded_tokens_never_selected():
    padded_shapes = [(6, 8), (3, 4), (2, 2)]
    small_shapes = [(4, 5), (2, 3), (1, 2)]  # 20 + 6 + 2 = 28 real tokens, 34 padded
    config = replace(TINY, num_queries=25)
    selection = _random_(QuerySelection(config), seed=3)
    large = _level_tokens(padded_shapes, seed=4)
    small = _level_tokens(small_shapes, seed=5)
    generator = torch.Generator().manual_seed(6)
    text = torch.randn(2, 5, 32, generator=generator)
    token_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])

    def garbage(height, width):  # padded tokens that would score high if they were not masked
        return text[1, 0].expand(height, width, 32) * 10

    large_tokens, large_mask = _pad_levels(large, padded_shapes, garbage)
    small_tokens, small_mask = _pad_levels(small, padded_shapes, garbage)
    vision = torch.stack([large_tokens, small_tokens])
    padding_mask = torch.stack([large_mask, small_mask])
    with torch.no_grad():
        batched = selection(vision, padding_mask, padded_shapes, text, token_mask)
        alone_large = selection(large_tokens[None], None, padded_shapes, text[:1], token_mask[:1])
        alone_small = selection(
            torch.cat([x.flatten(0, 1) for x in small])[None],
            None,
            small_shapes,
            text[1:, :3],
            token_mask[1:, :3],
        )
        unmasked = selection(vision, None, padded_shapes, text, token_mask)

    assert padding_mask[1].gather(0, unmasked.topk_indices[1]).any(), "the test plants nothing"
    assert not padding_mask.gather(1, batched.topk_indices).any()
    for index, alone in ((0, alone_large), (1, alone_small)):
        for name in ("target", "reference_boxes", "encoder_logits", "encoder_boxes"):
            torch.testing.assert_close(
                getattr(batched, name)[index], getattr(alone, name)[0], msg=name
            )
    mapped = [
        _unpadded_index(i, small_shapes, padded_shapes) for i in batched.topk_indices[1].tolist()
    ]
    assert mapped == alone_small.topk_indices[0].tolist()
    assert torch.equal(batched.topk_indices[0], alone_large.topk_indices[0])


def test_query_selection_runs_under_bfloat16_autocast():
    selection = _random_(QuerySelection(TINY), seed=7)
    shapes = [(4, 4), (2, 2), (1, 1)]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = selection(
            torch.randn(2, 21, 32),
            None,
            shapes,
            torch.randn(2, 4, 32),
            torch.ones(2, 4, dtype=torch.bool),
        )
    assert torch.isfinite(out.reference_boxes).all()
    assert out.encoder_logits.shape == (2, 6, 8)


def test_query_selection_gradients_reach_the_encoder_box_head_only_through_encoder_boxes():
    selection = _random_(QuerySelection(TINY), seed=8).train()
    shapes = [(4, 4), (2, 2), (1, 1)]
    out = selection(
        torch.randn(1, 21, 32),
        None,
        shapes,
        torch.randn(1, 4, 32),
        torch.ones(1, 4, dtype=torch.bool),
    )
    assert not out.reference_boxes.requires_grad
    (out.encoder_boxes.sum() + out.encoder_logits[..., :4].sum()).backward()
    assert selection.enc_out_bbox_embed.layers[0].weight.grad is not None
    assert selection.enc_output.weight.grad is not None


def test_contrastive_logits_masks_and_pads():
    queries = torch.randn(2, 3, 8)
    text = torch.randn(2, 4, 8)
    token_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    logits = contrastive_logits(queries, text, token_mask, max_text_len=6)
    assert logits.shape == (2, 3, 6)
    torch.testing.assert_close(logits[0, :, :4], queries[0] @ text[0].T)
    torch.testing.assert_close(logits[1, :, :2], queries[1] @ text[1, :2].T)
    assert torch.isneginf(logits[1, :, 2:]).all() and torch.isneginf(logits[0, :, 4:]).all()
    with pytest.raises(ValueError, match="max_text_len"):
        contrastive_logits(queries, text, token_mask, max_text_len=3)


def test_official_rules_match_the_official_key_list():
    ours = QuerySelection(GroundingDINOConfig()).state_dict()
    tensors = {key: torch.zeros(shape) for key, shape in key_shapes(SWINT_OGC_KEYS).items()}
    prefix = "query_selection."
    renamed = {
        key[len(prefix) :]: tensor
        for key, tensor in rename_state_dict(tensors, official_rules(GroundingDINOConfig())).items()
        if key.startswith(prefix)
    }
    assert renamed.keys() == ours.keys()
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
