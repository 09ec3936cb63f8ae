"""COCO evaluation: AP computation, (query, category) scoring, batched inference and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from grounding.evaluate import main, parse_args
from grounding.evaluate_inference import category_detections, infer_batch, predict_dataset
from grounding.evaluate_metrics import SUMMARY_KEYS, evaluate_predictions, read_annotations
from grounding.predictor import RawPrediction
from grounding.transforms import preprocess
from tests.coco_files import CATEGORIES, IMAGES, write_coco
from tests.helpers import (
    random_transformers_model,
    save_transformers_directory,
    tiny_transformers_config,
)

SPECIAL_IDS = (101, 102, 1012, 1029)


def ground_truth_as_results(coco: dict, shift: float = 0.0) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], *a["bbox"][2:]]}
            for a in coco["annotations"]]


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model = random_transformers_model(tiny_transformers_config())
    return save_transformers_directory(model, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def detector(tiny_checkpoint):
    import grounding

    return grounding.load_detector(tiny_checkpoint, device="cpu")


def test_ground_truth_scores_ap_one_and_shifted_boxes_less(coco):
    annotations = read_annotations(coco[1])
    perfect = evaluate_predictions(coco[1], ground_truth_as_results(annotations))
    for key in ("AP", "AP50", "AP75"):
        assert perfect[key] == pytest.approx(1.0)
    per_category = {entry["category_id"]: entry for entry in perfect["per_category"]}
    assert set(per_category) == set(CATEGORIES)
    present = {cid for _, _, boxes in IMAGES.values() for cid, *_ in boxes}
    for cid, entry in per_category.items():
        assert entry["name"] == CATEGORIES[cid]
        assert entry["AP"] == (pytest.approx(1.0) if cid in present else None)
    assert perfect["images"] == len(IMAGES) and perfect["detections"] == 7

    shifted = evaluate_predictions(coco[1], ground_truth_as_results(annotations, shift=0.2))
    assert shifted["AP50"] == pytest.approx(1.0)  # IoU 0.67 still counts at 0.5
    assert 0.0 < shifted["AP"] < 0.5 and shifted["AP75"] == pytest.approx(0.0)


def test_empty_results_give_zero_ap(coco):
    metrics = evaluate_predictions(coco[1], [])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["detections"] == 0
    assert all(entry["AP"] in (0.0, None) for entry in metrics["per_category"])
    assert set(SUMMARY_KEYS) <= set(metrics)


def test_evaluation_restricted_to_the_images_that_were_run(coco):
    annotations = read_annotations(coco[1])
    only_first = [r for r in ground_truth_as_results(annotations) if r["image_id"] == 1]
    assert evaluate_predictions(coco[1], only_first)["AP"] < 0.5
    metrics = evaluate_predictions(coco[1], only_first, image_ids=[1])
    assert metrics["AP"] == pytest.approx(1.0) and metrics["images"] == 1
    assert {e["category_id"] for e in metrics["per_category"] if e["AP"] is not None} == {1, 2}


def test_ground_truth_without_area_or_iscrowd_is_accepted(coco):
    annotations = read_annotations(coco[1])
    for annotation in annotations["annotations"]:
        del annotation["area"], annotation["iscrowd"]
    assert evaluate_predictions(annotations, ground_truth_as_results(annotations))["AP"] == \
        pytest.approx(1.0)


def test_pair_scores_are_mean_token_probabilities_across_chunks():
    # Two chunks: "[CLS] a b . c . [SEP]" (categories 7, 9) and "[CLS] d . [SEP]" (category 4).
    first_ids = [101, 2000, 2001, 1012, 2002, 1012, 102]
    second_ids = [101, 2003, 1012, 102]
    first_logits = torch.full((2, 10), float("-inf"))
    first_logits[:, :7] = -10.0
    first_logits[0, 1:3] = torch.tensor([2.0, 0.0])  # query 0 on category 7
    second_logits = torch.full((2, 10), float("-inf"))
    second_logits[:, :4] = -10.0
    second_logits[1, 1] = 3.0  # query 1 of the second pass on category 4
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]])
    raw = RawPrediction(chunks=[(first_ids, first_logits, boxes),
                                (second_ids, second_logits, boxes.flip(0))],
                        image_size=(200, 100))
    results = category_detections(raw, [7, 9, 4], SPECIAL_IDS, image_id=5, max_detections=2)
    assert [r["category_id"] for r in results] == [4, 7]
    assert results[0]["score"] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), 1e-4)
    mean = (torch.sigmoid(torch.tensor(2.0)) + 0.5) / 2
    assert results[1]["score"] == pytest.approx(mean.item(), 1e-4)
    assert results[0]["bbox"] == pytest.approx([100 - 50, 50 - 25, 100, 50])
    assert results[1]["bbox"] == pytest.approx([50, 25, 100, 50])
    assert all(r["image_id"] == 5 for r in results)
    everything = category_detections(raw, [7, 9, 4], SPECIAL_IDS, image_id=5, max_detections=99)
    assert len(everything) == 2 * 2 + 2 * 1  # every (query, phrase) pair
    with pytest.raises(ValueError, match="phrases"):
        category_detections(raw, [7, 9], SPECIAL_IDS, image_id=5)


def test_batched_inference_equals_single_images_and_the_model_forward(coco, detector):
    from grounding.dataset import load_image

    caption = "red square . blue circle ."
    images = [load_image(coco[0] / "0001.png"), load_image(coco[0] / "0003.png")]
    pixels = [preprocess(image, 96, 160) for image in images]
    batched = infer_batch(detector, pixels, [image.size for image in images], caption)
    for image, pixel, raw in zip(images, pixels, batched, strict=True):
        (single,) = infer_batch(detector, [pixel], [image.size], caption)
        assert raw.image_size == image.size
        torch.testing.assert_close(raw.chunks[0][1], single.chunks[0][1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(raw.chunks[0][2], single.chunks[0][2], atol=1e-4, rtol=1e-4)
    reference = detector.detect(pixels[0][None], caption)  # the plain model forward
    assert batched[0].chunks[0][0] == detector.tokenizer(caption)["input_ids"]
    torch.testing.assert_close(batched[0].chunks[0][1], reference.logits[0], atol=1e-4, rtol=1e-4)


def test_long_prompts_are_split_and_every_category_is_scored(coco, detector, monkeypatch):
    monkeypatch.setattr(detector, "max_text_len", 12)  # 8 categories need about 22 tokens
    predictions = predict_dataset(detector, coco[0], coco[1], max_images=1, size=64,
                                  max_size=96, max_detections=10_000)
    assert predictions.image_ids == [1]
    assert {r["category_id"] for r in predictions.results} == set(CATEGORIES)
    assert len(predictions.results) == 30 * len(CATEGORIES)  # every (query, category) pair


def test_cli_runs_end_to_end_and_writes_the_metrics(tmp_path, tiny_checkpoint, capsys):
    images, annotations = write_coco(tmp_path / "data", corrupt_image=True)
    out, detections = tmp_path / "metrics.json", tmp_path / "detections.json"
    code = main(["--checkpoint", str(tiny_checkpoint), "--images", str(images),
                 "--annotations", str(annotations), "--out", str(out),
                 "--detections", str(detections), "--device", "cpu", "--batch-size", "2",
                 "--workers", "0", "--size", "96", "--max-size", "128",
                 "--max-detections", "20"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["image_ids"] == sorted(IMAGES) and report["skipped_image_ids"] == [99]
    metrics = report["metrics"]
    for key in SUMMARY_KEYS:
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0
    assert metrics["images"] == len(IMAGES)
    assert {e["category_id"] for e in metrics["per_category"]} == set(CATEGORIES)
    results = json.loads(detections.read_text())
    assert metrics["detections"] == len(results) == 20 * len(IMAGES)
    assert {r["image_id"] for r in results} == set(IMAGES)
    for result in results:
        x, y, w, h = result["bbox"]
        width, height, _ = IMAGES[result["image_id"]]
        assert 0 <= x <= x + w <= width + 0.01 and 0 <= y <= y + h <= height + 0.01
        assert result["category_id"] in CATEGORIES
    assert report["prompt"].startswith("red square . blue circle .")
    printed = capsys.readouterr().out
    assert "AP50" in printed and "hair drier" in printed


def test_cli_config_help_lists_every_detector_preset(capsys, monkeypatch):
    from grounding.config import DETECTOR_PRESETS

    # A preset added to the one table shows up in the help without touching the CLI.
    monkeypatch.setitem(DETECTOR_PRESETS, "swinx_new", DETECTOR_PRESETS["swint_ogc"])
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "architecture of a .pth: swint_ogc or swinb_cogcoor or swinx_new" in help_text
