"""Exports: COCO RLE round trips, valid COCO JSON, the API dict, the ZIP of masks and cut-outs."""

import contextlib
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segmentation.export import rle_decode, rle_encode, to_coco, to_json_dict, to_zip
from segmentation.results import SegmentedDetections

HEIGHT, WIDTH = 48, 64


def random_masks(count, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, HEIGHT, WIDTH), bool)
    for mask in masks:
        y0, x0 = rng.integers(0, 30, 2)
        mask[y0:y0 + rng.integers(3, 18), x0:x0 + rng.integers(3, 30)] = True
        mask[rng.random((HEIGHT, WIDTH)) < 0.05] ^= True  # holes and specks: several runs
    return masks


@pytest.fixture
def result():
    masks = random_masks(4)
    masks[3] = False  # a detection whose mask came out empty
    boxes = np.array([[1.5, 2.0, 30.25, 20.0], [10, 10, 60, 40], [0, 0, 64, 48], [5, 5, 9, 9]],
                     np.float32)
    return SegmentedDetections(
        boxes=boxes, scores=np.array([0.9, 0.8, 0.5, 0.4], np.float32),
        phrases=["a cat", "remote", "a cat", "a dog"], phrase_ids=np.array([0, 1, 0, 2]),
        prompt_phrases=["a cat", "a remote control", "a dog"], masks=masks,
        mask_scores=np.array([0.95, 0.7, 0.6, 0.1], np.float32))


