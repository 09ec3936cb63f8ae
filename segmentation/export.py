"""Results as files: COCO RLE masks, COCO JSON, a JSON-ready dict for the API, a ZIP of PNGs.

COCO conventions (cocodataset.org/#format-data): bbox is [x, y, width, height] in pixels,
segmentation a compressed RLE {"size": [height, width], "counts": str} (column-major, as
pycocotools writes it), area the mask's pixel count, category ids from 1. The score is the
detector's box score, not SAM's mask score (which is kept as "mask_score").
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segmentation.images import rgb_array
from segmentation.masks import true_window
from segmentation.results import SegmentedDetections


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of an (H, W) bool mask: {"size": [H, W], "counts": str}."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    # One column-major copy, viewed as uint8 (same item size as bool): no second copy.
    rle = mask_utils.encode(np.asfortranarray(mask.astype(bool, copy=False)).view(np.uint8))
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": rle["counts"].decode("ascii"),
    }


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """(H, W) bool mask from a COCO RLE, compressed (str or bytes counts) or uncompressed (list)."""
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        encoded = mask_utils.frPyObjects(rle, height, width)
    else:
        encoded = {
            "size": [height, width],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    with warnings.catch_warnings():
        # pycocotools 2.0.11 passes copy=False to an __array__ of its own; NumPy 2 warns.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(encoded).astype(bool)


def to_coco(
    result: SegmentedDetections,
    *,
    file_name: str,
    width: int,
    height: int,
    image_id: int = 1,
    rles: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A COCO dataset dict (images, annotations, categories) for one image.

    Categories are the prompt's phrases (repeated phrases once), ids from 1; each annotation
    carries the detector's box as bbox, its score, its label text as "phrase", the mask as RLE
    segmentation and its pixel count as area.

    Args:
        rles: `rle_encode` of each mask, when the caller already has them (an app re-exporting
            after every slider move); default: encoded here.
    """
    if len(result) and result.image_size != (width, height):
        raise ValueError(
            f"the masks are {result.image_size[0]} x {result.image_size[1]}, not {width} x {height}"
        )
    if rles is not None and len(rles) != len(result):
        raise ValueError(f"{len(rles)} RLEs for {len(result)} detections")
    names = list(dict.fromkeys(result.prompt_phrases))
    annotations = []
    for index in range(len(result)):
        x0, y0, x1, y1 = (float(v) for v in result.boxes[index])
        category = names.index(result.prompt_phrases[result.phrase_ids[index]]) + 1
        annotations.append(
            {
                "id": index + 1,
                "image_id": image_id,
                "category_id": category,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": int(np.count_nonzero(result.masks[index])),
                "segmentation": rle_encode(result.masks[index]) if rles is None else rles[index],
                "iscrowd": 0,
                "score": float(result.scores[index]),
                "mask_score": float(result.mask_scores[index]),
                "phrase": result.phrases[index],
            }
        )
    return {
        "images": [{"id": image_id, "file_name": file_name, "width": width, "height": height}],
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(names)
        ],
    }


def to_json_dict(result: SegmentedDetections) -> dict[str, Any]:
    """Plain lists and numbers for an API: index i of every list describes detection i.

    Keys: width, height, prompt_phrases, boxes (x0, y0, x1, y1 pixels), scores, phrases,
    phrase_ids, mask_scores, masks (COCO RLE dicts, see `rle_decode`), and omitted: how many
    detections above the box threshold were left out by a cap on their number.
    """
    width, height = result.image_size
    return {
        "width": int(width),
        "height": int(height),
        "prompt_phrases": list(result.prompt_phrases),
        "boxes": [[round(float(v), 2) for v in box] for box in result.boxes],
        "scores": [round(float(s), 4) for s in result.scores],
        "phrases": list(result.phrases),
        "phrase_ids": [int(i) for i in result.phrase_ids],
        "mask_scores": [round(float(s), 4) for s in result.mask_scores],
        "masks": [rle_encode(mask) for mask in result.masks],
        "omitted": int(result.omitted),
    }


def write_zip(
    target: str | os.PathLike | BinaryIO,
    image: Image.Image | np.ndarray,
    result: SegmentedDetections,
    *,
    file_name: str = "image.png",
    coco: dict[str, Any] | None = None,
    max_bytes: int | None = None,
) -> None:
    """Write a ZIP archive of the result to a file, one member at a time (streamed: memory holds
    one mask's PNG at a time, never the archive).

    Holds annotations.json (COCO, see `to_coco`) and, per detection i, masks/{i:03d}_{phrase}.png
    (8-bit gray at the image's size, 255 = object) and, when its mask is not empty inside its box,
    cutouts/{i:03d}_{phrase}.png (RGBA cropped to the mask's extent within the detection's box: the
    image's pixels with alpha 255 on the mask, transparent black elsewhere). The box bounds each
    cut-out's size even when a mask spills over the whole image.

    Args:
        target: a path, or a binary file open for writing.
        image: the image the result belongs to (same size as the masks).
        file_name: the image's name recorded in annotations.json.
        coco: `to_coco` of the result when the caller has it already (not computed twice).
        max_bytes: stop with a ValueError once the archive grows past this (a server's bound
            on one answer's disk use); the partial archive is then left to the caller.
    """
    pixels = rgb_array(image)
    height, width = pixels.shape[:2]
    if coco is None:
        coco = to_coco(result, file_name=file_name, width=width, height=height)
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("annotations.json", json.dumps(coco), zipfile.ZIP_DEFLATED)
        for index, (mask, phrase) in enumerate(zip(result.masks, result.phrases, strict=True)):
            name = f"{index:03d}_{_slug(phrase)}.png"
            mask = np.asarray(mask, dtype=bool)
            archive.writestr(f"masks/{name}", _png(Image.fromarray(mask.view(np.uint8) * 255)))
            window = _cutout_window(mask, result.boxes[index])
            if window is None:
                continue
            inside = mask[window]
            cutout = np.dstack([pixels[window] * inside[..., None], inside.view(np.uint8) * 255])
            archive.writestr(f"cutouts/{name}", _png(Image.fromarray(cutout)))
            assert archive.fp is not None  # set while the archive is open for writing
            if max_bytes is not None and archive.fp.tell() > max_bytes:
                raise ValueError(
                    f"the ZIP of masks and cut-outs would pass {max_bytes / 1e6:.0f} "
                    f"MB after {index + 1} of {len(result)} detections: raise the "
                    "box threshold to export fewer"
                )


def _cutout_window(mask: np.ndarray, box: np.ndarray) -> tuple[slice, slice] | None:
    """Rows and columns of the mask's True pixels inside `box` (x0, y0, x1, y1, rounded out), or
    None when there are none."""
    height, width = mask.shape
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
    window = true_window(mask[y0:y1, x0:x1])
    if window is None:
        return None
    rows, columns = window
    return slice(y0 + rows.start, y0 + rows.stop), slice(x0 + columns.start, x0 + columns.stop)


def to_zip(
    image: Image.Image | np.ndarray, result: SegmentedDetections, *, file_name: str = "image.png"
) -> bytes:
    """`write_zip` into memory: the archive's bytes (for small results; files use `write_zip`)."""
    buffer = io.BytesIO()
    write_zip(buffer, image, result, file_name=file_name)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "object"
