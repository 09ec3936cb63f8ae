"""What the app shows for one result: the detections table, the summary line, the legend chips,
the annotated image as a JPEG file and the export files (COCO JSON, ZIP of masks and cut-outs).
No Gradio here."""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from segmentation.export import rle_encode, to_coco, write_zip
from segmentation.visualize import legend

TABLE_HEADERS = ["#", "phrase", "score", "x0", "y0", "x1", "y1", "mask px", "mask score"]
# One answer's ZIP at most. Cut-outs are cropped to their boxes; 100 whole-image detections of a
# 3000 x 3000 photo take 0.46 GB, of 3000 x 3000 noise 3.2 GB (scripts in the README).
MAX_ZIP_BYTES = 1_000_000_000
RLE_CACHE_ENTRIES = 256  # per session; more than the app ever shows at once (MAX_DETECTIONS)


def table(result) -> pd.DataFrame:
    """One row per detection: phrase, score, box corners, mask pixels and SAM's mask score."""
    rows = [
        [
            i + 1,
            phrase,
            round(float(score), 3),
            *(int(round(float(v))) for v in box),
            np.count_nonzero(mask),
            round(float(mask_score), 3),
        ]
        for i, (phrase, score, box, mask, mask_score) in enumerate(
            zip(
                result.phrases,
                result.scores,
                result.boxes,
                result.masks,
                result.mask_scores,
                strict=True,
            )
        )
    ]
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def summary(result, prompt: str, box_threshold: float, seconds: float) -> str:
    """Markdown: what was found, per phrase, or why nothing was."""
    if len(result) == 0:
        return (
            f"**No objects found** for “{markdown_text(prompt.strip()[:80])}” above box "
            f"threshold {box_threshold:.2f}. Lower the box threshold, or name the objects "
            "differently (short nouns separated by “.” work best)."
        )
    counts = Counter(result.prompt_phrases[int(i)] for i in result.phrase_ids)
    found = ", ".join(f"{markdown_text(phrase)} × {n}" for phrase, n in counts.most_common())
    noun = "object" if len(result) == 1 else "objects"
    message = f"**Found {len(result)} {noun}:** {found} ({seconds:.2f} s)"
    if result.omitted:
        message += (
            f". Showing the best {len(result)} of {len(result) + result.omitted} "
            "detections above the box threshold; raise it to see fewer."
        )
    return message


def markdown_text(text: str) -> str:
    """`text` shown literally inside Markdown: HTML escaped (no element can be injected) and
    Markdown's punctuation backslash-escaped (no emphasis, link or image either)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~])", r"\\\1", html.escape(text))


def legend_html(result) -> str:
    """Colour chips, one per prompt phrase, in the colours of the annotated image."""
    counts = Counter(int(i) for i in result.phrase_ids)
    chips = [
        f'<span class="chip"><span class="swatch" style="background:{color}"></span>'
        f"{html.escape(phrase)} ({counts.get(index, 0)})</span>"
        for index, (phrase, color) in enumerate(legend(result))
    ]
    return f'<div class="legend">{"".join(chips)}</div>'


def write_picture(picture: np.ndarray, folder: Path, name: str) -> str:
    """Save an (H, W, 3) uint8 RGB picture as `folder/<stem>_result.jpg` and return its path.

    JPEG at quality 90 without chroma subsampling, so coloured label text stays crisp: under
    10 ms for 1200 x 800 on 2 cores, where PNG (Gradio's encoding of an array) takes 290 ms.
    """
    path = folder / f"{Path(name).stem}_result.jpg"
    Image.fromarray(picture).save(path, format="JPEG", quality=90, subsampling=0)
    return str(path)


def cached_rles(result, cache: dict) -> list[dict]:
    """`rle_encode` of each mask, reusing those in `cache` (box bytes -> (pixel count, RLE)) for
    the same image, where a box always gets the same mask; the pixel count guards the reuse.
    Saves 1-3 ms per 1200 x 800 mask on every slider move. `cache` keeps the RLE_CACHE_ENTRIES
    most recently used entries (a session's memory stays bounded however long it goes on)."""
    rles = []
    for box, mask in zip(result.boxes, result.masks, strict=True):
        key, area = box.tobytes(), int(np.count_nonzero(mask))
        entry = cache.pop(key, None)
        if entry is None or entry[0] != area:
            entry = (area, rle_encode(mask))
        cache[key] = entry  # (re)inserted last: the most recently used
        rles.append(entry[1])
    for key in list(cache)[: max(0, len(cache) - RLE_CACHE_ENTRIES)]:
        del cache[key]
    return rles


def write_exports(
    image: np.ndarray, result, name: str, *, with_zip: bool, folder: Path, rles: list | None = None
) -> list[str]:
    """[COCO JSON] or [COCO JSON, ZIP of masks and cut-outs], written once each to `folder` (the
    ZIP streamed: see `export.write_zip`). `name` is the image's file name, recorded in the
    COCO JSON; `rles` the masks' RLEs if known (see `export.to_coco`).

    The ZIP is opt-in: it encodes two PNGs per object (seconds for a hundred objects), too slow
    for every slider move.

    Raises:
        ValueError: the ZIP would pass MAX_ZIP_BYTES (the partial file is removed).
    """
    height, width = image.shape[:2]
    coco = to_coco(result, file_name=name, width=width, height=height, rles=rles)
    stem = Path(name).stem
    json_path, zip_path = folder / f"{stem}_coco.json", folder / f"{stem}_masks.zip"
    json_path.write_text(json.dumps(coco))
    if not with_zip:
        return [str(json_path)]
    try:
        write_zip(zip_path, image, result, file_name=name, coco=coco, max_bytes=MAX_ZIP_BYTES)
    except ValueError:
        zip_path.unlink(missing_ok=True)
        raise
    return [str(json_path), str(zip_path)]
