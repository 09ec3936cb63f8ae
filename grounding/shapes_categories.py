"""The synthetic shapes' 12 categories: 4 colours x 3 shapes, "red circle" ... "yellow triangle".

No dependencies, so that code that only needs the names (offline mode, the shapes metrics) does
not import the generator (`grounding.shapes_drawing`, which needs OpenCV) or the COCO writer
(`grounding.shapes_data`, which needs pycocotools).
"""

from __future__ import annotations

# RGB anchors, in category order. Jitter of +-25 keeps each class's hue range disjoint from the
# others' (see `grounding.shapes_drawing`).
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
