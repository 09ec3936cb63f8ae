"""Pictures of a result: masks, boxes and "phrase 0.87" labels, one colour per prompt phrase.

Boxes and labels are drawn by supervision from an `sv.Detections` built directly (its
`from_transformers` does not fit Grounding DINO's string labels). Masks are blended here in one pass
with supervision's colours and its order (smaller masks on top): `sv.MaskAnnotator` indexes the
whole frame once per mask and took 1.3 s for 300 box-sized masks on a 1200 x 800 image, this takes
0.08 s (25 masks of 20 % of the frame: 20 ms), which matters because every slider move redraws.
supervision draws with OpenCV, whose colours are BGR, so the RGB image is converted around the
drawing and the colours match `legend`'s hex codes.
"""

from __future__ import annotations

import cv2
import numpy as np
import supervision as sv
from PIL import Image

from segmentation.images import rgb_array
from segmentation.masks import true_window
from segmentation.results import SegmentedDetections

PALETTE = sv.ColorPalette.DEFAULT


def labels(result: SegmentedDetections) -> list[str]:
    """ "phrase 0.87" per detection: its label and the detector's score."""
    return [
        f"{phrase} {score:.2f}" for phrase, score in zip(result.phrases, result.scores, strict=True)
    ]


def phrase_color(phrase_id: int) -> str:
    """The "#rrggbb" colour of the prompt's phrase number `phrase_id`."""
    return PALETTE.by_idx(int(phrase_id)).as_hex()


def legend(result: SegmentedDetections) -> list[tuple[str, str]]:
    """(phrase, "#rrggbb") for each prompt phrase, in prompt order (entry i = phrase id i).

    `dict(legend(result))` is the `color_map` for `annotated_image_value`.
    """
    return [(phrase, phrase_color(index)) for index, phrase in enumerate(result.prompt_phrases)]


def to_supervision(result: SegmentedDetections) -> sv.Detections:
    """The result as `sv.Detections`; class_id is the phrase index, data["class_name"] the label."""
    return sv.Detections(
        xyxy=result.boxes.astype(np.float32).reshape(-1, 4),
        mask=result.masks,
        confidence=result.scores,
        class_id=result.phrase_ids.astype(int),
        data={"class_name": np.array(result.phrases, dtype=str)},
    )


def annotate(
    image: Image.Image | np.ndarray, result: SegmentedDetections, *, mask_opacity: float = 0.45
) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the image with every mask, box and label drawn.

    Args:
        image: the image the result belongs to (same size as the masks).
        mask_opacity: 0 (masks invisible) to 1 (opaque).
    """
    scene = _bgr_scene(image, result)
    _blend_masks(scene, result, mask_opacity)
    _draw_boxes_and_labels(scene, result)
    return cv2.cvtColor(scene, cv2.COLOR_BGR2RGB)


def annotated_image_value(
    image: Image.Image | np.ndarray,
    result: SegmentedDetections,
) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """The value of a `gr.AnnotatedImage`: (image with boxes and labels, [(mask, phrase), ...]).

    Masks are (H, W) bool, each labelled with its prompt phrase, so
    `gr.AnnotatedImage(color_map=dict(legend(result)))` colours every mask like its box, and
    the legend shows phrases; the "phrase 0.87" labels are drawn on the image.
    """
    scene = _bgr_scene(image, result)
    _draw_boxes_and_labels(scene, result)
    phrases = [result.prompt_phrases[int(i)] for i in result.phrase_ids]
    return cv2.cvtColor(scene, cv2.COLOR_BGR2RGB), list(zip(result.masks, phrases, strict=True))


def _draw_boxes_and_labels(scene: np.ndarray, result: SegmentedDetections) -> None:
    """Boxes and "phrase 0.87" labels on the BGR `scene`, in place, sized to the image."""
    detections = to_supervision(result)
    resolution = (scene.shape[1], scene.shape[0])
    thickness = sv.calculate_optimal_line_thickness(resolution)
    sv.BoxAnnotator(color=PALETTE, thickness=thickness).annotate(scene, detections)
    sv.LabelAnnotator(
        color=PALETTE,
        text_scale=sv.calculate_optimal_text_scale(resolution),
        text_thickness=max(1, thickness // 2),
        text_padding=2 * thickness,
    ).annotate(scene, detections, labels=labels(result))


def _blend_masks(scene: np.ndarray, result: SegmentedDetections, opacity: float) -> None:
    """Blend each mask's phrase colour into the BGR `scene`, in place; smaller masks on top."""
    masks = result.masks
    if not len(masks):
        return
    windows = [true_window(mask) for mask in masks]
    areas = np.array(
        [
            0 if window is None else np.count_nonzero(mask[window])
            for mask, window in zip(masks, windows, strict=True)
        ],
        dtype=np.int64,
    )
    # (H, W) 1 + index of the mask on top, 0 where none, written through window views.
    wide = len(masks) >= np.iinfo(np.uint16).max
    shown = np.zeros(scene.shape[:2], dtype=np.int32 if wide else np.uint16)
    for index in np.argsort(-areas, kind="stable"):
        if windows[index] is None:
            continue
        view, mask = shown[windows[index]], masks[index][windows[index]]
        if wide:
            np.putmask(view, mask, index + 1)
        else:  # 10x faster than numpy's masked assignment on large noisy masks
            cv2.copyTo(np.full(view.shape, index + 1, np.uint16), mask.view(np.uint8), view)
    colors = np.zeros((len(masks) + 1, 3), dtype=np.uint8)  # row 0: no mask
    colors[1:] = [PALETTE.by_idx(int(i)).as_bgr() for i in result.phrase_ids]
    blended = cv2.addWeighted(scene, 1 - opacity, np.take(colors, shown, axis=0), opacity, 0.0)
    cv2.copyTo(blended, (shown > 0).view(np.uint8), scene)  # in place, where a mask is


def _bgr_scene(image: Image.Image | np.ndarray, result: SegmentedDetections) -> np.ndarray:
    """A writable BGR copy of the image, checked against the masks' size."""
    pixels = rgb_array(image)
    size = (pixels.shape[1], pixels.shape[0])
    if size != result.image_size:
        raise ValueError(
            f"the image is {size[0]} x {size[1]} but the masks are "
            f"{result.image_size[0]} x {result.image_size[1]}"
        )
    return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2BGR)
