"""Saving in transformers format: config round trip, files equal to transformers' own, and the saved
model loads into both `grounding.load_detector` and transformers with the same outputs.

Tiny random models only; the full-size key map is checked on the meta device (no weights).
"""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

import grounding
from grounding.config import BERT_ARCHITECTURE_KEYS, PRESETS, from_transformers_config
from grounding.key_mapping import KeyMappingError, rename_state_dict
from grounding.model import build_model
from grounding.transformers_format import (
    save_pretrained,
    to_transformers_config,
    transformers_skeleton,
    transformers_state_dict,
)
from grounding.transformers_keys import transformers_rules
from tests.helpers import (
    random_transformers_model,
    save_transformers_directory,
    tiny_transformers_config,
)
from tests.parity import CAPTIONS, assert_matches, level_shapes, run_transformers

# SwinModel's final norm: never applied, written by us as an identity LayerNorm.
UNUSED_PREFIX = "model.backbone.conv_encoder.model.swin.layernorm."


def bert_defaults() -> dict:
    from transformers import BertConfig

    return {key: getattr(BertConfig(), key) for key in BERT_ARCHITECTURE_KEYS}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def load_transformers_model(directory):
    """transformers' model from `directory`, asserting that every key was loaded and used."""
    from transformers import GroundingDinoForObjectDetection

    model, info = GroundingDinoForObjectDetection.from_pretrained(directory,
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(transformers' directory of a random model, our detector loaded from it, our save of it)."""
    hf_model = random_transformers_model(tiny_transformers_config())
    theirs = save_transformers_directory(hf_model, tmp_path_factory.mktemp("theirs"))
    detector = grounding.load_detector(theirs, device="cpu")
    ours = save_pretrained(detector, tmp_path_factory.mktemp("ours"))
    return theirs, detector, ours


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_round_trip_of_the_presets(preset):
    config = PRESETS[preset]()
    round_trip = from_transformers_config(to_transformers_config(config))
    # `text={}` means bert-base-uncased; transformers writes its values out in full.
    assert round_trip == dataclasses.replace(config, text=bert_defaults())
    assert to_transformers_config(round_trip) == to_transformers_config(config)


def test_config_round_trip_of_tiny_and_unusual_configs():
    tiny = from_transformers_config(tiny_transformers_config().to_dict())
    assert from_transformers_config(to_transformers_config(tiny)) == tiny
    unusual = dataclasses.replace(
        tiny, backbone=dataclasses.replace(tiny.backbone, out_indices=(0, 1, 2, 3), window_size=12,
                                           drop_path_rate=0.3, layer_norm_eps=1e-6),
        position_temperature=10000.0, layer_norm_eps=1e-6, fusion_drop_path=0.0, max_text_len=128,
        encoder_points=2, decoder_points=3, num_feature_levels=5)
    written = to_transformers_config(unusual)
    assert written["backbone_config"]["out_indices"] == [1, 2, 3, 4]
    assert written["two_stage"] and written["decoder_bbox_embed_share"]
    assert from_transformers_config(written) == unusual
    with pytest.raises(ValueError, match="position_temperature"):
        to_transformers_config(dataclasses.replace(tiny, position_temperature=12.5))


def test_files_are_what_transformers_writes(saved):
    theirs, detector, ours = saved
    assert {path.name for path in ours.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "processor_config.json"}
    their_tensors = read_safetensors(theirs / "model.safetensors")
    our_tensors = read_safetensors(ours / "model.safetensors")
    # Same names, including transformers' 4.x Swin names and only bbox_embed.0 of the tied heads.
    assert our_tensors.keys() == their_tensors.keys()
    assert not any(key.startswith(("bbox_embed.1.", "model.decoder.bbox_embed."))
                   for key in our_tensors)
    for key, tensor in our_tensors.items():
        assert tensor.dtype == torch.float32, key
        if not key.startswith(UNUSED_PREFIX):
            assert torch.equal(tensor, their_tensors[key]), key
    config = json.loads((ours / "config.json").read_text())
    assert from_transformers_config(config) == detector.model.config
    assert config["architectures"] == ["GroundingDinoForObjectDetection"]


def test_transformers_loads_our_directory_with_the_same_outputs(saved):
    _, detector, ours = saved
    hf_model = load_transformers_model(ours)
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 256, 320)
    hf, lengths = run_transformers(hf_model, detector.tokenizer, pixels, CAPTIONS[:1])
    out = detector.detect(pixels, CAPTIONS[:1])
    shapes = level_shapes(detector, pixels)
    assert_matches(out, 0, hf[0], lengths[0], shapes, shapes)


def test_load_detector_reads_our_directory_back_identically(saved):
    _, detector, ours = saved
    reloaded = grounding.load_detector(ours, device="cpu")
    assert reloaded.model.config == detector.model.config
    for key, value in detector.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[key], value), key
    torch.manual_seed(2)
    pixels = torch.randn(1, 3, 224, 288)
    expected, got = detector.detect(pixels, CAPTIONS[1]), reloaded.detect(pixels, CAPTIONS[1])
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.boxes, expected.boxes)
    assert reloaded.tokenizer(CAPTIONS[0])["input_ids"] == detector.tokenizer(CAPTIONS[0])[
        "input_ids"]


