"""The small SAM's training: loss terms, data, overfitting, exact resume, NaN stop, fp16 export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import sigmoid_focal_loss

from segmentation import sam_training_loop
from segmentation.sam import BoxSegmenter
from segmentation.sam_data import (
    SamMaskDataset,
    annotation_mask,
    collate,
    evaluate_mask_iou,
    read_coco_folder,
)
from segmentation.sam_losses import dice_loss, focal_loss, mask_iou, sam_loss
from segmentation.sam_training import CONFIG_FILE, main, train
from segmentation.sam_training_loop import (
    BEST_FILE,
    CHECKPOINT_FILE,
    METRICS_FILE,
    TrainingOptions,
    TrainingStopped,
)
from segmentation.small_sam import SmallSamConfig, build_small_sam, export_fp16, load_small_sam

# 64-pixel input, 8-pixel patches: an 8 x 8 embedding and 32 x 32 mask logits.
TINY = SmallSamConfig(image_size=64, patch_size=8, encoder_dim=32, encoder_depth=2,
                      encoder_heads=2, prompt_dim=32, decoder_depth=1, decoder_heads=2,
                      mask_in_chans=8)


def write_shapes(folder, count: int, *, seed: int = 0, size=(60, 80), polygon: bool = True,
                 unreadable: bool = False):
    """A COCO folder of `count` images with a filled rectangle and a filled circle each.

    Masks are compressed RLE (`counts` a string, as json needs), except the first image's circle,
    which is a polygon when `polygon`. With `unreadable`, one more image file is not a PNG.
    """
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    height, width = size
    images, annotations = [], []
    rows, columns = np.mgrid[:height, :width]
    for index in range(count):
        pixels = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
        x0, y0 = rng.integers(2, width // 2 - 4), rng.integers(2, height // 2 - 4)
        x1, y1 = x0 + rng.integers(12, width // 2), y0 + rng.integers(10, height // 2)
        rectangle = (columns >= x0) & (columns < x1) & (rows >= y0) & (rows < y1)
        radius = int(rng.integers(8, 14))
        cx, cy = width - radius - 3, height - radius - 3
        circle = (columns - cx) ** 2 + (rows - cy) ** 2 <= radius ** 2
        pixels[rectangle] = (220, 40, 40)
        pixels[circle] = (40, 200, 60)
        name = f"{index:03d}.png"
        Image.fromarray(pixels).save(folder / "images" / name)
        images.append({"id": index + 1, "file_name": name, "width": width, "height": height})
        for mask in (rectangle & ~circle, circle):
            ys, xs = np.nonzero(mask)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": 1, "iscrowd": 0, "segmentation": segmentation,
                                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                         int(ys.max() - ys.min() + 1)]})
        if polygon and index == 0:
            angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
            points = np.stack([cx + 0.5 + radius * np.cos(angles),
                               cy + 0.5 + radius * np.sin(angles)], 1)
            annotations[-1]["segmentation"] = [points.ravel().round(2).tolist()]
    if unreadable:
        (folder / "images" / "broken.png").write_bytes(b"not a png")
        images.append({"id": count + 1, "file_name": "broken.png", "width": width,
                       "height": height})
        annotations.append({**annotations[0], "id": len(annotations) + 1, "image_id": count + 1})
    # Unusable: a crowd annotation, a two-point polygon, an RLE of another size.
    annotations += [{"id": len(annotations) + 1 + offset, "image_id": 1, "category_id": 1,
                     "iscrowd": int(offset == 0), "bbox": [0, 0, 5, 5], "segmentation": value}
                    for offset, value in enumerate(([], [[0, 0, 5, 5]],
                                                    {"size": [9, 9], "counts": "0"}))]
    (folder / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations,
         "categories": [{"id": 1, "name": "shape"}]}))
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is ~50 x faster than two on a shared, busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"), 4)


def options(train_dir, out_dir, **overrides) -> TrainingOptions:
    settings = dict(epochs=3, batch_size=2, masks_per_image=2, lr=3e-3, weight_decay=0.0,
                    warmup_steps=2, log_every=1, progress=False)
    settings.update(overrides)
    return TrainingOptions(train_dir, out_dir, **settings)


def direct_dice(logits, targets):
    probabilities = logits.sigmoid().flatten(1)
    targets = targets.float().flatten(1)
    return 1 - (2 * (probabilities * targets).sum(1) + 1) / (
        probabilities.sum(1) + targets.sum(1) + 1)


def test_loss_terms_match_direct_computations():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, 16, generator=generator) * 3
    targets = torch.rand(3, 16, 16, generator=generator) > 0.6
    everywhere = torch.ones_like(targets)
    expected_focal = sigmoid_focal_loss(logits, targets.float(), reduction="none").mean((1, 2))
    torch.testing.assert_close(focal_loss(logits, targets, everywhere), expected_focal)
    torch.testing.assert_close(dice_loss(logits, targets, everywhere), direct_dice(logits, targets))
    # Padding is left out: the loss on a cropped valid region equals the loss of the crop.
    valid = torch.zeros_like(targets)
    valid[:, :10, :12] = True
    crop = (slice(None), slice(0, 10), slice(0, 12))
    torch.testing.assert_close(focal_loss(logits, targets, valid),
                               sigmoid_focal_loss(logits[crop], targets[crop].float(),
                                                  reduction="none").mean((1, 2)))
    torch.testing.assert_close(dice_loss(logits, targets, valid),
                               direct_dice(logits[crop], targets[crop]))
    iou_predictions = torch.tensor([0.5, 0.1, 0.9])
    total, terms = sam_loss(logits, iou_predictions, targets, everywhere)
    actual = mask_iou(logits > 0, targets)
    torch.testing.assert_close(terms["iou_mse"], ((iou_predictions - actual) ** 2).mean())
    torch.testing.assert_close(total, 20 * expected_focal.mean() + direct_dice(
        logits, targets).mean() + terms["iou_mse"])


def test_perfect_mask_has_almost_no_loss():
    targets = torch.zeros(2, 32, 32, dtype=torch.bool)
    targets[0, 4:20, 6:30] = True
    targets[1, 10:12, 10:12] = True
    logits = torch.where(targets, 30.0, -30.0)
    everywhere = torch.ones_like(targets)
    assert dice_loss(logits, targets, everywhere).max() < 1e-6
    assert focal_loss(logits, targets, everywhere).max() < 1e-12
    assert mask_iou(logits > 0, targets).tolist() == [1.0, 1.0]
    total, _ = sam_loss(logits, torch.ones(2), targets, everywhere)
    assert total < 1e-6


def test_mask_iou_of_empty_masks_is_one():
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    assert mask_iou(empty, empty).tolist() == [1.0]
    assert mask_iou(empty, full).tolist() == [0.0]


def test_unusable_annotations_are_dropped_with_warnings(shapes, caplog):
    with caplog.at_level("WARNING"):
        entries = read_coco_folder(shapes)
    assert [len(entry.boxes) for entry in entries] == [2] * 4
    for reason in ("crowd", "fewer than 3 points", "is not the image's"):
        assert reason in caplog.text


def test_dataset_matches_sam_predictor_preprocessing(shapes):
    sam = build_small_sam(TINY)
    dataset = SamMaskDataset(shapes, TINY, masks_per_image=8, train=False)
    entries = read_coco_folder(shapes)
    assert len(dataset) == 4 and [len(entry.boxes) for entry in entries] == [2] * 4
    sample = dataset[0]
    image = np.asarray(Image.open(entries[0].path).convert("RGB"))
    predictor = BoxSegmenter(sam).predictor
    resized = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None]
    torch.testing.assert_close(sample.pixels, sam.preprocess(resized.float())[0])
    assert sample.input_size == (48, 64) and sample.masks.shape == (2, 64, 64)
    assert not sample.masks[:, 48:].any()
    expected = predictor.transform.apply_boxes(entries[0].boxes, (60, 80))
    torch.testing.assert_close(sample.boxes, torch.as_tensor(expected, dtype=torch.float32))
    # The first image's circle is a polygon: it rasterises onto the drawn circle.
    circle = torch.from_numpy((image == (40, 200, 60)).all(-1))[None]
    polygon = torch.from_numpy(annotation_mask(entries[0].segmentations[1], 60, 80))[None]
    assert mask_iou(polygon, circle).item() > 0.9
    rectangle = annotation_mask(entries[0].segmentations[0], 60, 80)  # compressed RLE
    assert (image[rectangle] == (220, 40, 40)).all()
    batch = collate([dataset[0], None, dataset[1]])
    assert batch.pixels.shape == (2, 3, 64, 64) and batch.valid_mask().shape == (4, 64, 64)
    assert collate([None]) is None


def test_training_boxes_are_jittered_within_bounds(shapes):
    dataset = SamMaskDataset(shapes, SmallSamConfig(image_size=1024), masks_per_image=2)
    plain = SamMaskDataset(shapes, SmallSamConfig(image_size=1024), train=False)[0].boxes
    shifts = []
    for epoch in range(20):
        dataset.set_epoch(epoch)
        shifts.append((dataset[0].boxes - plain).abs())  # both sets: all boxes, file order
    shifts = torch.stack(shifts)
    assert 0 < shifts.max() <= 20.0 + 1e-4
    dataset.set_epoch(3)
    torch.testing.assert_close(dataset[0].boxes, dataset[0].boxes)  # seeded by (seed, epoch, i)


def test_unreadable_image_is_skipped_with_a_warning(tmp_path, caplog):
    folder = write_shapes(tmp_path / "data", 2, unreadable=True)
    dataset = SamMaskDataset(folder, TINY)
    assert len(dataset) == 3
    with caplog.at_level("WARNING"):
        assert dataset[2] is None
    assert "broken.png" in caplog.text


def test_tiny_sam_overfits_two_images(tmp_path):
    """Two 60 x 80 images, two boxes each, batch 2, lr 3e-3: the mean mask IoU from the boxes
    (through BoxSegmenter, at the images' resolution) goes from 0.07 at initialisation to 0.93
    after 150 steps (seeds 0 and 1: 0.93, 0.92; 3.5-5.5 s on one CPU thread; 120 steps: 0.90)."""
    folder = write_shapes(tmp_path / "data", 2)
    torch.manual_seed(0)
    before = evaluate_mask_iou(build_small_sam(TINY), folder)["mean_iou"]
    summary = train(options(folder, tmp_path / "run", epochs=150, warmup_steps=5,
                            checkpoint_every=1000), TINY)
    after = evaluate_mask_iou(load_small_sam(tmp_path / "run" / BEST_FILE), folder)
    assert summary["steps"] == 150 and after["masks"] == 4
    assert before < 0.5 and after["mean_iou"] > 0.8, (before, after)


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_equals_an_uninterrupted_run(shapes, tmp_path):
    whole = train(options(shapes, tmp_path / "whole", val_dir=shapes), TINY)
    first = train(options(shapes, tmp_path / "parts", val_dir=shapes, max_steps=3), TINY)
    assert first["steps"] == 3  # mid-epoch: 2 batches per epoch
    with open(tmp_path / "parts" / METRICS_FILE, "a") as handle:  # a crashed run's extra line
        handle.write(json.dumps({"type": "train", "step": 4, "loss": -1.0}) + "\n")
    second = train(options(shapes, tmp_path / "parts", val_dir=shapes), resume=True)
    assert whole["steps"] == second["steps"] == 6
    expected = torch.load(tmp_path / "whole" / CHECKPOINT_FILE, weights_only=True)
    resumed = torch.load(tmp_path / "parts" / CHECKPOINT_FILE, weights_only=True)
    for key, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    def records(run):  # the interrupted run has one more evaluation, at its checkpoint
        return [{k: v for k, v in record.items() if k != "seconds"}
                for record in read_metrics(tmp_path / run / METRICS_FILE)
                if record["type"] == "train" or record["step"] != 3]

    assert records("whole") == records("parts") and len(records("whole")) == 6 + 3
    assert expected["progress"]["best_iou"] == resumed["progress"]["best_iou"] is not None
    assert json.loads((tmp_path / "parts" / CONFIG_FILE).read_text())["image_size"] == 64
    with pytest.raises(FileExistsError):
        train(options(shapes, tmp_path / "whole"), TINY)


def test_nan_loss_stops_naming_the_step_and_checkpoint(shapes, tmp_path, monkeypatch, capsys):
    real_loss = sam_training_loop.sam_loss
    calls = []

    def loss_that_breaks(*args, **kwargs):
        total, terms = real_loss(*args, **kwargs)
        calls.append(1)
        return (total * math.nan if len(calls) == 4 else total), terms

    monkeypatch.setattr(sam_training_loop, "sam_loss", loss_that_breaks)
    with pytest.raises(TrainingStopped, match=r"step 4 \(epoch 2\): the loss is nan .*"
                       r"last good checkpoint is .*last\.pt \(step 2\)"):
        train(options(shapes, tmp_path / "run"), TINY)
    calls.clear()
    out = tmp_path / "cli"
    argv = ["--train", str(shapes), "--out", str(out), "--epochs", "3", "--batch-size", "2",
            "--image-size", "64", "--patch-size", "8", "--encoder-dim", "32", "--encoder-depth",
            "1", "--prompt-dim", "32", "--decoder-depth", "1", "--no-progress"]
    assert main(argv) == 1
    assert "training stopped at step 4" in capsys.readouterr().err
    assert main(argv) == 2  # last.pt exists and no --resume


def test_fp16_export_loads_strictly_and_segments_with_box_segmenter(shapes, tmp_path):
    summary = train(options(shapes, tmp_path / "run", epochs=1), TINY)
    path = export_fp16(summary["last"], tmp_path / "sam_fp16.safetensors")
    from safetensors.torch import load_file

    assert {tensor.dtype for tensor in load_file(path).values()} == {torch.float16}
    sam = load_small_sam(path, tmp_path / "run" / CONFIG_FILE)
    assert load_small_sam(path).image_encoder.img_size == 64  # config from the metadata
    reference = load_small_sam(tmp_path / "run" / BEST_FILE)
    segmenter = BoxSegmenter(sam)
    image = np.asarray(Image.open(read_coco_folder(shapes)[0].path).convert("RGB"))
    segmenter.set_image(image)
    masks, scores = segmenter.segment(np.array([[5, 5, 40, 30], [50, 30, 79, 59.0]]))
    assert masks.shape == (2, 60, 80) and masks.dtype == bool and scores.shape == (2,)
    reference_segmenter = BoxSegmenter(reference)
    reference_segmenter.set_image(image)
    reference_masks, _ = reference_segmenter.segment(np.array([[5, 5, 40, 30],
                                                               [50, 30, 79, 59.0]]))
    assert (masks != reference_masks).mean() < 0.01  # fp16 rounding flips few pixels
    state = load_file(path)
    state.pop(next(iter(state)))
    from safetensors.torch import save_file

    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="missing keys"):
        load_small_sam(tmp_path / "broken.safetensors", tmp_path / "run" / CONFIG_FILE)


def test_command_line_writes_the_run_files_and_resumes(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--train", str(shapes), "--val", str(shapes), "--out", str(out), "--batch-size", "2",
            "--image-size", "64", "--patch-size", "8", "--encoder-dim", "32", "--encoder-depth",
            "1", "--prompt-dim", "32", "--decoder-depth", "1", "--no-progress", "--threads", "1",
            "--log-every", "1"]
    assert main([*argv, "--epochs", "1", "--export-fp16", str(tmp_path / "fp16.safetensors")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["best_val_mean_iou"] is not None
    for name in (METRICS_FILE, CHECKPOINT_FILE, BEST_FILE, CONFIG_FILE):
        assert (out / name).is_file(), name
    assert (tmp_path / "fp16.safetensors").stat().st_size < (out / BEST_FILE).stat().st_size
    assert main([*argv, "--epochs", "2", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4
    assert [record["step"] for record in read_metrics(out / METRICS_FILE)] == [1, 2, 2, 3, 4, 4]
