"""Drawing: colours per phrase that match the legend, masks on the right pixels, Gradio's value."""

import numpy as np
import pytest
import supervision as sv

from segmentation.results import SegmentedDetections
from segmentation.visualize import (
    PALETTE,
    _blend_masks,
    annotate,
    annotated_image_value,
    labels,
    legend,
    to_supervision,
)

HEIGHT, WIDTH = 160, 240


def rgb(hex_color):
    return np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])


def make_result(boxes, masks, phrase_ids, prompt_phrases, scores=None):
    count = len(boxes)
    scores = np.linspace(0.9, 0.5, count) if scores is None else scores
    return SegmentedDetections(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        scores=np.asarray(scores, np.float32), phrases=[prompt_phrases[i] for i in phrase_ids],
        phrase_ids=np.asarray(phrase_ids, np.int64), prompt_phrases=prompt_phrases,
        masks=np.asarray(masks, bool).reshape(count, HEIGHT, WIDTH),
        mask_scores=np.ones(count, np.float32))


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture
def result():
    """A cat (two of them) and a dog; each mask a rectangle well inside its box."""
    boxes = [[20, 40, 100, 140], [130, 40, 220, 140], [110, 100, 125, 150]]
    masks = np.zeros((3, HEIGHT, WIDTH), bool)
    masks[0, 60:120, 40:80] = True
    masks[1, 60:120, 150:200] = True
    masks[2, 120:140, 112:123] = True
    return make_result(boxes, masks, [0, 1, 0], ["cat", "dog"], scores=[0.87, 0.5, 0.31])


def expected_blend(pixel, hex_color, opacity=0.45):
    return np.rint(pixel * (1 - opacity) + rgb(hex_color) * opacity)


def test_masks_boxes_and_labels_in_the_legend_colours(image, result):
    before = image.copy()
    out = annotate(image, result)
    np.testing.assert_array_equal(image, before)  # the input is not drawn on
    assert out.shape == image.shape and out.dtype == np.uint8
    colors = dict(legend(result))
    assert legend(result) == [("cat", PALETTE.by_idx(0).as_hex()),
                              ("dog", PALETTE.by_idx(1).as_hex())]
    assert colors["cat"] != colors["dog"]
    for index, (y, x) in enumerate([(90, 60), (90, 175), (130, 117)]):  # inside mask i
        phrase = result.prompt_phrases[result.phrase_ids[index]]
        np.testing.assert_allclose(out[y, x], expected_blend(image[y, x], colors[phrase]),
                                   atol=1)
    # Box outlines are drawn in their phrase's colour (RGB, not OpenCV's BGR).
    np.testing.assert_array_equal(out[90, 20], rgb(colors["cat"]))
    np.testing.assert_array_equal(out[90, 220], rgb(colors["dog"]))
    # Far from every mask, box and label nothing changes.
    np.testing.assert_array_equal(out[2:20, 150:235], image[2:20, 150:235])
    np.testing.assert_array_equal(out[45:55, 30:90], image[45:55, 30:90])
    assert labels(result) == ["cat 0.87", "dog 0.50", "cat 0.31"]


def test_the_smaller_mask_is_drawn_on_top(image):
    masks = np.zeros((2, HEIGHT, WIDTH), bool)
    masks[0, 10:150, 10:230] = True  # big, phrase 0
    masks[1, 60:90, 60:90] = True  # small, phrase 1, inside the big one
    result = make_result([[0, 0, 240, 160], [55, 55, 95, 95]], masks[::-1][::-1], [0, 1],
                         ["table", "cup"])
    out = annotate(image, result, mask_opacity=1.0)
    np.testing.assert_array_equal(out[75, 75], rgb(dict(legend(result))["cup"]))
    np.testing.assert_array_equal(out[120, 150], rgb(dict(legend(result))["table"]))


def test_mask_blend_equals_supervisions_mask_annotator(image):
    rng = np.random.default_rng(2)
    masks = np.zeros((12, HEIGHT, WIDTH), bool)
    for index, mask in enumerate(masks):
        y, x = rng.integers(0, 100, 2)
        mask[y:y + 10 + 4 * index, x:x + 20 + 5 * index] = True  # overlapping, distinct areas
        mask[rng.random((HEIGHT, WIDTH)) < 0.01] = True
    result = make_result(rng.uniform(0, 100, (12, 4)), masks, rng.integers(0, 4, 12),
                         ["a", "b", "c", "d"])
    ours = np.ascontiguousarray(image[..., ::-1])
    _blend_masks(ours, result, 0.45)
    theirs = sv.MaskAnnotator(color=PALETTE, opacity=0.45).annotate(
        np.ascontiguousarray(image[..., ::-1]), to_supervision(result))
    assert np.abs(ours.astype(int) - theirs).max() <= 1


def test_nothing_found_draws_nothing_and_sizes_must_match(image):
    empty = make_result(np.zeros((0, 4)), np.zeros((0, HEIGHT, WIDTH)), [], ["cat"])
    np.testing.assert_array_equal(annotate(image, empty), image)
    assert legend(empty) == [("cat", PALETTE.by_idx(0).as_hex())]
    with pytest.raises(ValueError, match="240 x 160"):
        annotate(image[:100], empty)


def test_hundreds_of_detections(image):
    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 130, (300, 2))
    boxes = np.concatenate([corners, corners + 25], axis=1)
    masks = np.zeros((300, HEIGHT, WIDTH), bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.astype(int), strict=True):
        mask[y0 + 3:y1 - 3, x0 + 3:x1 - 3] = True
    result = make_result(boxes, masks, rng.integers(0, 5, 300), list("abcde"))
    out = annotate(image, result)
    covered = masks.any(axis=0)
    assert (out[covered] != image[covered]).any(axis=1).mean() > 0.9


def test_annotated_image_value_fits_gradio(image, result, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    import gradio as gr

    base, annotations = annotated_image_value(image, result)
    assert base.shape == image.shape and len(annotations) == 3
    assert [label for _, label in annotations] == ["cat", "dog", "cat"]
    for (mask, _), expected in zip(annotations, result.masks, strict=True):
        assert mask.dtype == bool and np.array_equal(mask, expected)
    np.testing.assert_array_equal(base[90, 20], rgb(dict(legend(result))["cat"]))  # boxes drawn
    np.testing.assert_array_equal(base[90, 60], image[90, 60])  # masks are left to Gradio
    component = gr.AnnotatedImage(color_map=dict(legend(result)), format="png")
    data = component.postprocess((base, annotations))
    assert [a.label for a in data.annotations] == ["cat", "dog", "cat"]
