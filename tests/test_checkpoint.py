"""Official `.pth` layout: checkpoints made from the key lists load strictly.

Full-size models are built on the meta device and loaded with `assign=True`; every checkpoint
tensor is one distinct constant expanded to its shape, so the files are a few hundred kB, not the
~7 GB that materialised pseudo-random weights took, and each loaded value still names its key.
"""

import pytest
import torch

from grounding.checkpoint import load_official
from grounding.config import swinb_cogcoor, swint_ogc
from grounding.key_mapping import KeyMappingError
from grounding.model import build_model
from tests.helpers import constant_official_state_dict
from tests.key_lists import SWINB_KEYS, SWINT_OGC_KEYS, VOCAB_FILE

CASES = {
    # SwinT-OGC is saved from DDP: every key starts with "module."; SwinB's keys do not.
    "swint": (swint_ogc, SWINT_OGC_KEYS, "module."),
    "swinb": (swinb_cogcoor, SWINB_KEYS, ""),
}


def save_official(path, state_dict, prefix=""):
    torch.save({"model": {prefix + key: value for key, value in state_dict.items()}}, path)
    return path


def meta_model(make_config):
    """The full-size model without weights: `load_official(..., assign=True)` supplies them."""
    with torch.device("meta"):
        return build_model(make_config())


@pytest.fixture(scope="module")
def models():
    return {case: meta_model(make_config) for case, (make_config, _, _) in CASES.items()}


@pytest.fixture(scope="module")
def swint_model(models):
    return models["swint"]


@pytest.fixture(scope="module")
def official():
    """State dicts in the official layouts, one distinct constant per key."""
    return {
        case: constant_official_state_dict(key_file) for case, (_, key_file, _) in CASES.items()
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_official_layout_loads_strictly_and_fills_every_parameter(case, tmp_path, models, official):
    _, _, prefix = CASES[case]
    model = models[case]
    state_dict = dict(official[case])
    # Older transformers persisted this buffer; the official files may carry it.
    state_dict["bert.embeddings.position_ids"] = torch.arange(512)[None]
    report = load_official(
        model, save_official(tmp_path / "official.pth", state_dict, prefix), assign=True
    )
    assert report["checkpoint_keys"] == len(state_dict)
    ours = model.state_dict()
    assert torch.equal(ours["level_embed"], state_dict["transformer.level_embed"])
    assert torch.equal(ours["text_backbone.projection.weight"], state_dict["feat_map.weight"])
    assert torch.equal(
        ours["bbox_embed.layers.2.weight"], state_dict["bbox_embed.5.layers.2.weight"]
    )
    assert torch.equal(
        ours["backbone.swin.patch_embed.proj.weight"],
        state_dict["backbone.0.patch_embed.proj.weight"],
    )
    # Every tensor of the model came from the checkpoint: none is left on the meta device.
    assert report["loaded_tensors"] == len(ours)
    assert not [key for key, tensor in ours.items() if tensor.is_meta]


@pytest.mark.parametrize("kept", ["bbox_embed.", "transformer.decoder.bbox_embed."])
def test_box_head_under_either_name(kept, tmp_path, swint_model, official):
    state_dict = official["swint"]
    dropped = "transformer.decoder.bbox_embed." if kept == "bbox_embed." else "bbox_embed."
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(dropped)}
    load_official(swint_model, save_official(tmp_path / "head.pth", state_dict), assign=True)
    assert torch.equal(
        swint_model.state_dict()["bbox_embed.layers.0.bias"], state_dict[kept + "0.layers.0.bias"]
    )


def test_missing_and_unknown_keys_are_errors_that_name_them(tmp_path, swint_model, official):
    state_dict = dict(official["swint"])
    del state_dict["transformer.encoder.layers.3.norm1.weight"]
    with pytest.raises(KeyMappingError, match=r"feature_enhancer\.layers\.3\.norm1\.weight"):
        load_official(swint_model, save_official(tmp_path / "missing.pth", state_dict))
    state_dict = dict(official["swint"])
    state_dict["transformer.mystery.weight"] = torch.zeros(1)
    with pytest.raises(KeyMappingError, match=r"transformer\.mystery\.weight"):
        load_official(swint_model, save_official(tmp_path / "unknown.pth", state_dict))


def test_aliases_of_the_shared_head_must_agree(tmp_path, swint_model, official):
    state_dict = dict(official["swint"])
    state_dict["bbox_embed.3.layers.1.weight"] = state_dict["bbox_embed.3.layers.1.weight"] + 1
    with pytest.raises(KeyMappingError, match="different values"):
        load_official(swint_model, save_official(tmp_path / "alias.pth", state_dict))


def test_wrong_architecture_is_reported_with_shapes(tmp_path, swint_model, official):
    path = save_official(tmp_path / "b.pth", official["swinb"])
    with pytest.raises(KeyMappingError, match="shape mismatch"):
        load_official(swint_model, path)


def test_load_detector_reads_an_official_file_with_a_local_text_encoder(tmp_path, official):
    # The one full-size model with real memory here: the constants are copied into it.
    import shutil

    import grounding

    text_encoder = tmp_path / "bert"
    text_encoder.mkdir()
    shutil.copy(VOCAB_FILE, text_encoder / "vocab.txt")
    path = save_official(tmp_path / "swint.pth", official["swint"], "module.")
    detector = grounding.load_detector(
        path, config="swint_ogc", text_encoder=text_encoder, device="cpu"
    )
    assert not detector.model.training
    assert torch.equal(
        detector.model.state_dict()["decoder.norm.weight"],
        official["swint"]["transformer.decoder.norm.weight"],
    )
    assert detector.tokenizer("a cat .")["input_ids"] == [101, 1037, 4937, 1012, 102]
