"""Synthetic shapes data: geometry, colours, backgrounds, determinism and the COCO files."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from grounding.shapes_categories import CATEGORIES, CATEGORY_IDS, COLOURS, SHAPES
from grounding.shapes_data import VAL_SEED_OFFSET, generate_split, main
from grounding.shapes_drawing import BACKGROUNDS, MAX_BACKGROUND_CHROMA, generate_image

JITTER = 25
SEED = 7


@pytest.fixture(scope="module")
def samples():
    """60 images of one seed, as a split would hold them."""
    return [generate_image(np.random.default_rng([SEED, index])) for index in range(60)]


def _chroma(pixels: np.ndarray) -> np.ndarray:
    """Max minus min channel of (..., 3) uint8 pixels, as int."""
    return pixels.max(axis=-1).astype(int) - pixels.min(axis=-1).astype(int)


def _shape_of(name: str) -> str:
    return name.split()[1]


def test_categories():
    assert len(CATEGORIES) == 12 and len(set(CATEGORIES)) == 12
    assert CATEGORIES[:4] == ("red circle", "red square", "red triangle", "green circle")
    assert CATEGORIES[-1] == "yellow triangle"
    assert list(COLOURS) == ["red", "green", "blue", "yellow"]
    assert SHAPES == ("circle", "square", "triangle")
    assert [CATEGORY_IDS[name] for name in CATEGORIES] == list(range(1, 13))


def test_sizes_counts_and_names(samples):
    counts = []
    for sample in samples:
        height, width, channels = sample.image.shape
        assert sample.image.dtype == np.uint8 and channels == 3
        assert 256 <= height <= 640 and 256 <= width <= 640
        count = len(sample.names)
        counts.append(count)
        assert 1 <= count <= 4
        assert sample.masks.shape == (count, height, width) and sample.masks.dtype == bool
        assert sample.boxes.shape == (count, 4)
        assert [CATEGORIES[i - 1] for i in sample.category_ids] == sample.names
    assert set(counts) == {1, 2, 3, 4}
    assert {sample.background for sample in samples} == set(BACKGROUNDS)


def test_boxes_are_tight_around_visible_disjoint_masks(samples):
    for sample in samples:
        assert sample.masks.sum(axis=0).max() <= 1  # a pixel belongs to at most one shape
        for box, mask in zip(sample.boxes, sample.masks, strict=True):
            assert mask.any()
            rows, columns = np.nonzero(mask)
            extent = (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
            np.testing.assert_allclose(box, extent, atol=1)
            # Same convention as pycocotools: [x, y, w, h] with w = last - first + 1.
            x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask, np.uint8)))
            np.testing.assert_allclose(box, (x, y, x + w, y + h))


def test_shape_sizes_follow_the_shorter_side(samples):
    for sample in samples:
        shorter = min(sample.image.shape[:2])
        for name, area in zip(sample.names, sample.full_areas, strict=True):
            # Full area of a shape of size s: circle pi s^2 / 4, square s^2, triangle 0.433 s^2.
            factor = {"circle": np.pi / 4, "square": 1.0, "triangle": np.sqrt(3) / 4}
            size = np.sqrt(area / factor[_shape_of(name)])
            assert 0.12 * shorter - 2 <= size <= 0.38 * shorter + 2


def test_occlusion_is_partial_and_limited(samples):
    occluded = 0
    for sample in samples:
        visible = sample.masks.sum(axis=(1, 2))
        assert (visible >= 0.5 * sample.full_areas).all()
        occluded += int((visible < sample.full_areas).sum())
        assert visible[-1] == sample.full_areas[-1]  # the top shape is whole
    assert occluded >= 3  # partial overlaps do happen


def test_same_colour_shapes_never_touch(samples):
    kernel = np.ones((3, 3), np.uint8)
    for sample in samples:
        colour_classes = [name.split()[0] for name in sample.names]
        for first in range(len(colour_classes)):
            grown = cv2.dilate(sample.masks[first].view(np.uint8), kernel).view(bool)
            for second in range(first + 1, len(colour_classes)):
                if colour_classes[first] == colour_classes[second]:
                    assert not (grown & sample.masks[second]).any()


def test_colours_stay_in_their_class(samples):
    anchors = np.array(list(COLOURS.values()), float)  # (4, 3)
    for sample in samples:
        for name, mask, colour in zip(sample.names, sample.masks, sample.colours, strict=True):
            anchor = np.array(COLOURS[name.split()[0]], float)
            assert (np.abs(colour.astype(float) - anchor) <= JITTER).all()
            mean = sample.image[mask].mean(axis=0)
            # Pixel noise is zero-mean (clipping at 255 pulls yellow's red down a little).
            assert (np.abs(mean - anchor) <= JITTER + 3).all(), (name, mean)
            nearest = np.argmin(np.linalg.norm(anchors - mean, axis=1))
            assert list(COLOURS)[nearest] == name.split()[0]
            assert _chroma(sample.image[mask]).mean() >= 80


def test_backgrounds_hold_no_category_colour(samples):
    """Every background pixel has low chroma; every shape's pixels have high chroma."""
    for sample in samples:
        background = ~sample.masks.any(axis=0)
        chroma = _chroma(sample.image[background])
        assert chroma.max() <= MAX_BACKGROUND_CHROMA + 1, sample.background
        assert MAX_BACKGROUND_CHROMA + 1 < 80
        # Backgrounds are textured, not flat.
        assert sample.image[background].astype(float).std() > 2.0


