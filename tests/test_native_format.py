"""The scaled, biased contrastive head for models trained from scratch, and our own checkpoint
format that holds it (transformers' cannot)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import grounding
from grounding.config import GroundingDINOConfig, SwinConfig, swint_ogc
from grounding.heads import ContrastiveHead, contrastive_logits
from grounding.model import build_model
from grounding.native_format import CONFIG_FILE, config_from_dict, config_to_dict
from grounding.predictor import Detector


def tiny_config(**overrides) -> GroundingDINOConfig:
    settings = dict(
        backbone=SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)),
        text=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64),
        hidden_dim=32, num_queries=20, encoder_layers=1, decoder_layers=2, encoder_heads=4,
        decoder_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, contrastive_bias=True)
    settings.update(overrides)
    return GroundingDINOConfig(**settings)


def random_detector(tokenizer, config: GroundingDINOConfig) -> Detector:
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return Detector(model, tokenizer, device="cpu")


def test_plain_head_is_the_reference_dot_product_and_has_no_parameters():
    queries, text = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    head = ContrastiveHead(8, 6, scaled_with_bias=False)
    assert list(head.parameters()) == []
    torch.testing.assert_close(head(queries, text, mask),
                               contrastive_logits(queries, text, mask, 6))


def test_scaled_head_divides_by_sqrt_width_and_starts_at_the_focal_prior():
    queries, text = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    head = ContrastiveHead(8, 6, scaled_with_bias=True)
    logits = head(queries, text, mask)
    expected = queries @ text.transpose(1, 2) / math.sqrt(8) - math.log(99)
    torch.testing.assert_close(logits[0, :, :3], expected[0])
    assert torch.isinf(logits[1, :, 2:]).all() and torch.isinf(logits[0, :, 3:]).all()
    zero = head(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), torch.ones(1, 1, dtype=torch.bool))
    assert zero[0, 0, 0].sigmoid().item() == pytest.approx(0.01)
    logits[0, :, :3].sum().backward()
    assert head.bias.grad is not None and head.bias.grad.item() == pytest.approx(15.0)


def test_official_presets_keep_the_reference_layout():
    keys = build_model(tiny_config(contrastive_bias=False)).state_dict().keys()
    assert not any("class_head" in key for key in keys)
    assert not swint_ogc().contrastive_bias
    biased = build_model(tiny_config()).state_dict().keys()
    assert set(biased) - set(keys) == {"class_head.bias", "query_selection.class_head.bias"}


def test_config_round_trip_and_refusals():
    config = tiny_config()
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    assert config_from_dict(config_to_dict(swint_ogc())) == swint_ogc()
    with pytest.raises(ValueError, match="unknown settings"):
        config_from_dict({**config_to_dict(config), "future_knob": 1})
    with pytest.raises(ValueError, match="format_version"):
        config_from_dict({**config_to_dict(config), "format_version": 99})


def test_save_detector_writes_our_format_and_load_detector_reads_it(tokenizer, tmp_path):
    detector = random_detector(tokenizer, tiny_config())
    directory = grounding.save_detector(detector, tmp_path / "native")
    assert (directory / CONFIG_FILE).is_file() and not (directory / "config.json").exists()
    loaded = grounding.load_detector(directory, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    caption = "red circle . blue square ."
    expected, actual = detector.infer(image, caption), loaded.infer(image, caption)
    for (ids_a, logits_a, boxes_a), (ids_b, logits_b, boxes_b) in zip(
            expected.chunks, actual.chunks, strict=True):
        assert ids_a == ids_b
        torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)
        torch.testing.assert_close(boxes_a, boxes_b, rtol=0, atol=0)

    small = grounding.save_detector(detector, tmp_path / "fp16", dtype=torch.float16)
    assert (small / "model.safetensors").stat().st_size < \
        0.6 * (directory / "model.safetensors").stat().st_size
    half = grounding.load_detector(small, device="cpu").infer(image, caption)
    finite = torch.isfinite(expected.chunks[0][1])
    torch.testing.assert_close(half.chunks[0][1][finite], expected.chunks[0][1][finite],
                               atol=0.05, rtol=0.05)


def test_transformers_format_refuses_the_biased_head(tokenizer, tmp_path):
    from grounding.transformers_format import save_pretrained

    with pytest.raises(ValueError, match="save_detector"):
        save_pretrained(random_detector(tokenizer, tiny_config()), tmp_path / "hf")


def test_a_missing_bias_is_a_strict_load_error(tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    from grounding.key_mapping import KeyMappingError

    directory = grounding.save_detector(random_detector(tokenizer, tiny_config()), tmp_path / "d")
    weights = load_file(str(directory / "model.safetensors"))
    del weights["class_head.bias"]
    save_file(weights, str(directory / "model.safetensors"))
    with pytest.raises(KeyMappingError, match="class_head.bias"):
        grounding.load_detector(directory, device="cpu")


@pytest.mark.parametrize("contrastive_bias", [True, False])
def test_the_resize_a_model_was_trained_at_comes_back_with_it(tokenizer, tmp_path,
                                                              contrastive_bias, monkeypatch):
    from grounding import predictor

    detector = random_detector(tokenizer, tiny_config(contrastive_bias=contrastive_bias))
    directory = grounding.save_detector(detector, tmp_path / "d", image_size=224, max_size=320)
    loaded = grounding.load_detector(directory, device="cpu")
    assert (loaded.image_size, loaded.max_size) == (224, 320)
    seen = []
    real = predictor.preprocess
    monkeypatch.setattr(predictor, "preprocess",
                        lambda image, size, max_size: seen.append((size, max_size))
                        or real(image, size, max_size))
    loaded.infer(np.zeros((100, 400, 3), np.uint8), "red circle .")
    assert seen == [(224, 320)]
    default = grounding.save_detector(detector, tmp_path / "default")
    assert (grounding.load_detector(default, device="cpu").image_size,
            grounding.load_detector(default, device="cpu").max_size) == (800, 1333)
