"""What the app shows for one result: the detections table, the summary line, the legend chips,
the annotated image as a JPEG file and the export files (COCO JSON, ZIP of masks and cut-outs).
No Gradio here."""

from __future__ import annotations

import html
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from segmentation.export import rle_encode, to_coco, to_zip
from segmentation.visualize import legend

TABLE_HEADERS = ["#", "phrase", "score", "x0", "y0", "x1", "y1", "mask px", "mask score"]
EXPORT_MAX_AGE_S = 3600


def table(result) -> pd.DataFrame:
    """One row per detection: phrase, score, box corners, mask pixels and SAM's mask score."""
    rows = [[i + 1, phrase, round(float(score), 3), *(int(round(float(v))) for v in box),
             np.count_nonzero(mask), round(float(mask_score), 3)]
            for i, (phrase, score, box, mask, mask_score) in enumerate(zip(
                result.phrases, result.scores, result.boxes, result.masks, result.mask_scores,
                strict=True))]
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def summary(result, prompt: str, box_threshold: float, seconds: float) -> str:
    """Markdown: what was found, per phrase, or why nothing was."""
    if len(result) == 0:
        return (f"**No objects found** for “{prompt.strip()[:80]}” above box threshold "
                f"{box_threshold:.2f}. Lower the box threshold, or name the objects "
                "differently (short nouns separated by “.” work best).")
    counts = Counter(result.prompt_phrases[int(i)] for i in result.phrase_ids)
    found = ", ".join(f"{phrase} × {n}" for phrase, n in counts.most_common())
    noun = "object" if len(result) == 1 else "objects"
    message = f"**Found {len(result)} {noun}:** {found} ({seconds:.2f} s)"
    if result.omitted:
        message += (f". Showing the best {len(result)} of {len(result) + result.omitted} "
                    "detections above the box threshold; raise it to see fewer.")
    return message


def legend_html(result) -> str:
    """Colour chips, one per prompt phrase, in the colours of the annotated image."""
    counts = Counter(int(i) for i in result.phrase_ids)
    chips = [f'<span class="chip"><span class="swatch" style="background:{color}"></span>'
             f"{html.escape(phrase)} ({counts.get(index, 0)})</span>"
             for index, (phrase, color) in enumerate(legend(result))]
    return f'<div class="legend">{"".join(chips)}</div>'


_pruned_at: dict[Path, float] = {}  # export root -> time.monotonic() of its last pruning


def _prune_exports(root: Path) -> None:
    """Remove run folders older than EXPORT_MAX_AGE_S; at most once a minute (every slider move
    makes a folder, and listing them all each time grows with the hour's moves)."""
    now = time.monotonic()
    if now - _pruned_at.get(root, float("-inf")) < 60:
        return
    _pruned_at[root] = now
    cutoff = time.time() - EXPORT_MAX_AGE_S
    for folder in root.glob("run-*"):
        try:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:  # another process pruned it first
            pass


def export_folder(parent: str | Path | None = None) -> Path:
    """A fresh folder for one run's files, in `parent`/grounded-sam-exports (default: the
    system's temporary folder); run folders older than an hour are removed."""
    root = Path(parent or tempfile.gettempdir()) / "grounded-sam-exports"
    root.mkdir(parents=True, exist_ok=True)
    _prune_exports(root)
    return Path(tempfile.mkdtemp(prefix="run-", dir=root))


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
    Saves 1-3 ms per 1200 x 800 mask on every slider move."""
    rles = []
    for box, mask in zip(result.boxes, result.masks, strict=True):
        key, area = box.tobytes(), int(np.count_nonzero(mask))
        if key not in cache or cache[key][0] != area:
            cache[key] = (area, rle_encode(mask))
        rles.append(cache[key][1])
    return rles


def write_exports(image: np.ndarray, result, name: str, *, with_zip: bool,
                  folder: Path | None = None, rles: list | None = None) -> list[str]:
    """[COCO JSON] or [COCO JSON, ZIP of masks and cut-outs], written to `folder` (default: a
    fresh `export_folder()`). `name` is the image's file name, recorded in the COCO JSON;
    `rles` the masks' RLEs if known (see `export.to_coco`).

    The ZIP is opt-in: it encodes two PNGs per object (seconds for a hundred objects), too slow
    for every slider move.
    """
    folder = folder if folder is not None else export_folder()
    height, width = image.shape[:2]
    coco = to_coco(result, file_name=name, width=width, height=height, rles=rles)
    stem = Path(name).stem
    json_path, zip_path = folder / f"{stem}_coco.json", folder / f"{stem}_masks.zip"
    json_path.write_text(json.dumps(coco))
    if not with_zip:
        return [str(json_path)]
    zip_path.write_bytes(to_zip(image, result, file_name=name))
    return [str(json_path), str(zip_path)]
