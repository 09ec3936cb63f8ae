"""Synthetic shapes: a small grounding and segmentation data set with exact boxes and masks.

Trains, evaluates and tests the small from-scratch Grounding DINO and SAM. Each image shows 1-4
filled circles, squares and triangles in red, green, blue and yellow (12 categories, "red circle"
... "yellow triangle") on grey multi-scale noise, a low-saturation colour gradient, or grey clutter
(lines, blobs, squares and polygons: shape-like distractors, but never coloured), with mild grey
pixel noise over everything.

Geometry: image sides are uniform in [min_side, max_side], independently. A shape's size (circle
diameter, square side, equilateral triangle side) is uniform in `size_range` times the shorter
side; squares and triangles turn uniformly within +-`max_rotation` degrees; every shape lies wholly
inside the image. Shapes are drawn in order, later ones on top. A candidate is re-sampled (up to
`_PLACEMENT_TRIES` times, else the image keeps fewer shapes) when it would leave an earlier shape
less than `min_visible` of its area, or would overlap or touch an earlier shape of the same colour
(the two would merge into one blob with no edge between them).

Colours: the class anchor (`COLOURS`) plus a uniform per-channel jitter of +-`colour_jitter`. With
the default 25 the hue ranges stay disjoint (red within about +-17 degrees, yellow 42-68, green
105-150, blue 213-248) and a shape's chroma (max - min channel) stays >= 90, while no background
pixel's exceeds `MAX_BACKGROUND_CHROMA` (45), so no background looks like a category.

Masks are exact: shapes are drawn hard-edged (no antialiasing) into masks that are then
composited, so a shape's pixels are exactly its mask. Boxes are tight around the *visible* pixels,
in pixel-edge coordinates: x1 = last column + 1, as pycocotools' `toBbox`.

Reproducibility: image i of a split comes from `np.random.default_rng([seed, i])`, so it depends
only on (seed, i): a larger count extends a smaller one image for image, and the same (count, seed)
writes byte-identical files (with the pinned OpenCV, whose zlib encodes the PNGs). The command line
derives the validation and test seeds from `--seed` (`VAL_SEED_OFFSET`, `TEST_SEED_OFFSET`).
Curriculum: `max_shapes=1` (`--max-shapes 1`) gives one shape per image, for an easy start.

    python -m grounding.shapes_data data/shapes --train 20000 --val 200 --test 500 --seed 0 \
        --workers 8
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

# RGB anchors, in category order. Jitter of +-25 keeps each class's hue range disjoint from the
# others' (see the module docstring).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Category id = index + 1: "red circle" is 1, "yellow triangle" is 12.
CATEGORIES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
CATEGORY_IDS: dict[str, int] = {name: index + 1 for index, name in enumerate(CATEGORIES)}
BACKGROUNDS: tuple[str, ...] = ("noise", "gradient", "clutter")

# Largest background chroma (max - min channel, 0-255; pixel noise is grey, rounding may add 1);
# shapes have >= 90.
MAX_BACKGROUND_CHROMA = 45
VAL_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_003
_PLACEMENT_TRIES = 30
# Same-colour shapes keep at least this many pixels between them.
_SAME_COLOUR_GAP = 3
# Fixed-point bits for sub-pixel drawing with OpenCV (coordinates times 16).
_SHIFT = 4
# Fast zlib level with one fixed filter: about 6 ms for a 450 x 450 image, against 10 ms with
# libpng's adaptive filter choice, for the same size (pixel noise makes PNGs ~1 byte a pixel).
_PNG_OPTIONS = (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_AVG)


def coco_categories() -> list[dict]:
    """The COCO "categories" list: id 1..12, name, supercategory "shape"."""
    return [
        {"id": CATEGORY_IDS[name], "name": name, "supercategory": "shape"} for name in CATEGORIES
    ]


@dataclass
class ShapesImage:
    """One generated image and its shapes, in drawing order (later shapes on top).

    Attributes:
        image: (H, W, 3) uint8 RGB.
        category_ids: (n,) int64, ids into `CATEGORIES` (1-based).
        names: the n category names.
        boxes: (n, 4) float32 x0, y0, x1, y1 in pixels, tight around the visible pixels
            (x1 = last column + 1).
        masks: (n, H, W) bool, True = visible pixel of that shape; pairwise disjoint.
        full_areas: (n,) int64 pixels of each shape before later shapes covered part of it.
        colours: (n, 3) uint8, each shape's drawn RGB colour before pixel noise.
        angles: (n,) float32 rotation in degrees (0 for circles).
        background: one of `BACKGROUNDS`.
    """

    image: np.ndarray
    category_ids: np.ndarray
    names: list[str]
    boxes: np.ndarray
    masks: np.ndarray
    full_areas: np.ndarray
    colours: np.ndarray
    angles: np.ndarray
    background: str


def _low_saturation_colour(rng: np.random.Generator, max_chroma: float) -> np.ndarray:
    """(3,) float32 RGB of random hue whose chroma (max - min channel) is <= `max_chroma`."""
    value = rng.uniform(50.0, 225.0)
    chroma = rng.uniform(0.0, max_chroma)
    direction = rng.uniform(0.0, 1.0, 3)
    direction = (direction - direction.min()) / max(float(np.ptp(direction)), 1e-6)
    return (value - chroma * direction).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) float32 zero-mean noise summed over a few random scales, standard deviation ~1."""
    field = np.zeros((height, width), np.float32)
    for cell in rng.choice([2, 4, 8, 16, 32, 64], size=3, replace=False):
        grid = rng.standard_normal((height // cell + 2, width // cell + 2), dtype=np.float32)
        upsampled = cv2.resize(
            grid,
            ((width // cell + 2) * cell, (height // cell + 2) * cell),
            interpolation=cv2.INTER_LINEAR,
        )
        field += upsampled[:height, :width]
    return field / math.sqrt(3.0)


def _background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 background with chroma <= `MAX_BACKGROUND_CHROMA`."""
    if kind == "gradient":
        start = _low_saturation_colour(rng, MAX_BACKGROUND_CHROMA)
        end = _low_saturation_colour(rng, MAX_BACKGROUND_CHROMA)
        angle = rng.uniform(0.0, 2 * math.pi)
        xs = np.arange(width, dtype=np.float32)[None, :]  # (1, W)
        ys = np.arange(height, dtype=np.float32)[:, None]  # (H, 1)
        if rng.random() < 0.3:  # radial, around a random point
            centre = rng.uniform(0.0, 1.0, 2) * (width, height)
            distance = np.hypot(xs - centre[0], ys - centre[1])
        else:
            distance = xs * math.cos(angle) + ys * math.sin(angle)
        weight = (distance - distance.min()) / max(float(np.ptp(distance)), 1.0)
        # (H, W, 1) weights blend two (3,) colours; a convex blend keeps the chroma bound.
        return start + weight[..., None] * (end - start)
    if kind == "noise":
        tint = _low_saturation_colour(rng, MAX_BACKGROUND_CHROMA * 0.5)
        amplitude = rng.uniform(10.0, 40.0)
        grey = _smooth_noise(rng, height, width) * amplitude
        # Grey noise around a faint tint: chroma stays that of the tint.
        return np.clip(tint + grey[..., None], 0.0, 255.0)
    canvas = np.full((height, width), rng.integers(40, 216), np.uint8)
    _draw_clutter(rng, canvas)
    return np.repeat(canvas[..., None].astype(np.float32), 3, axis=2)


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Draws 5-30 grey lines, blobs, rectangles and polygons on the (H, W) uint8 `canvas`."""
    height, width = canvas.shape
    scale = min(height, width)
    for _ in range(int(rng.integers(5, 31))):
        grey = int(rng.integers(15, 241))
        kind = rng.integers(4)
        centre = rng.uniform(0.0, 1.0, 2) * (width, height)
        size = rng.uniform(0.03, 0.3) * scale
        if kind == 0:
            end = centre + rng.normal(0.0, 0.4 * scale, 2)
            cv2.line(
                canvas,
                tuple(int(v) for v in centre),
                tuple(int(v) for v in end),
                grey,
                int(rng.integers(1, 6)),
                cv2.LINE_AA,
            )
        elif kind == 1:
            axes = (int(size / 2), int(size / 2 * rng.uniform(0.4, 1.0)))
            cv2.ellipse(
                canvas,
                tuple(int(v) for v in centre),
                axes,
                rng.uniform(0.0, 180.0),
                0,
                360,
                grey,
                -1 if rng.random() < 0.7 else 2,
                cv2.LINE_AA,
            )
        else:
            if kind == 2:  # a square, at any angle
                angles = rng.uniform(0.0, math.pi / 2) + np.arange(4) * math.pi / 2
            else:  # a polygon of 3-6 corners
                angles = np.sort(rng.uniform(0.0, 2 * math.pi, int(rng.integers(3, 7))))
            points = centre + size / 2 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
            if rng.random() < 0.7:
                cv2.fillPoly(canvas, [points.astype(np.int32)], grey, cv2.LINE_AA)
            else:
                cv2.polylines(canvas, [points.astype(np.int32)], True, grey, 2, cv2.LINE_AA)


def _shape_outline(shape: str, size: float, angle: float) -> np.ndarray:
    """(k, 2) float64 vertices around (0, 0) of a square or an equilateral triangle, rotated."""
    if shape == "square":
        points = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * size / 2
    else:  # pointing up, centred on its centroid
        points = np.array(
            [
                [0.0, -size / math.sqrt(3)],
                [size / 2, size / (2 * math.sqrt(3))],
                [-size / 2, size / (2 * math.sqrt(3))],
            ]
        )
    radians = math.radians(angle)
    rotation = np.array(
        [[math.cos(radians), -math.sin(radians)], [math.sin(radians), math.cos(radians)]]
    )
    return points @ rotation.T


def _sample_shape_mask(
    rng: np.random.Generator,
    shape: str,
    height: int,
    width: int,
    *,
    size_range: tuple[float, float],
    max_rotation: float,
) -> tuple[np.ndarray, float]:
    """A random placement of `shape` wholly inside the image: ((H, W) bool mask, angle)."""
    size = rng.uniform(*size_range) * min(height, width)
    mask = np.zeros((height, width), np.uint8)
    if shape == "circle":
        angle = 0.0
        radius = size / 2
        centre = rng.uniform((radius, radius), (width - radius, height - radius))
        # OpenCV puts pixel centres at integers; our coordinates put them at + 0.5.
        cv2.circle(
            mask,
            tuple(int(round(v)) for v in (centre - 0.5) * (1 << _SHIFT)),
            int(round(radius * (1 << _SHIFT))),
            1,
            -1,
            cv2.LINE_8,
            _SHIFT,
        )
    else:
        angle = rng.uniform(-max_rotation, max_rotation)
        outline = _shape_outline(shape, size, angle)
        low, high = -outline.min(axis=0), (width, height) - outline.max(axis=0)
        points = outline + rng.uniform(low, high)
        fixed_point = np.round((points - 0.5) * (1 << _SHIFT)).astype(np.int32)
        cv2.fillPoly(mask, [fixed_point], 1, cv2.LINE_8, _SHIFT)
    return mask.view(bool), angle


@dataclass
class _Placement:
    """A shape drawn so far: its colour class, full (H, W) bool mask and pixel count."""

    colour_name: str
    mask: np.ndarray
    area: int


def _place_shape(
    rng: np.random.Generator,
    placed: list[_Placement],
    visible: list[np.ndarray],
    height: int,
    width: int,
    *,
    size_range: tuple[float, float],
    max_rotation: float,
    min_visible: float,
) -> tuple[str, str, np.ndarray, float] | None:
    """A new shape on top of `placed` that obeys the occlusion and same-colour rules.

    Returns:
        (colour name, shape name, (H, W) bool mask, angle in degrees), or None when
        `_PLACEMENT_TRIES` candidates all failed.
    """
    gap_kernel = np.ones((2 * _SAME_COLOUR_GAP + 1,) * 2, np.uint8)
    for _ in range(_PLACEMENT_TRIES):
        colour_name = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        mask, angle = _sample_shape_mask(
            rng, shape, height, width, size_range=size_range, max_rotation=max_rotation
        )
        if any(
            (seen & ~mask).sum() < min_visible * earlier.area
            for seen, earlier in zip(visible, placed, strict=True)
        ):
            continue
        same_colour = [earlier.mask for earlier in placed if earlier.colour_name == colour_name]
        if same_colour:
            grown = cv2.dilate(mask.view(np.uint8), gap_kernel).view(bool)
            if any((grown & earlier).any() for earlier in same_colour):
                continue
        return colour_name, shape, mask, angle
    return None


def generate_image(
    rng: np.random.Generator,
    *,
    min_side: int = 256,
    max_side: int = 640,
    min_shapes: int = 1,
    max_shapes: int = 4,
    size_range: tuple[float, float] = (0.12, 0.38),
    max_rotation: float = 30.0,
    min_visible: float = 0.5,
    colour_jitter: int = 25,
    max_pixel_noise: float = 4.0,
) -> ShapesImage:
    """One random image with its shapes' categories, boxes and visible-pixel masks.

    Args:
        rng: the only source of randomness.
        min_side, max_side: range of each image side, pixels (inclusive).
        min_shapes, max_shapes: range of the number of shapes attempted (inclusive,
            1 <= min_shapes <= max_shapes); an image may hold fewer when placements keep failing,
            but always at least one. `max_shapes=1` gives the one-shape-per-image curriculum.
        size_range: shape size (circle diameter, square or triangle side) as fractions of the
            shorter image side.
        max_rotation: squares and triangles turn uniformly within +- this many degrees.
        min_visible: the fraction of each shape's area that later shapes must leave visible.
        colour_jitter: uniform per-channel jitter around the class anchor (`COLOURS`).
        max_pixel_noise: the standard deviation of the grey pixel noise over the whole image is
            uniform in [0, max_pixel_noise].
    """
    if not 1 <= min_shapes <= max_shapes:
        raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
    height, width = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    canvas = _background(rng, background, height, width)
    placed: list[_Placement] = []
    visible: list[np.ndarray] = []
    ids, colours, angles = [], [], []
    for _ in range(int(rng.integers(min_shapes, max_shapes + 1))):
        found = _place_shape(
            rng,
            placed,
            visible,
            height,
            width,
            size_range=size_range,
            max_rotation=max_rotation,
            min_visible=min_visible,
        )
        if found is None:
            break  # no room left; the first shape always fits, so the image has one
        colour_name, shape, mask, angle = found
        visible = [seen & ~mask for seen in visible] + [mask.copy()]
        placed.append(_Placement(colour_name, mask, int(mask.sum())))
        anchor = np.array(COLOURS[colour_name])
        colour = np.clip(anchor + rng.integers(-colour_jitter, colour_jitter + 1, 3), 0, 255)
        colours.append(colour.astype(np.uint8))
        ids.append(CATEGORY_IDS[f"{colour_name} {shape}"])
        angles.append(angle)
        canvas[mask] = colour
    noise = rng.standard_normal((height, width, 1), dtype=np.float32)  # grey: no chroma
    noise *= rng.uniform(0.0, max_pixel_noise)
    noise += 0.5  # so that the truncating astype below rounds to nearest
    canvas += noise
    image = np.clip(canvas, 0.0, 255.0, out=canvas).astype(np.uint8)
    masks = np.stack(visible)  # (n, H, W)
    return ShapesImage(
        image=image,
        category_ids=np.array(ids, np.int64),
        names=[CATEGORIES[i - 1] for i in ids],
        boxes=_mask_boxes(masks),
        masks=masks,
        full_areas=np.array([p.area for p in placed], np.int64),
        colours=np.stack(colours),
        angles=np.array(angles, np.float32),
        background=background,
    )


def _mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(n, 4) float32 x0, y0, x1, y1 tight around each (H, W) mask of `masks` (n, H, W)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for index, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        columns = np.flatnonzero(mask.any(axis=0))
        boxes[index] = (columns[0], rows[0], columns[-1] + 1, rows[-1] + 1)
    return boxes


def coco_annotations(sample: ShapesImage, image_id: int) -> list[dict]:
    """COCO annotations of `sample`, in drawing order, without "id".

    bbox is [x, y, w, h]; segmentation a compressed RLE with str counts; area the mask's pixels.
    """
    annotations = []
    for category_id, box, mask in zip(sample.category_ids, sample.boxes, sample.masks, strict=True):
        rle = mask_utils.encode(np.asfortranarray(mask.view(np.uint8)))
        x0, y0, x1, y1 = (float(v) for v in box)
        annotations.append(
            {
                "image_id": image_id,
                "category_id": int(category_id),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": int(mask.sum()),
                "iscrowd": 0,
                "segmentation": {
                    "size": [int(v) for v in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
            }
        )
    return annotations


def _write_image(task: tuple[Path, int, int, dict]) -> tuple[dict, list[dict]]:
    """Generates and writes image `index`: (COCO image entry, its annotations without ids)."""
    image_folder, seed, index, generator_options = task
    sample = generate_image(np.random.default_rng([seed, index]), **generator_options)
    file_name = f"{index:06d}.png"
    encoded = cv2.imencode(
        ".png", cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR), list(_PNG_OPTIONS)
    )[1]
    (image_folder / file_name).write_bytes(encoded.tobytes())
    height, width = sample.image.shape[:2]
    entry = {"id": index + 1, "file_name": file_name, "width": width, "height": height}
    return entry, coco_annotations(sample, index + 1)


def generate_split(
    folder: str | Path,
    count: int,
    seed: int,
    *,
    workers: int = 0,
    progress: bool = True,
    **generator_options,
) -> Path:
    """Writes `count` images and their COCO annotations; returns the annotation file's path.

    Files: `folder/images/{i:06d}.png` (lossless RGB PNG) and `folder/annotations.json`, whose
    `file_name`s are relative to `folder/images`; image i has id i + 1, annotation ids run from 1
    in image order. Image i comes from `np.random.default_rng([seed, i])`, so it depends only on
    (seed, i, generator_options); the files do not depend on `workers`.

    Args:
        folder: created when missing; existing files of the same names are overwritten.
        count: images to write.
        seed: the split's seed.
        workers: processes to generate with (0: this process only).
        progress: print a line every 500 images.
        generator_options: keyword arguments for `generate_image` (e.g. `max_shapes=1`).
    """
    folder = Path(folder)
    image_folder = folder / "images"
    image_folder.mkdir(parents=True, exist_ok=True)
    tasks = ((image_folder, seed, index, generator_options) for index in range(count))
    images: list[dict] = []
    annotations: list[dict] = []
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) if workers > 0 else nullcontext() as pool:
        # map keeps the order, so the files are the same for any number of workers.
        results = pool.map(_write_image, tasks, chunksize=16) if pool else map(_write_image, tasks)
        for entry, image_annotations in results:
            images.append(entry)
            annotations += [
                {"id": len(annotations) + offset + 1, **annotation}
                for offset, annotation in enumerate(image_annotations)
            ]
            if progress and len(images) % 500 == 0:
                rate = len(images) / (time.perf_counter() - started)
                print(f"{folder}: {len(images)}/{count} images, {rate:.0f}/s", flush=True)
    options = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in sorted(generator_options.items())
    }
    coco = {
        "info": {
            "description": "synthetic shapes (grounding.shapes_data)",
            "seed": seed,
            "options": options,
        },
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: writes OUT/train, OUT/val and optionally OUT/test."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--train", type=int, default=20000, help="training images")
    parser.add_argument("--val", type=int, default=200, help="validation images")
    parser.add_argument("--test", type=int, default=0, help="test images (0: no test split)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help=f"training seed; val uses seed + {VAL_SEED_OFFSET}, test seed + {TEST_SEED_OFFSET}",
    )
    parser.add_argument(
        "--max-shapes",
        type=int,
        default=4,
        help="at most this many shapes per image (1: curriculum start)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes to generate with (0: this one; files are the same)",
    )
    arguments = parser.parse_args(argv)
    splits = [
        ("train", arguments.train, arguments.seed),
        ("val", arguments.val, arguments.seed + VAL_SEED_OFFSET),
        ("test", arguments.test, arguments.seed + TEST_SEED_OFFSET),
    ]
    for name, count, seed in splits:
        if count <= 0:
            continue
        started = time.perf_counter()
        generate_split(
            arguments.out / name,
            count,
            seed,
            workers=arguments.workers,
            max_shapes=arguments.max_shapes,
        )
        elapsed = time.perf_counter() - started
        print(
            f"{name}: {count} images (seed {seed}) in {arguments.out / name}, "
            f"{elapsed:.1f} s, {count / elapsed:.0f} images/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
