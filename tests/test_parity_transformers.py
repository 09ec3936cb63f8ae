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
from tests.parity import CAPTIONS, assert_matches, level_shapes, run_transformers


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    model = random_transformers_model(tiny_transformers_config())
    directory = save_transformers_directory(model, tmp_path_factory.mktemp("tiny"))
    return model, grounding.load_detector(directory, device="cpu")


def test_single_image(tiny_pair):
    hf_model, detector = tiny_pair
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 256, 320)
    hf, lengths = run_transformers(hf_model, detector.tokenizer, pixels, CAPTIONS[:1])
    out = detector.detect(pixels, CAPTIONS[:1])
    assert out.logits.shape == (1, 30, 256) and out.boxes.shape == (1, 30, 4)
    shapes = level_shapes(detector, pixels)
    assert_matches(out, 0, hf[0], lengths[0], shapes, shapes)


def test_padded_batch_of_two_sizes_and_captions(tiny_pair):
    hf_model, detector = tiny_pair
    torch.manual_seed(2)
    large, small = torch.randn(3, 288, 320), torch.randn(3, 256, 256)
    pixels, padding_mask = grounding.transforms.batch_images([large, small])
    out = detector.detect(pixels, CAPTIONS, padding_mask)
    batch_shapes = level_shapes(detector, pixels, padding_mask)
    for index, image in enumerate([large, small]):
        hf, lengths = run_transformers(hf_model, detector.tokenizer, image[None],
                                       CAPTIONS[index:index + 1])
        assert_matches(out, index, hf[0], lengths[0], batch_shapes,
                       level_shapes(detector, image[None]))
    # The first image is unpadded and has the longer caption: transformers' batch agrees too.
    hf, lengths = run_transformers(hf_model, detector.tokenizer, pixels, CAPTIONS,
                                   (~padding_mask).long())
    assert_matches(out, 0, hf[0], lengths[0], batch_shapes, batch_shapes)


@pytest.mark.slow
def test_full_size_swint_single_image(tmp_path):
    """The full Swin-T configuration.

    384 x 384 keeps every level-0 anchor valid: at 50 or more columns the border anchors are
    invalid (+inf proposals, boxes of exactly 1.0), where the reference's inverse_sigmoid
    (eps 1e-3, which we follow) and transformers' (eps 1e-5) differ by design.
    """
    from transformers import GroundingDinoConfig

    hf_model = random_transformers_model(GroundingDinoConfig(), noise=0.02)
    directory = save_transformers_directory(hf_model, tmp_path / "full")
    detector = grounding.load_detector(directory, device="cpu")
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, 384, 384)
    hf, lengths = run_transformers(hf_model, detector.tokenizer, pixels, CAPTIONS[:1])
    out = detector.detect(pixels, CAPTIONS[:1])
    shapes = level_shapes(detector, pixels)
    assert_matches(out, 0, hf[0], lengths[0], shapes, shapes)


# transformers 5 names of the Swin backbone -> the transformers 4.x names that files saved in
# 2024 (the Hub's IDEA-Research/grounding-dino-tiny / -base) carry.
LEGACY_NAMES = [
    ("conv_encoder.model.swin.", "conv_encoder.model."),
    ("attention.relative_position_bias.relative_position_bias_table",
     "attention.self.relative_position_bias_table"),
    ("attention.q_proj.", "attention.self.query."),
    ("attention.k_proj.", "attention.self.key."),
    ("attention.v_proj.", "attention.self.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
]


def test_transformers_4_file_layout_loads_the_same(tiny_pair, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    hf_model, detector = tiny_pair
    directory = save_transformers_directory(hf_model, tmp_path / "modern")
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(directory, legacy_dir)
    legacy = {}
    for key, value in load_file(str(directory / "model.safetensors")).items():
        if ".swin.layernorm." in key:  # SwinModel's final norm: 4.x's SwinBackbone had none
            continue
        if key.startswith("model.backbone."):
            for new, old in LEGACY_NAMES:
                key = key.replace(new, old)
        legacy[key] = value.contiguous()
    legacy["model.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self."
           "relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    legacy["model.text_backbone.embeddings.position_ids"] = torch.arange(512)[None]
    save_file(legacy, str(legacy_dir / "model.safetensors"))
    reloaded = grounding.load_detector(legacy_dir, device="cpu")
    for key, value in detector.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[key], value), key


def test_hub_id_of_a_transformers_repository_loads_from_the_cache(tiny_pair, tmp_path,
                                                                  monkeypatch):
    """`load_detector("owner/name")` with the network replaced by a pre-filled Hub cache."""
    from huggingface_hub import constants

    from tests.helpers import COMMIT

    hf_model, detector = tiny_pair
    repo = tmp_path / "hub" / "models--someone--tiny-gdino"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    save_transformers_directory(hf_model, repo / "snapshots" / COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = grounding.load_detector("someone/tiny-gdino", device="cpu")
    torch.testing.assert_close(loaded.model.state_dict()["level_embed"],
                               detector.model.state_dict()["level_embed"])
