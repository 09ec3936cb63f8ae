"""The shipped offline models (trained here on synthetic shapes) end to end: on freshly generated
images, through the app's pipeline at its default thresholds, each object is found with the right
phrase, a tight box and a good mask; names the models never saw find nothing."""

from __future__ import annotations

import numpy as np
import pytest

from grounding.shapes_categories import CATEGORIES
from grounding.shapes_drawing import generate_image
from segmentation import load_pipeline
from segmentation.offline import KNOWN_NAMES, known_names_text
from segmentation.shapes_metrics import mask_iou

BOX_THRESHOLD, TEXT_THRESHOLD = 0.35, 0.25  # the app's defaults
PROMPT = " . ".join(CATEGORIES) + " ."
# Seeds no training, validation or test split uses (those are [seed + offset, index]).
FRESH_SEEDS = [[2026, index] for index in range(3)]


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline(offline=True, device="cpu")


def box_iou(first: np.ndarray, second: np.ndarray) -> float:
    x0, y0 = np.maximum(first[:2], second[:2])
    x1, y1 = np.minimum(first[2:], second[2:])
    overlap = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return float(overlap / (area(first) + area(second) - overlap))


@pytest.mark.parametrize("seed", FRESH_SEEDS, ids=lambda seed: f"seed{seed[1]}")
def test_each_shape_is_found_named_boxed_and_cut_out(pipeline, seed):
    sample = generate_image(np.random.default_rng(seed))
    result = pipeline.run(sample.image, PROMPT, BOX_THRESHOLD, TEXT_THRESHOLD)
    for name, box, mask in zip(sample.names, sample.boxes, sample.masks, strict=True):
        named = [i for i, phrase in enumerate(result.phrases) if phrase == name]
        assert named, f"{name} not found (found {result.phrases})"
        best = max(named, key=lambda i: box_iou(result.boxes[i], box))
        assert box_iou(result.boxes[best], box) >= 0.7, f"{name}: loose box"
        assert mask_iou(result.masks[best : best + 1], mask[None])[0] >= 0.8, f"{name}: poor mask"


def test_names_the_models_never_saw_find_nothing(pipeline):
    for seed in FRESH_SEEDS:
        image = generate_image(np.random.default_rng(seed)).image
        for prompt in ("a dog .", "a car . a person ."):
            assert len(pipeline.run(image, prompt, BOX_THRESHOLD, TEXT_THRESHOLD)) == 0


def test_the_known_names_are_the_training_categories():
    assert KNOWN_NAMES == CATEGORIES and len(KNOWN_NAMES) == 12
    assert known_names_text().startswith("red circle, red square, ")
    assert known_names_text().endswith(" and yellow triangle")


def test_the_known_names_come_without_the_shapes_generator():
    """Offline mode needs only the 12 names: importing it loads neither the drawing (OpenCV) nor
    the COCO writer (pycocotools) of the shapes data, and the names' module imports nothing."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    import grounding.shapes_categories

    code = (
        "import sys, segmentation.offline; "
        "print(sorted({'grounding.shapes_data', 'grounding.shapes_drawing'} & set(sys.modules)))"
    )
    root = Path(__file__).resolve().parents[1]
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"
    tree = ast.parse(Path(grounding.shapes_categories.__file__).read_text(encoding="utf-8"))
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    assert [getattr(node, "module", None) for node in imports] == ["__future__"]
