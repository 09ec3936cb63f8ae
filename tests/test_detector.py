"""Detector behaviour on a tiny random model: batch equals single, long prompts, bad input, bf16."""

import numpy as np
import pytest
import torch
from PIL import Image

from grounding import transforms
from grounding.config import GroundingDINOConfig, SwinConfig
from grounding.model import build_model
from grounding.predictor import Detector, split_caption_tokens


def tiny_config(**overrides) -> GroundingDINOConfig:
    settings = dict(
        backbone=SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)),
        text=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64),
        hidden_dim=32, num_queries=20, encoder_layers=1, decoder_layers=2, encoder_heads=4,
        decoder_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64)
    settings.update(overrides)
    return GroundingDINOConfig(**settings)


@pytest.fixture(scope="module")
def detector(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_config())
    with torch.no_grad():  # random boxes and logits everywhere, not the zero-initialised head
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return Detector(model, tokenizer, device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))


def test_batch_equals_each_image_alone(detector):
    torch.manual_seed(1)
    images = [torch.randn(3, 224, 300), torch.randn(3, 260, 212)]
    captions = ["a cat . a remote control .", "dogs ? a red car"]
    pixels, padding_mask = transforms.batch_images(images)
    batch = detector.detect(pixels, captions, padding_mask)
    for index, image in enumerate(images):
        alone = detector.detect(image[None], captions[index])
        # Equal up to float32 rounding (reductions over differently shaped tensors).
        torch.testing.assert_close(batch.boxes[index], alone.boxes[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.logits[index], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_predict_returns_pixel_boxes_scores_and_phrases(detector, image):
    dets = detector.predict(image, "A Cat. a remote control", box_threshold=0.0,
                            text_threshold=0.0)
    assert len(dets) == 20  # every query passes a zero threshold
    assert dets.boxes.shape == (20, 4) and dets.boxes.dtype == np.float32
    assert (dets.boxes[:, 0] >= 0).all() and (dets.boxes[:, 2] <= 80).all()
    assert (dets.boxes[:, 3] <= 60).all() and (np.diff(dets.scores) <= 0).all()
    assert dets.prompt_phrases == ["a cat", "a remote control"]
    assert all(p and "[" not in p and "." not in p for p in dets.phrases)
    assert len(detector.predict(image, "a cat", box_threshold=1.0)) == 0


def test_threshold_change_needs_no_model_call(detector, image, monkeypatch):
    raw = detector.infer(image, "a cat . a dog .")
    monkeypatch.setattr(detector.model, "forward", None)
    monkeypatch.setattr(detector.model, "ground", None)
    loose = detector.select(raw, 0.0, 0.0)
    strict = detector.select(raw, 0.6, 0.25)
    assert len(loose) >= len(strict)


@pytest.mark.parametrize("caption", ["", "   ", " . ", "\n"])
def test_empty_prompts_are_value_errors(detector, image, caption):
    with pytest.raises(ValueError, match="prompt is empty"):
        detector.predict(image, caption)


@pytest.mark.parametrize("bad", ["cat.png", [[1, 2, 3]], np.zeros((5, 5), np.uint8), None])
def test_wrong_image_types_are_value_errors(detector, bad):
    with pytest.raises(ValueError):
        detector.predict(bad, "a cat")


def test_thresholds_out_of_range_are_value_errors(detector, image):
    raw = detector.infer(image, "a cat")
    with pytest.raises(ValueError, match="box_threshold"):
        detector.select(raw, 1.5, 0.25)


def test_long_prompt_split_at_phrases_loses_nothing(detector, image, tokenizer):
    words = ["cat", "dog", "remote control", "red car", "bird", "tree", "person", "cup"]
    phrases = [f"{w} {i}" for i in range(30) for w in words][:120]
    caption = " . ".join(phrases) + " ."
    ids = tokenizer(caption)["input_ids"]
    assert len(ids) > 256
    chunks = split_caption_tokens(ids, 256, (1012, 1029))
    assert len(chunks) >= 2 and all(len(c) <= 256 for c in chunks)
    assert all(c[0] == 101 and c[-1] == 102 for c in chunks)
    assert sum(len(c) - 2 for c in chunks) == len(ids) - 2  # every token lands in one chunk

    raw = detector.infer(image, caption)
    dets = detector.select(raw, 0.0, 0.0)
    assert dets.prompt_phrases == phrases
    # The second chunk gives exactly what its phrases give as a prompt of their own.
    second = tokenizer.decode(chunks[1][1:-1])
    alone = detector.infer(image, second)
    torch.testing.assert_close(raw.chunks[1][1], alone.chunks[0][1], atol=1e-5, rtol=0)


def test_single_phrase_longer_than_a_pass_is_a_value_error(detector, image):
    with pytest.raises(ValueError, match="one phrase"):
        detector.predict(image, " ".join(["cat"] * 300))


def test_bfloat16_autocast_runs_close_to_float32(detector):
    torch.manual_seed(4)
    pixels = torch.randn(1, 3, 224, 256)
    reference = detector.detect(pixels, "a cat . a dog .")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = detector.detect(pixels, "a cat . a dog .")
    assert torch.isfinite(low.boxes).all()
    # bf16 rounding may reorder near-tied queries: match each box to its nearest counterpart.
    distance = torch.cdist(reference.boxes[0], low.boxes[0].float()).min(dim=1).values
    # A random tiny model is far less well conditioned than a trained one; this bounds drift only.
    assert distance.median() < 0.01 and distance.max() < 0.1


def test_detect_cuts_captions_to_max_text_len_like_the_reference(detector, tokenizer):
    caption = " . ".join(f"cat {i}" for i in range(100)) + " ."
    assert len(tokenizer(caption)["input_ids"]) > 256
    out = detector.detect(torch.randn(1, 3, 224, 224), caption)
    assert out.logits.shape == (1, 20, 256)
    assert torch.isfinite(out.logits).all()  # every one of the 256 columns is a real token
