"""The installed environment: every dependency imports; the shipped vocabulary is BERT's."""

import hashlib
import importlib

import pytest

from tests.key_lists import VOCAB_FILE, read_key_list

MODULES = [
    "torch",
    "torchvision",
    "transformers",
    "timm",
    "segment_anything",
    "supervision",
    "gradio",
    "gradio_client",
    "huggingface_hub",
    "safetensors",
    "PIL",
    "numpy",
    "cv2",
    "scipy",
    "pycocotools",
]


@pytest.mark.parametrize("name", MODULES)
def test_dependency_imports(name):
    importlib.import_module(name)


def test_torch_and_torchvision_are_a_matching_pair():
    import torch
    import torchvision
    from torchvision.ops import nms

    # torchvision's compiled ops load only against the torch it was built for.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert torchvision.__version__.startswith("0.26.")
    assert torch.__version__.startswith("2.11.")


def test_shipped_vocabulary_is_bert_base_uncased():
    digest = hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest()
    assert digest == "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


def test_tokenizer_matches_reference_ids(tokenizer):
    ids = tokenizer("a cat . a remote control .")["input_ids"]
    assert ids == [101, 1037, 4937, 1012, 1037, 6556, 2491, 1012, 102]
    assert tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"]) == [101, 102, 1012, 1029]


@pytest.mark.parametrize(
    ("name", "count"), [("gdino_swint_ogc_keys.txt", 938), ("gdino_swinb_keys.txt", 1106)]
)
def test_official_key_lists_are_complete(name, count):
    keys = [entry.key for entry in read_key_list(name)]
    assert len(keys) == count
    assert len(set(keys)) == count
