"""Synthetic shapes, the drawing: one random image with exact boxes and masks (`generate_image`).

Each image shows 1-4 filled circles, squares and triangles in red, green, blue and yellow (the 12
categories of `grounding.shapes_categories`, "red circle" ... "yellow triangle") on grey
multi-scale noise, a low-saturation colour gradient, or grey clutter (lines, blobs, squares and
polygons: shape-like distractors, but never coloured), with mild grey pixel noise over everything.
`grounding.shapes_data` writes them as COCO-format splits.

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

Reproducibility: everything random comes from the `rng` argument. Curriculum: `max_shapes=1`
gives one shape per image, for an easy start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from grounding.shapes_categories import CATEGORIES, CATEGORY_IDS, COLOURS, SHAPES

BACKGROUNDS: tuple[str, ...] = ("noise", "gradient", "clutter")

# Largest background chroma (max - min channel, 0-255; pixel noise is grey, rounding may add 1);
# shapes have >= 90.
MAX_BACKGROUND_CHROMA = 45
_PLACEMENT_TRIES = 30
# Same-colour shapes keep at least this many pixels between them.
_SAME_COLOUR_GAP = 3
# Fixed-point bits for sub-pixel drawing with OpenCV (coordinates times 16).
_SHIFT = 4


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