def test_transformers_processor_loads_from_our_directory(saved):
    from transformers import AutoProcessor

    _, detector, ours = saved
    processor = AutoProcessor.from_pretrained(ours)
    assert type(processor).__name__ == "GroundingDinoProcessor"
    assert processor.image_processor.size == {"shortest_edge": 800, "longest_edge": 1333}
    assert processor.tokenizer(CAPTIONS[0])["input_ids"] == detector.tokenizer(CAPTIONS[0])[
        "input_ids"]


def test_every_trained_weight_survives_the_round_trip(saved, tmp_path):
    """Changed weights (as after training) reach transformers and come back, tensor for tensor."""
    _, detector, ours = saved
    trained = copy.deepcopy(detector.model)
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    directory = save_pretrained(trained, tmp_path / "trained")
    assert not (directory / "tokenizer.json").exists()  # a bare model has no tokenizer
    expected = trained.state_dict()
    hf_state = load_transformers_model(directory).state_dict()
    # Our loader's rules also check that all aliases of the shared box head agree.
    from_transformers = rename_state_dict(hf_state, transformers_rules(trained.config))
    reloaded = grounding.load_detector(directory, text_encoder=ours,
                                       device="cpu").model.state_dict()
    assert from_transformers.keys() == expected.keys() == reloaded.keys()
    for key, value in expected.items():
        assert torch.equal(from_transformers[key], value), key
        assert torch.equal(reloaded[key], value), key


def test_half_precision_files(saved, tmp_path):
    _, detector, _ = saved
    directory = save_pretrained(detector, tmp_path / "half", dtype=torch.float16)
    assert json.loads((directory / "config.json").read_text())["dtype"] == "float16"
    tensors = read_safetensors(directory / "model.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}
    level_embed = detector.model.state_dict()["level_embed"]
    assert torch.equal(tensors["model.level_embed"], level_embed.half())


def test_a_parameter_without_a_transformers_name_is_an_error(saved):
    _, detector, _ = saved
    model = copy.deepcopy(detector.model)
    model.extra_scale = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(KeyMappingError, match="extra_scale"):
        transformers_state_dict(model)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_full_size_key_map_covers_every_transformers_key(preset):
    """Built on the meta device: names, shapes and aliases without allocating weights."""
    config = PRESETS[preset]()
    with torch.device("meta"):
        model = build_model(config)
    skeleton = transformers_skeleton(config)
    state_dict = transformers_state_dict(model, skeleton=skeleton, device="meta")
    expected = skeleton.state_dict()
    assert state_dict.keys() == expected.keys()
    assert all(state_dict[key].shape == expected[key].shape for key in expected)
    tied = skeleton.all_tied_weights_keys
    # 6 tensors per head: bbox_embed.{1..5} -> bbox_embed.0, model.decoder.bbox_embed.{0..5}
    assert len(tied) == 6 * 5 + 6 * 6
    for alias, source in tied.items():
        assert state_dict[alias] is state_dict[source], alias