@pytest.fixture
def image():
    return np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def test_rle_round_trips_through_json_and_pycocotools():
    masks = list(random_masks(5)) + [np.zeros((HEIGHT, WIDTH), bool),
                                     np.ones((HEIGHT, WIDTH), bool)]
    masks.append(random_masks(1, seed=3)[0][:, ::-1])  # a non-contiguous view
    for mask in masks:
        rle = rle_encode(mask)
        assert rle["size"] == [HEIGHT, WIDTH] and isinstance(rle["counts"], str)
        restored = json.loads(json.dumps(rle))
        np.testing.assert_array_equal(rle_decode(restored), mask)
        coco_rle = {"size": restored["size"], "counts": restored["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(coco_rle).astype(bool), mask)
        assert mask_utils.area(coco_rle) == mask.sum()


def test_uncompressed_rle_decodes_too():
    mask = random_masks(1)[0]
    runs, previous, count = [], False, 0
    for value in mask.flatten(order="F"):  # COCO runs: column-major, starting with zeros
        if value != previous:
            runs.append(count)
            previous, count = value, 0
        count += 1
    runs.append(count)
    np.testing.assert_array_equal(rle_decode({"size": [HEIGHT, WIDTH], "counts": runs}), mask)


def test_coco_fields(result):
    coco = to_coco(result, file_name="cats.jpg", width=WIDTH, height=HEIGHT, image_id=7)
    json.dumps(coco)
    assert coco["images"] == [{"id": 7, "file_name": "cats.jpg", "width": WIDTH,
                               "height": HEIGHT}]
    assert coco["categories"] == [{"id": 1, "name": "a cat", "supercategory": "object"},
                                  {"id": 2, "name": "a remote control", "supercategory": "object"},
                                  {"id": 3, "name": "a dog", "supercategory": "object"}]
    annotations = coco["annotations"]
    assert [a["id"] for a in annotations] == [1, 2, 3, 4]
    assert [a["category_id"] for a in annotations] == [1, 2, 1, 3]
    assert annotations[0]["bbox"] == [1.5, 2.0, 28.75, 18.0]  # x, y, width, height
    for annotation, mask, score in zip(annotations, result.masks, result.scores, strict=True):
        assert annotation["image_id"] == 7 and annotation["iscrowd"] == 0
        assert annotation["area"] == int(mask.sum())
        assert annotation["score"] == pytest.approx(float(score))
        np.testing.assert_array_equal(rle_decode(annotation["segmentation"]), mask)
    assert annotations[1]["phrase"] == "remote" and annotations[3]["area"] == 0


def test_coco_json_loads_and_evaluates_in_pycocotools(result):
    coco_dict = json.loads(json.dumps(to_coco(result, file_name="a.png", width=WIDTH,
                                              height=HEIGHT)))
    coco_dict["annotations"] = coco_dict["annotations"][:3]  # "a dog" has an empty mask
    ground_truth = COCO()
    ground_truth.dataset = coco_dict
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        for annotation, mask in zip(coco_dict["annotations"], result.masks[:3], strict=True):
            np.testing.assert_array_equal(ground_truth.annToMask(annotation).astype(bool), mask)
        detections = ground_truth.loadRes(coco_dict["annotations"])
        evaluation = COCOeval(ground_truth, detections, "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # the masks match themselves exactly


def test_coco_takes_precomputed_rles(result):
    rles = [rle_encode(mask) for mask in result.masks]
    expected = to_coco(result, file_name="a.png", width=WIDTH, height=HEIGHT)
    assert to_coco(result, file_name="a.png", width=WIDTH, height=HEIGHT, rles=rles) == expected
    with pytest.raises(ValueError, match="RLEs for"):
        to_coco(result, file_name="a.png", width=WIDTH, height=HEIGHT, rles=rles[:-1])


def test_coco_refuses_a_wrong_image_size(result):
    with pytest.raises(ValueError, match="64 x 48"):
        to_coco(result, file_name="a.png", width=48, height=64)


def test_json_dict_for_the_api(result):
    data = json.loads(json.dumps(to_json_dict(result)))
    assert data["width"] == WIDTH and data["height"] == HEIGHT
    assert data["prompt_phrases"] == result.prompt_phrases
    assert data["phrases"] == result.phrases and data["phrase_ids"] == [0, 1, 0, 2]
    np.testing.assert_allclose(data["boxes"], result.boxes, atol=0.01)
    np.testing.assert_allclose(data["scores"], result.scores, atol=1e-4)
    np.testing.assert_allclose(data["mask_scores"], result.mask_scores, atol=1e-4)
    for rle, mask in zip(data["masks"], result.masks, strict=True):
        np.testing.assert_array_equal(rle_decode(rle), mask)
    assert data["omitted"] == 0
    result.omitted = 7  # seven more were above the threshold, past a cap
    assert to_json_dict(result)["omitted"] == 7


def read_png(archive, name):
    return np.asarray(Image.open(io.BytesIO(archive.read(name))))


def test_zip_holds_coco_masks_and_exact_cutouts(result, image):
    archive = zipfile.ZipFile(io.BytesIO(to_zip(image, result, file_name="cats.png")))
    names = sorted(archive.namelist())
    assert names == ["annotations.json", "cutouts/000_a-cat.png", "cutouts/001_remote.png",
                     "cutouts/002_a-cat.png", "masks/000_a-cat.png", "masks/001_remote.png",
                     "masks/002_a-cat.png", "masks/003_a-dog.png"]  # no cut-out of an empty mask
    coco = json.loads(archive.read("annotations.json"))
    assert coco == to_coco(result, file_name="cats.png", width=WIDTH, height=HEIGHT)
    for index, mask in enumerate(result.masks):
        stem = ["000_a-cat", "001_remote", "002_a-cat", "003_a-dog"][index]
        saved = read_png(archive, f"masks/{stem}.png")
        assert saved.dtype == np.uint8 and set(np.unique(saved)) <= {0, 255}
        np.testing.assert_array_equal(saved == 255, mask)
        if not mask.any():
            continue
        cutout = read_png(archive, f"cutouts/{stem}.png")
        x0, y0, x1, y1 = result.boxes[index]
        in_box = np.zeros_like(mask)
        in_box[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
        rows = np.flatnonzero((mask & in_box).any(1))
        columns = np.flatnonzero((mask & in_box).any(0))
        window = np.s_[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
        assert cutout.shape == (*mask[window].shape, 4)  # cropped to the mask within the box
        np.testing.assert_array_equal(cutout[..., 3] == 255, mask[window])
        np.testing.assert_array_equal(cutout[..., 3][~mask[window]], 0)
        np.testing.assert_array_equal(cutout[..., :3][mask[window]], image[window][mask[window]])
        np.testing.assert_array_equal(cutout[..., :3][~mask[window]], 0)


def test_zip_of_nothing_found(image):
    empty = SegmentedDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [],
                                np.zeros(0, np.int64), ["a cat"],
                                np.zeros((0, HEIGHT, WIDTH), bool), np.zeros(0, np.float32))
    archive = zipfile.ZipFile(io.BytesIO(to_zip(image, empty)))
    assert archive.namelist() == ["annotations.json"]
    coco = json.loads(archive.read("annotations.json"))
    assert coco["annotations"] == [] and coco["categories"][0]["name"] == "a cat"
    assert to_json_dict(empty)["masks"] == []


def test_zip_is_streamed_to_disk_one_member_at_a_time(tmp_path):
    """The archive never sits in memory: the peak of Python-tracked allocations while writing
    stays far below the archive's size."""
    import tracemalloc

    from segmentation.export import write_zip

    rng = np.random.default_rng(2)
    size, count = 400, 24
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # noise: incompressible
    masks = np.zeros((count, size, size), bool)
    for index, mask in enumerate(masks):  # large blocks of noisy pixels: big cut-outs
        mask[index:size - index, 2 * index:] = True
    big = SegmentedDetections(
        boxes=np.tile(np.array([[0, 0, size, size]], np.float32), (count, 1)),
        scores=np.linspace(0.9, 0.5, count, dtype=np.float32), phrases=["noise"] * count,
        phrase_ids=np.zeros(count, np.int64), prompt_phrases=["noise"], masks=masks,
        mask_scores=np.full(count, 0.5, np.float32))
    path = tmp_path / "big.zip"
    tracemalloc.start()
    try:
        write_zip(path, pixels, big, file_name="noise.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    archive_size = path.stat().st_size
    assert archive_size > 10_000_000
    assert peak < archive_size / 5, f"peak {peak} bytes for a {archive_size}-byte archive"
    with zipfile.ZipFile(path) as archive:
        assert len(archive.namelist()) == 1 + 2 * count
        assert archive.testzip() is None


def test_zip_stops_with_a_message_past_its_size_bound(tmp_path, image):
    from segmentation.export import write_zip

    count = 20
    masks = np.ones((count, HEIGHT, WIDTH), bool)
    many = SegmentedDetections(
        boxes=np.tile(np.array([[0, 0, WIDTH, HEIGHT]], np.float32), (count, 1)),
        scores=np.linspace(0.9, 0.5, count, dtype=np.float32), phrases=["x"] * count,
        phrase_ids=np.zeros(count, np.int64), prompt_phrases=["x"], masks=masks,
        mask_scores=np.full(count, 0.5, np.float32))
    write_zip(tmp_path / "whole.zip", image, many)
    whole = (tmp_path / "whole.zip").stat().st_size
    with pytest.raises(ValueError, match="raise the box threshold"):
        write_zip(tmp_path / "bounded.zip", image, many, max_bytes=whole // 2)


def test_true_window_is_the_smallest_window_of_the_true_pixels():
    from segmentation.masks import true_window

    mask = np.zeros((6, 8), bool)
    assert true_window(mask) is None
    mask[1, 2] = mask[4, 6] = True
    rows, columns = true_window(mask)
    assert (rows, columns) == (slice(1, 5), slice(2, 7))
    assert mask[rows, columns].sum() == mask.sum()
