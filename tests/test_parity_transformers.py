"""Parity with transformers' GroundingDinoForObjectDetection through our transformers-format loader.

Same random weights, `save_pretrained` with a tokenizer from the shipped vocabulary, loaded with
`grounding.load_detector`, compared query by query in float32.

Padded batches: transformers (like the reference) is not padding-invariant (its Swin attends to
padded pixels, padded tokens join the top-k, the decoder's query position uses padded-scale boxes),
while our `detect` gives each image of a padded batch the numbers it gets alone. So each image of
the batch is compared with transformers on that image alone (which is how the reference's `predict`
runs it), and the unpadded first image also with transformers' batched output.
"""

import pytest
import torch

import grounding
from tests.helpers import (
    random_transformers_model,
    save_transformers_directory,
    tiny_transformers_config,
)

CAPTIONS = ["a cat . a remote control .", "dogs ? a red car"]


def assert_matches(ours_logits, ours_boxes, hf_logits, hf_boxes, n_tokens):
    """Boxes within 1e-4; logits over the caption's tokens within 1e-4 * (1 + max |logit|)."""
    torch.testing.assert_close(ours_boxes, hf_boxes, atol=1e-4, rtol=0)
    ours, hf = ours_logits[..., :n_tokens], hf_logits[..., :n_tokens]
    scale = 1 + hf.abs().amax(dim=-1, keepdim=True)
    assert ((ours - hf).abs() <= 1e-4 * scale).all(), (ours - hf).abs().div(scale).max()
    assert torch.isinf(ours_logits[..., n_tokens:]).all()


def run_transformers(model, tokenizer, pixels, captions, pixel_mask=None):
    tokens = tokenizer(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=tokens["input_ids"],
                    attention_mask=tokens["attention_mask"],
                    token_type_ids=torch.zeros_like(tokens["input_ids"]),
                    pixel_mask=pixel_mask)
    return out.logits, out.pred_boxes, tokens["attention_mask"].sum(1).tolist()


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    model = random_transformers_model(tiny_transformers_config())
    directory = save_transformers_directory(model, tmp_path_factory.mktemp("tiny"))
    return model, grounding.load_detector(directory, device="cpu")


def test_single_image(tiny_pair):
    hf_model, detector = tiny_pair
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 256, 320)
    hf_logits, hf_boxes, lengths = run_transformers(hf_model, detector.tokenizer, pixels,
                                                    CAPTIONS[:1])
    out = detector.detect(pixels, CAPTIONS[:1])
    assert out.logits.shape == (1, 30, 256) and out.boxes.shape == (1, 30, 4)
    assert_matches(out.logits, out.boxes, hf_logits, hf_boxes, lengths[0])


def test_padded_batch_of_two_sizes_and_captions(tiny_pair):
    hf_model, detector = tiny_pair
    torch.manual_seed(2)
    large, small = torch.randn(3, 288, 320), torch.randn(3, 256, 256)
    pixels, padding_mask = grounding.transforms.batch_images([large, small])
    out = detector.detect(pixels, CAPTIONS, padding_mask)
    for index, image in enumerate([large, small]):
        hf_logits, hf_boxes, lengths = run_transformers(
            hf_model, detector.tokenizer, image[None], CAPTIONS[index:index + 1])
        assert_matches(out.logits[index:index + 1], out.boxes[index:index + 1], hf_logits,
                       hf_boxes, lengths[0])
    # The first image is unpadded and has the longer caption: transformers' batch agrees too.
    hf_logits, hf_boxes, lengths = run_transformers(hf_model, detector.tokenizer, pixels,
                                                    CAPTIONS, (~padding_mask).long())
    assert_matches(out.logits[:1], out.boxes[:1], hf_logits[:1], hf_boxes[:1], lengths[0])


@pytest.mark.slow
def test_full_size_swint_single_image(tmp_path):
    from transformers import GroundingDinoConfig

    hf_model = random_transformers_model(GroundingDinoConfig())
    directory = save_transformers_directory(hf_model, tmp_path / "full")
    detector = grounding.load_detector(directory, device="cpu")
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, 480, 640)
    hf_logits, hf_boxes, lengths = run_transformers(hf_model, detector.tokenizer, pixels,
                                                    CAPTIONS[:1])
    out = detector.detect(pixels, CAPTIONS[:1])
    assert_matches(out.logits, out.boxes, hf_logits, hf_boxes, lengths[0])
