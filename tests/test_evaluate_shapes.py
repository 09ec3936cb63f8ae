"""scripts/evaluate_shapes.py and segmentation.shapes_metrics: the matching on planted
detections, and the whole evaluation on 3 small generated images with tiny random models."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from grounding.shapes_categories import CATEGORIES
from grounding.shapes_data import TEST_SEED_OFFSET
from grounding.shapes_drawing import generate_image
from segmentation.shapes_metrics import (
    FALSE_POSITIVE_KINDS,
    MatchTally,
    box_iou,
    confusion_kind,
    mask_iou,
    match_detections,
)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "evaluate_shapes.py"
SMALL_IMAGES = {"min_side": 64, "max_side": 96}
# Two objects far apart: a blue circle and a red square.
TRUTH_BOXES = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
TRUTH_NAMES = ["blue circle", "red square"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("evaluate_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def split(script, tmp_path_factory):
    return script.held_out_split(tmp_path_factory.mktemp("shapes") / "test", 3, seed=0,
                                 **SMALL_IMAGES)


def summary_of(boxes, scores, phrases, truth_boxes=TRUTH_BOXES, truth_names=TRUTH_NAMES):
    match = match_detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores),
                             phrases, truth_boxes, truth_names)
    tally = MatchTally()
    tally.add(match, phrases, truth_names)
    return match, tally.summary()


def test_box_iou():
    ious = box_iou(np.array([[0, 0, 10, 10], [0, 0, 10, 5]]), TRUTH_BOXES)
    np.testing.assert_allclose(ious, [[1.0, 0.0], [0.5, 0.0]])
    assert box_iou(np.zeros((0, 4)), TRUTH_BOXES).shape == (0, 2)


def test_ground_truth_as_detections_is_perfect():
    sample = generate_image(np.random.default_rng(5), min_shapes=3, max_shapes=4, **SMALL_IMAGES)
    assert len(sample.names) >= 2
    scores = np.linspace(0.9, 0.5, len(sample.names))
    match = match_detections(sample.boxes, scores, sample.names, sample.boxes, sample.names)
    assert sorted(match.pairs) == [(i, i) for i in range(len(sample.names))]
    assert not match.false_positives and not match.false_negatives
    detections = [d for d, _ in match.pairs]
    objects = [o for _, o in match.pairs]
    tally = MatchTally()
    tally.add(match, sample.names, sample.names,
              mask_iou(sample.masks[detections], sample.masks[objects]))
    summary = tally.summary()
    assert summary["recall"] == 1.0 and summary["precision"] == 1.0
    assert summary["mean_mask_iou"] == 1.0 and summary["masks"] == len(sample.names)
    assert summary["false_positives"] == 0 and summary["false_negatives"] == 0
    assert set(summary["false_positive_kinds"]) == set(FALSE_POSITIVE_KINDS)
    for name in CATEGORIES:
        entry = summary["per_category"][name]
        assert entry["recall"] == (1.0 if name in sample.names else None)


def test_right_box_wrong_phrase_is_a_false_positive_and_a_false_negative():
    match, summary = summary_of(TRUTH_BOXES, [0.9, 0.8], ["red circle", "red square"])
    assert match.pairs == [(1, 1)]
    assert match.false_positives == {0: "wrong_colour"} and match.false_negatives == [0]
    assert summary["recall"] == 0.5 and summary["precision"] == 0.5
    assert summary["false_positive_kinds"]["wrong_colour"] == 1
    assert sum(summary["false_positive_kinds"].values()) == 1
    assert summary["per_category"]["blue circle"]["recall"] == 0.0
    assert summary["per_category"]["red circle"]["precision"] == 0.0


@pytest.mark.parametrize(("phrase", "kind"), [
    ("red circle", "wrong_colour"), ("blue triangle", "wrong_shape"),
    ("yellow square", "both_wrong"), ("blue", "partial_label"), ("circle", "partial_label"),
])
def test_confusion_kinds(phrase, kind):
    assert confusion_kind(phrase, "blue circle") == kind
    match, _ = summary_of(TRUTH_BOXES[:1], [0.9], [phrase])
    assert match.false_positives == {0: kind}


def test_a_duplicate_is_a_false_positive():
    match, summary = summary_of(TRUTH_BOXES[[0, 0, 1]], [0.9, 0.7, 0.8], [*TRUTH_NAMES[:1],
                                                                           *TRUTH_NAMES])
    assert sorted(match.pairs) == [(0, 0), (2, 1)]
    assert match.false_positives == {1: "duplicate"}
    assert summary["recall"] == 1.0 and summary["precision"] == pytest.approx(2 / 3)


def test_matching_is_greedy_by_score():
    # The better-scoring detection claims the object although the other's box fits better.
    boxes = [[0, 0, 10, 6], [0, 0, 10, 10]]  # IoU 0.6 and 1.0 with the blue circle
    match, _ = summary_of(boxes, [0.5, 0.9], ["blue circle"] * 2)
    assert match.pairs == [(1, 0)] and match.false_positives == {0: "duplicate"}
    match, _ = summary_of(boxes, [0.9, 0.5], ["blue circle"] * 2)
    assert match.pairs == [(0, 0)] and match.false_positives == {1: "duplicate"}


def test_boxes_on_nothing_and_empty_images():
    match, summary = summary_of([[50, 50, 60, 60], [0, 0, 10, 4]], [0.9, 0.8],
                                ["blue circle", "blue circle"])
    assert match.false_positives == {0: "no_overlap", 1: "no_overlap"}
    assert summary["recall"] == 0.0 and summary["precision"] == 0.0
    _, summary = summary_of([[0, 0, 10, 10]], [0.9], ["red circle"], np.zeros((0, 4)), [])
    assert summary["recall"] is None and summary["false_positive_kinds"]["no_overlap"] == 1
    _, summary = summary_of(np.zeros((0, 4)), [], [])
    assert summary["precision"] is None and summary["false_negatives"] == 2
    assert summary["mean_mask_iou"] is None


def test_held_out_split_is_the_test_seed(script, split):
    coco = json.loads((split / "annotations.json").read_text())
    assert len(coco["images"]) == 3
    first = generate_image(np.random.default_rng([TEST_SEED_OFFSET, 0]), **SMALL_IMAGES)
    boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == 1]
    np.testing.assert_allclose(np.array(boxes)[:, :2], first.boxes[:, :2])
    assert script.shapes_prompt() == " . ".join(CATEGORIES) + " ."


def test_evaluation_runs_with_tiny_models(script, split):
    from segmentation.tiny_models import tiny_detector, tiny_sam

    report = script.evaluate(tiny_detector(device="cpu"), tiny_sam(), split, size=96,
                             max_size=160)
    assert {"AP", "AP50", "per_category"} <= set(report["detection"])
    pipeline = report["pipeline"]
    assert pipeline["images"] == 3
    assert {"recall", "precision", "mean_mask_iou", "false_positive_kinds",
            "per_category"} <= set(pipeline)
    assert pipeline["true_positives"] + pipeline["false_positives"] == pipeline["detections"]
    assert report["sam_on_truth_boxes"]["masks"] == pipeline["objects"] > 0
    assert 0.0 <= report["sam_on_truth_boxes"]["mean_mask_iou"] <= 1.0
    assert set(report["robustness"]) == set(script.ROBUSTNESS_PROMPTS)
    for result in report["robustness"].values():
        assert result["images"] == 3 and result["boxes_per_image"] >= 0.0
        assert {"max_score", "max_query_score", "images_with_boxes"} <= set(result)
    rows = script.target_rows(report)
    table = script.markdown_table(rows).splitlines()
    assert table[0] == "| metric | value | target | result |" and len(table) == len(rows) + 2
    assert [row["passed"] for row in rows if row["target"] != "-"] != []


def test_main_prints_the_table_and_writes_json(script, split, tmp_path, capsys):
    import grounding
    from segmentation.small_sam import SmallSamConfig, build_small_sam
    from segmentation.tiny_models import tiny_detector

    detector = tiny_detector(device="cpu")
    detector.image_size, detector.max_size = 96, 160  # recorded in its processor config
    detector_dir = grounding.save_detector(detector, tmp_path / "detector")
    config = SmallSamConfig(image_size=64, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                            prompt_dim=32, decoder_depth=1, decoder_heads=2, mask_in_chans=4)
    sam_path = tmp_path / "last.pt"
    torch.save({"model": build_small_sam(config).state_dict(), "config": asdict(config)},
               sam_path)
    out = tmp_path / "report.json"
    assert script.main(["--detector", str(detector_dir), "--sam", str(sam_path), "--data",
                        str(split), "--images", "2", "--device", "cpu", "--out", str(out),
                        "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| detection AP50 (COCOeval) |" in printed and '"a dog ."' in printed
    report = json.loads(out.read_text())
    assert report["images"] == 2 and report["resize"] == [96, 160]
    assert report["resize_source"] == "checkpoint" and report["data"] == str(split)
    assert {"detection", "pipeline", "sam_on_truth_boxes", "robustness", "targets",
            "all_targets_met"} <= set(report)
    assert report["all_targets_met"] is False  # random weights
