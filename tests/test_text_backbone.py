"""BERT text backbone + projection (grounding/text_backbone.py) against transformers."""

import copy

import pytest
import torch
from torch import nn
from transformers import GroundingDinoConfig as HFGroundingDinoConfig
from transformers import GroundingDinoModel
from transformers import SwinConfig as HFSwinConfig
from transformers.models.grounding_dino.modeling_grounding_dino import (
    generate_masks_with_special_tokens_and_transfer_map,
)

from grounding.config import GroundingDINOConfig
from grounding.key_mapping import rename_state_dict
from grounding.official_format import official_rules
from grounding.text_backbone import TextBackbone
from grounding.text_masks import BERT_SPECIAL_TOKEN_IDS, sub_sentence_masks
from grounding.transformers_keys import transformers_rules
from tests.key_lists import SWINT_OGC_KEYS, key_shapes

TINY_TEXT = dict(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
HIDDEN_DIM = 32


class _Detector(nn.Module):
    """Holds the backbone where the full detector does, so rules map full keys."""

    def __init__(self, config: GroundingDINOConfig) -> None:
        super().__init__()
        self.text_backbone = TextBackbone(config)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    swin = HFSwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage2", "stage3", "stage4"],
    )
    config = HFGroundingDinoConfig(
        backbone_config=swin,
        text_config=TINY_TEXT,
        d_model=HIDDEN_DIM,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=8,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        max_text_len=32,
    )
    return GroundingDinoModel(config).eval()


@pytest.fixture(scope="module")
def ours(hf_model):
    """Our detector's text part, loaded from the HF weights through `transformers_rules`."""
    torch.manual_seed(1)  # different random init, so a missed key would show
    config = GroundingDINOConfig(text=TINY_TEXT, hidden_dim=HIDDEN_DIM)
    detector = _Detector(config).eval()
    # GroundingDinoModel is `model` inside GroundingDinoForObjectDetection.
    hf_state = {
        f"model.{k}": v
        for k, v in hf_model.state_dict().items()
        if k.startswith(("text_backbone.", "text_projection."))
    }
    detector.load_state_dict(rename_state_dict(hf_state, transformers_rules(config)), strict=True)
    return detector.text_backbone


def _hf_text_features(hf_model, batch) -> torch.Tensor:
    """The projected text features inside a full transformers forward (before the encoder)."""
    captured = []
    hook = hf_model.text_projection.register_forward_hook(
        lambda module, args, output: captured.append(output)
    )
    pixel_values = torch.randn(len(batch["input_ids"]), 3, 128, 128)
    with torch.no_grad():
        hf_model(
            pixel_values=pixel_values,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
        )
    hook.remove()
    return captured[0]


def _ours(backbone, batch) -> torch.Tensor:
    token_mask = batch["attention_mask"].bool()
    mask, positions = sub_sentence_masks(batch["input_ids"], token_mask)
    with torch.no_grad():
        return backbone(batch["input_ids"], mask, positions)


def test_single_caption_equals_transformers(tokenizer, hf_model, ours):
    batch = tokenizer(["a cat . a remote control ."], return_tensors="pt")
    expected = _hf_text_features(hf_model, batch)
    actual = _ours(ours, batch)
    assert actual.shape == (1, 9, HIDDEN_DIM)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_padded_batch_equals_transformers(tokenizer, hf_model, ours):
    captions = ["a cat .", "a remote control . is it a dog?"]
    batch = tokenizer(captions, padding="longest", return_tensors="pt")
    expected = _hf_text_features(hf_model, batch)
    actual = _ours(ours, batch)
    # The longest row equals transformers' batched computation ...
    torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=0)
    # ... and the shorter row equals transformers on that caption alone (transformers' batched
    # mask lets the shorter caption's [SEP] join its last phrase: our documented deviation).
    alone = tokenizer(captions[:1], return_tensors="pt")
    real = alone["input_ids"].shape[1]
    torch.testing.assert_close(
        actual[0, :real], _hf_text_features(hf_model, alone)[0], atol=1e-5, rtol=0
    )
    # Given transformers' own masks, the backbone reproduces the whole batch.
    hf_mask, hf_positions = generate_masks_with_special_tokens_and_transfer_map(
        batch["input_ids"], torch.tensor(BERT_SPECIAL_TOKEN_IDS)
    )
    with torch.no_grad():
        same_masks = ours(batch["input_ids"], hf_mask, hf_positions)
    torch.testing.assert_close(same_masks, expected, atol=1e-5, rtol=0)


def test_additive_mask_equals_explicit_attention(tokenizer, ours):
    """sdpa with our additive mask equals the eager kernel (explicit matmul + mask + softmax),
    and a token's features do not depend on the words of other phrases."""
    batch = tokenizer(["a cat . a remote control ."], return_tensors="pt")
    actual = _ours(ours, batch)
    eager = copy.deepcopy(ours)
    eager.bert.set_attn_implementation("eager")
    torch.testing.assert_close(_ours(eager, batch), actual, atol=1e-5, rtol=0)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, 5] = 3899  # "remote" -> "dog" in the second phrase
    other = _ours(ours, changed)
    torch.testing.assert_close(other[0, :4], actual[0, :4], atol=1e-6, rtol=0)
    torch.testing.assert_close(other[0, 8], actual[0, 8], atol=1e-6, rtol=0)
    assert not torch.allclose(other[0, 4:8], actual[0, 4:8])


def test_bf16_autocast(tokenizer, ours):
    batch = tokenizer(
        ["a cat .", "a remote control . a cat ."], padding="longest", return_tensors="pt"
    )
    reference = _ours(ours, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = _ours(ours, batch)
    assert actual.dtype == torch.bfloat16
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.float(), reference, atol=0.1, rtol=0.05)


def _official_text_keys() -> dict[str, tuple[int, ...]]:
    return key_shapes(SWINT_OGC_KEYS, "bert.") | key_shapes(SWINT_OGC_KEYS, "feat_map.")


def test_official_keys_map_onto_full_size_backbone():
    shapes = _official_text_keys()
    assert len(shapes) == 201 and "bert.pooler.dense.weight" in shapes
    # One distinct constant per key, without allocating full-size tensors.
    state = {
        key: torch.tensor(float(index)).expand(shape)
        for index, (key, shape) in enumerate(shapes.items())
    }
    # Persisted by the transformers versions the official checkpoints were saved with.
    state["bert.embeddings.position_ids"] = torch.arange(512)[None]
    rules = official_rules(GroundingDINOConfig())
    renamed = rename_state_dict(state, rules)
    assert not any("pooler" in key or key.endswith("position_ids") for key in renamed)
    detector = _Detector(GroundingDINOConfig())
    ours = detector.state_dict()
    assert set(renamed) == set(ours)
    for key, tensor in renamed.items():
        assert tensor.shape == ours[key].shape, key
    detector.load_state_dict(renamed, strict=True)
    loaded = detector.state_dict()
    for index, key in enumerate(shapes):
        if not key.startswith("bert.pooler."):
            target = next(iter(rename_state_dict({key: state[key]}, rules)))
            assert loaded[target].flatten()[0] == index, key
