"""Size and time of the app's exports (COCO JSON + ZIP of masks and cut-outs) in the worst cases.

    python scripts/benchmark_exports.py [--side 3000] [--detections 100]

Rows: (1) the bound: `--detections` detections whose boxes and masks all cover the whole image,
for a photo (assets/street.jpg scaled up) and for random noise (incompressible); (2) the offline
app pipeline at box threshold 0 on the scaled-up photo. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from segmentation import report  # noqa: E402
from segmentation.build import load_pipeline  # noqa: E402
from segmentation.results import SegmentedDetections  # noqa: E402


def picture(kind: str, side: int) -> np.ndarray:
    if kind == "noise":
        return np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
    street = Image.open(ROOT / "assets" / "street.jpg").convert("RGB")
    return np.asarray(street.resize((side, side)))


def whole_image_result(count: int, side: int) -> SegmentedDetections:
    return SegmentedDetections(
        boxes=np.tile(np.array([[0, 0, side, side]], np.float32), (count, 1)),
        scores=np.linspace(0.9, 0.1, count, dtype=np.float32), phrases=["car"] * count,
        phrase_ids=np.zeros(count, np.int64), prompt_phrases=["car"],
        masks=np.ones((count, side, side), bool), mask_scores=np.ones(count, np.float32))


def export(image: np.ndarray, result: SegmentedDetections) -> tuple[float, float, float]:
    """(seconds, JSON MB, ZIP MB) of `report.write_exports` without the size bound."""
    folder = Path(tempfile.mkdtemp())
    limit, report.MAX_ZIP_BYTES = report.MAX_ZIP_BYTES, 1 << 62
    try:
        start = time.perf_counter()
        json_path, zip_path = report.write_exports(image, result, "image.png", with_zip=True,
                                                   folder=folder)
        seconds = time.perf_counter() - start
    finally:
        report.MAX_ZIP_BYTES = limit
    sizes = Path(json_path).stat().st_size / 1e6, Path(zip_path).stat().st_size / 1e6
    for path in (json_path, zip_path):
        Path(path).unlink()
    return seconds, *sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=3000)
    parser.add_argument("--detections", type=int, default=100)
    args = parser.parse_args()
    rows = []
    for kind in ("photo", "noise"):
        seconds, json_mb, zip_mb = export(picture(kind, args.side),
                                          whole_image_result(args.detections, args.side))
        rows.append((f"{args.detections} whole-image detections, {kind}", seconds, json_mb,
                     zip_mb))
    image = picture("photo", args.side)
    result = load_pipeline(offline=True).run(image, "car . house . tree .", 0.0, 0.25,
                                              max_detections=args.detections)
    seconds, json_mb, zip_mb = export(image, result)
    rows.append((f"offline models, box threshold 0 ({len(result)} detections), photo", seconds,
                 json_mb, zip_mb))
    print(f"{args.side} x {args.side} image; ZIP bound in the app: "
          f"{report.MAX_ZIP_BYTES / 1e9:.1f} GB")
    print("| case | export s | JSON MB | ZIP MB |")
    print("|---|---|---|---|")
    for name, seconds, json_mb, zip_mb in rows:
        print(f"| {name} | {seconds:.1f} | {json_mb:.1f} | {zip_mb:.1f} |")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")


if __name__ == "__main__":
    main()
