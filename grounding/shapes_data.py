"""Synthetic shapes: a small grounding and segmentation data set with exact boxes and masks.

Trains, evaluates and tests the small from-scratch Grounding DINO and SAM. This module writes
COCO-format splits (`generate_split`) and is the command line; the images and their geometry,
colours and masks are `grounding.shapes_drawing`'s, the 12 category names ("red circle" ...
"yellow triangle") `grounding.shapes_categories`'.

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
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from grounding.shapes_categories import CATEGORIES, CATEGORY_IDS
from grounding.shapes_drawing import ShapesImage, generate_image

VAL_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_003
# Fast zlib level with one fixed filter: about 6 ms for a 450 x 450 image, against 10 ms with
# libpng's adaptive filter choice, for the same size (pixel noise makes PNGs ~1 byte a pixel).
_PNG_OPTIONS = (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_AVG)


def coco_categories() -> list[dict]:
    """The COCO "categories" list: id 1..12, name, supercategory "shape"."""
    return [
        {"id": CATEGORY_IDS[name], "name": name, "supercategory": "shape"} for name in CATEGORIES
    ]


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