def test_squares_and_triangles_are_rotated(samples):
    angles = {shape: [] for shape in SHAPES}
    fill_ratios = []
    for sample in samples:
        for index, name in enumerate(sample.names):
            angles[_shape_of(name)].append(float(sample.angles[index]))
            whole = sample.masks[index].sum() == sample.full_areas[index]
            if _shape_of(name) == "square" and whole:
                x0, y0, x1, y1 = sample.boxes[index]
                fill_ratios.append(sample.full_areas[index] / ((x1 - x0) * (y1 - y0)))
    assert all(angle == 0.0 for angle in angles["circle"])
    for shape in ("square", "triangle"):
        assert all(-30.0 <= angle <= 30.0 for angle in angles[shape])
        assert min(angles[shape]) < -10.0 and max(angles[shape]) > 10.0
    # An axis-aligned square fills its box; one turned by 10 degrees fills 74 % of it.
    assert min(fill_ratios) < 0.8 and max(fill_ratios) > 0.9


def test_curriculum_gives_one_shape():
    for index in range(10):
        sample = generate_image(np.random.default_rng([SEED, index]), max_shapes=1)
        assert len(sample.names) == 1


def test_generate_image_is_deterministic():
    first = generate_image(np.random.default_rng([3, 4]))
    second = generate_image(np.random.default_rng([3, 4]))
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.masks, second.masks)
    assert first.names == second.names
    with pytest.raises(ValueError, match="min_shapes"):
        generate_image(np.random.default_rng(0), max_shapes=0)


def _files(folder):
    return {path.relative_to(folder): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_split_files_are_byte_identical_and_extendable(tmp_path):
    generate_split(tmp_path / "a", 5, seed=11, progress=False)
    generate_split(tmp_path / "b", 5, seed=11, progress=False, workers=2)
    generate_split(tmp_path / "c", 3, seed=11, progress=False)
    files = _files(tmp_path / "a")
    assert len(files) == 6
    assert files == _files(tmp_path / "b")
    shorter = _files(tmp_path / "c")
    for index in range(3):
        name = Path("images") / f"{index:06d}.png"
        assert shorter[name] == files[name]
    longer = json.loads((tmp_path / "a" / "annotations.json").read_text())
    short = json.loads((tmp_path / "c" / "annotations.json").read_text())
    assert longer["images"][:3] == short["images"]
    assert longer["annotations"][:len(short["annotations"])] == short["annotations"]


def test_coco_file_matches_the_generator(tmp_path):
    seed, count = 5, 6
    path = generate_split(tmp_path, count, seed, progress=False)
    coco = COCO(str(path))
    assert sorted(coco.getCatIds()) == list(range(1, 13))
    assert [coco.cats[i]["name"] for i in range(1, 13)] == list(CATEGORIES)
    assert all(category["supercategory"] == "shape" for category in coco.cats.values())
    assert sorted(coco.getImgIds()) == list(range(1, count + 1))
    annotation_ids = []
    for index in range(count):
        sample = generate_image(np.random.default_rng([seed, index]))
        entry = coco.imgs[index + 1]
        stored = np.asarray(Image.open(tmp_path / "images" / entry["file_name"]))
        np.testing.assert_array_equal(stored, sample.image)  # PNG is lossless, RGB
        assert (entry["height"], entry["width"]) == sample.image.shape[:2]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=index + 1))
        assert [a["category_id"] for a in annotations] == sample.category_ids.tolist()
        for annotation, box, mask in zip(annotations, sample.boxes, sample.masks, strict=True):
            annotation_ids.append(annotation["id"])
            assert annotation["iscrowd"] == 0
            assert isinstance(annotation["segmentation"]["counts"], str)
            np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), mask)
            assert annotation["area"] == mask.sum()
            x, y, w, h = annotation["bbox"]
            np.testing.assert_allclose((x, y, x + w, y + h), box)
    assert annotation_ids == list(range(1, len(annotation_ids) + 1))


def test_command_line(tmp_path, capsys):
    main([str(tmp_path), "--train", "2", "--val", "2", "--seed", "3", "--max-shapes", "1"])
    output = capsys.readouterr().out
    assert "train: 2 images" in output and "val: 2 images" in output
    assert not (tmp_path / "test").exists()
    train = json.loads((tmp_path / "train" / "annotations.json").read_text())
    val = json.loads((tmp_path / "val" / "annotations.json").read_text())
    assert train["info"]["seed"] == 3 and val["info"]["seed"] == 3 + VAL_SEED_OFFSET
    assert len(train["annotations"]) == 2 and len(val["annotations"]) == 2
    train_image = (tmp_path / "train" / "images" / "000000.png").read_bytes()
    assert train_image != (tmp_path / "val" / "images" / "000000.png").read_bytes()
