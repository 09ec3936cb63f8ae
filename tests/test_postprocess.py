"""Thresholds and labels on planted logits: one phrase per label, never empty, never special."""

import math

import numpy as np
import pytest
import torch

from grounding.postprocess import Detections, select_detections
from grounding.text_masks import phrase_token_spans

CAPTION = "a cat . a remote control ."
IDS = [101, 1037, 4937, 1012, 1037, 6556, 2491, 1012, 102]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def planted(rows: list[dict[int, float]]) -> torch.Tensor:
    """(Q, 256) logits: -inf beyond the caption, probability 0.01 unless planted."""
    logits = torch.full((len(rows), 256), float("-inf"))
    logits[:, : len(IDS)] = logit(0.01)
    for q, row in enumerate(rows):
        for token, p in row.items():
            logits[q, token] = logit(p)
    return logits


@pytest.fixture
def select(tokenizer):
    def run(logits, boxes=None, box_threshold=0.35, text_threshold=0.25, **kwargs):
        if boxes is None:
            boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(len(logits), 1)
        return select_detections(logits, boxes, IDS, phrase_token_spans(IDS), tokenizer.decode,
                                 (100, 200), box_threshold, text_threshold, **kwargs)
    return run


def test_ids_and_spans(tokenizer):
    assert tokenizer(CAPTION)["input_ids"] == IDS
    assert phrase_token_spans(IDS) == [(1, 3), (4, 7)]


def test_box_threshold_score_and_labels(select):
    logits = planted([
        {1: 0.3, 2: 0.9},              # "a cat"
        {5: 0.6, 6: 0.2, 7: 0.8},      # best token is "." -> its phrase via the best real token
        {2: 0.3},                      # below the box threshold
        {8: 0.95, 2: 0.1, 5: 0.2},     # best is [SEP]; no token passes -> whole phrase
        {2: 0.5, 5: 0.6},              # the reference would merge "cat remote"
    ])
    dets = select(logits)
    assert len(dets) == 4
    np.testing.assert_allclose(dets.scores, [0.95, 0.9, 0.8, 0.6], rtol=1e-5)
    assert dets.phrases == ["a remote control", "a cat", "remote", "remote"]
    assert dets.phrase_ids.tolist() == [1, 0, 1, 1]
    assert dets.prompt_phrases == ["a cat", "a remote control"]
    assert dets.boxes.dtype == np.float32 and dets.scores.dtype == np.float32


def test_box_threshold_is_strict(select):
    dets = select(planted([{2: 0.5}]), box_threshold=0.5)
    assert len(dets) == 0


def test_boxes_in_input_pixels_and_clipped(select):
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.05, 0.95, 0.3, 0.3]])
    dets = select(planted([{2: 0.9}, {2: 0.8}]), boxes=boxes)
    np.testing.assert_allclose(dets.boxes[0], [40, 60, 60, 140], atol=1e-4)
    np.testing.assert_allclose(dets.boxes[1], [0, 160, 20, 200], atol=1e-4)


def test_empty_result_is_valid(select):
    dets = select(planted([{2: 0.2}, {5: 0.1}]))
    assert len(dets) == 0
    assert dets.boxes.shape == (0, 4) and dets.scores.shape == (0,) and dets.phrases == []
    assert dets.prompt_phrases == ["a cat", "a remote control"]


def test_optional_per_phrase_nms(select):
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.51, 0.5, 0.2, 0.4], [0.5, 0.5, 0.2, 0.4]])
    logits = planted([{2: 0.9}, {2: 0.8}, {5: 0.7}])
    assert len(select(logits, boxes=boxes)) == 3
    dets = select(logits, boxes=boxes, nms_threshold=0.5)
    assert dets.phrases == ["cat", "remote"]


def test_concatenate_keeps_phrase_ids_apart():
    a = Detections(np.zeros((1, 4), np.float32), np.array([0.5], np.float32), ["cat"],
                   np.array([0]), ["cat", "dog"])
    b = Detections(np.ones((1, 4), np.float32), np.array([0.7], np.float32), ["bird"],
                   np.array([0]), ["bird"])
    joined = Detections.concatenate([a, b])
    assert joined.phrases == ["bird", "cat"]
    assert joined.phrase_ids.tolist() == [2, 0]
    assert joined.prompt_phrases == ["cat", "dog", "bird"]


def test_labels_take_whole_words_never_half_words(tokenizer):
    ids = tokenizer("a skateboards .")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[2:4] == ["skate", "##boards"]  # one word, two pieces
    continuation = [token.startswith("##") for token in tokens]
    logits = torch.full((1, 256), float("-inf"))
    logits[0, : len(ids)] = logit(0.01)
    logits[0, 3] = logit(0.9)  # only "##boards" passes the text threshold
    dets = select_detections(logits, torch.tensor([[0.5, 0.5, 0.2, 0.2]]), ids,
                             phrase_token_spans(ids), tokenizer.decode, (10, 10), 0.35, 0.25,
                             continuation=continuation)
    assert dets.phrases == ["skateboards"]
