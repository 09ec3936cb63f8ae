"""Batch command line: a folder of images and a prompt -> annotated images and one COCO JSON.

    python -m segmentation.cli IMAGES_DIR --prompt "a cat . a remote control ." --out OUT_DIR

Writes OUT_DIR/<stem>_annotated.png per image (masks, boxes, "phrase score" labels),
OUT_DIR/annotations.json (COCO: one entry per image, boxes xywh, scores, RLE masks; one category
per prompt phrase) and, with --zip, OUT_DIR/<stem>_masks.zip (per-object PNG masks and cut-outs).
A file that fails (unreadable, too large, too thin, or anything else) is reported on stderr with its
name and skipped; the batch goes on. annotations.json is always written for the images processed,
also when the run is interrupted (Ctrl-C or SIGTERM). Exit status: 0 when at least one image was
processed, 1 when none was, 130 when interrupted.

The model flags and their environment variables are `segmentation.models`', shared with app.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from grounding.predictor import normalize_caption
from segmentation.models import add_model_arguments, load_models, model_choice

COCO_FILE = "annotations.json"


def merge_coco(parts: Sequence[dict]) -> dict:
    """One COCO dict from per-image ones: ids renumbered, categories matched by name."""
    merged: dict = {"images": [], "annotations": [], "categories": []}
    category_ids: dict[str, int] = {}
    for part in parts:
        local = {}
        for category in part["categories"]:
            if category["name"] not in category_ids:
                category_ids[category["name"]] = len(category_ids) + 1
                merged["categories"].append({**category, "id": category_ids[category["name"]]})
            local[category["id"]] = category_ids[category["name"]]
        merged["images"].extend(part["images"])
        for annotation in part["annotations"]:
            merged["annotations"].append(
                {
                    **annotation,
                    "id": len(merged["annotations"]) + 1,
                    "category_id": local[annotation["category_id"]],
                }
            )
    return merged


def output_stems(paths: Sequence[Path]) -> dict[Path, str]:
    """Output name stems, unique even when files differ only by extension (a.jpg, a.png)."""
    counts = Counter(path.stem for path in paths)
    return {
        path: path.stem if counts[path.stem] == 1 else f"{path.stem}_{path.suffix[1:]}"
        for path in paths
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m segmentation.cli",
        description="Detect and segment what a prompt names in every image of a folder.",
    )
    parser.add_argument("images", type=Path, help="folder of images (not searched recursively)")
    parser.add_argument(
        "--prompt",
        required=True,
        help='what to find, phrases separated by ".", e.g. "a cat . a remote ."',
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument(
        "--box-threshold",
        type=float,
        default=0.35,
        help="keep a box when its best word score is above this (default 0.35)",
    )
    parser.add_argument(
        "--text-threshold",
        type=float,
        default=0.25,
        help="words above this label a box; never removes one (default 0.25)",
    )
    parser.add_argument(
        "--zip",
        action="store_true",
        help="also write <stem>_masks.zip: per-object PNG masks and cut-outs",
    )
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    try:
        normalize_caption(args.prompt)
    except ValueError as error:
        parser.error(str(error))
    for name in ("box_threshold", "text_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    if not args.images.is_dir():
        parser.error(f"{args.images} is not a folder")
    if args.out.resolve() == args.images.resolve():
        parser.error("--out must differ from the image folder")
    try:
        args.models = model_choice(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the batch. Exit status: 0 when at least one image was processed, 1 when none was (or
    the models could not load), 130 when interrupted (Ctrl-C or SIGTERM). annotations.json is
    written in every case, with the images processed until then."""
    args = parse_args(argv)
    paths = sorted(p for p in args.images.iterdir() if p.is_file() and not p.name.startswith("."))
    if not paths:
        print(f"error: {args.images} has no files", file=sys.stderr)
        return 1
    print(f"loading {args.models.describe()}", file=sys.stderr)
    try:
        pipeline = load_models(args.models)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: could not load the models: {error}", file=sys.stderr)
        return 1
    try:  # a prompt no image can answer fails once, not once per file
        pipeline.detector.caption_tokens(normalize_caption(args.prompt))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    stems = output_stems(paths)
    coco_parts: list[dict] = []
    failed: list[str] = []
    interrupted = False
    with _sigterm_as_interrupt():
        try:
            for index, path in enumerate(paths, start=1):
                start = time.perf_counter()
                try:  # any failure on one file is reported, and the batch goes on
                    part = _process(pipeline, path, stems[path], args, len(coco_parts) + 1)
                except Exception as error:
                    failed.append(path.name)
                    print(
                        f"[{index}/{len(paths)}] skipped {path.name}: "
                        f"{type(error).__name__}: {error}",
                        file=sys.stderr,
                    )
                    continue
                coco_parts.append(part)
                print(
                    f"[{index}/{len(paths)}] {path.name}: {len(part['annotations'])} objects "
                    f"({time.perf_counter() - start:.1f} s)",
                    file=sys.stderr,
                )
        except KeyboardInterrupt:
            interrupted = True
            print(f"interrupted: writing the {len(coco_parts)} images done", file=sys.stderr)
        finally:
            _write_coco(args, coco_parts)
    found = sum(len(part["annotations"]) for part in coco_parts)
    print(
        f"{len(coco_parts)} images, {found} objects -> {args.out / COCO_FILE}"
        + (f"; skipped {len(failed)}: {', '.join(failed)}" if failed else "")
    )
    if interrupted:
        return 130
    return 0 if coco_parts else 1


def _process(pipeline, path: Path, stem: str, args: argparse.Namespace, image_id: int) -> dict:
    """Detect and segment one file, write its outputs, and return its COCO part."""
    import numpy as np
    from PIL import Image

    from segmentation.export import to_coco, write_zip
    from segmentation.images import load_image
    from segmentation.visualize import annotate

    image = np.asarray(load_image(path))
    result = pipeline.run(image, args.prompt, args.box_threshold, args.text_threshold)
    height, width = image.shape[:2]
    coco = to_coco(result, file_name=path.name, width=width, height=height, image_id=image_id)
    Image.fromarray(annotate(image, result)).save(args.out / f"{stem}_annotated.png")
    if args.zip:
        write_zip(args.out / f"{stem}_masks.zip", image, result, file_name=path.name, coco=coco)
    return coco


def _write_coco(args: argparse.Namespace, parts: list[dict]) -> None:
    """OUT/annotations.json for the images processed, replaced atomically (never half written)."""
    coco = {
        "info": {
            "description": "Grounded SAM detections",
            "prompt": args.prompt,
            "box_threshold": args.box_threshold,
            "text_threshold": args.text_threshold,
            "models": args.models.describe(),
        },
        **merge_coco(parts),
    }
    partial = args.out / f".{COCO_FILE}.part"
    partial.write_text(json.dumps(coco))
    os.replace(partial, args.out / COCO_FILE)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C meanwhile, so that a killed batch still writes what it did."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
