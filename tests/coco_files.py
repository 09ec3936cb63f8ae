"""A small COCO-format detection set of drawn rectangles, written into a test's folder."""

import json
from pathlib import Path

from PIL import Image, ImageDraw

CATEGORIES = {1: "red square", 2: "blue circle", 3: "green triangle", 4: "yellow star",
              5: "traffic light", 6: "hair drier", 7: "St. Bernard", 8: "toaster"}
COLOURS = {1: (220, 30, 30), 2: (30, 30, 220), 3: (30, 200, 30), 4: (230, 220, 20),
           5: (200, 120, 0), 6: (120, 0, 120), 7: (90, 60, 30), 8: (10, 200, 200)}
# image id -> (width, height, [(category id, x, y, w, h), ...])
IMAGES = {
    1: (96, 64, [(1, 8, 6, 30, 20), (2, 50, 20, 40, 36)]),
    2: (64, 80, [(3, 4, 4, 24, 30), (1, 30, 40, 30, 30), (1, 2, 50, 20, 20)]),
    3: (120, 90, [(5, 10, 10, 50, 60), (6, 70, 30, 40, 40)]),
    4: (72, 72, []),
}


def write_coco(root: Path, extra_annotations: list[dict] = (), corrupt_image: bool = False,
               ) -> tuple[Path, Path]:
    """A small COCO dataset of drawn rectangles under `root`; returns (image folder, JSON)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (width, height, boxes) in IMAGES.items():
        image = Image.new("RGB", (width, height), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        for category_id, x, y, w, h in boxes:
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[category_id])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0, "segmentation": []})
        image.save(image_dir / f"{image_id:04d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:04d}.png", "width": width,
                       "height": height})
    if corrupt_image:
        (image_dir / "broken.jpg").write_bytes(b"\x00garbage, not an image" * 10)
        images.append({"id": 99, "file_name": "broken.jpg", "width": 50, "height": 50})
        annotations.append({"id": 990, "image_id": 99, "category_id": 1, "bbox": [1, 1, 20, 20],
                            "area": 400, "iscrowd": 0})
    annotations.extend(extra_annotations)
    categories = [{"id": cid, "name": name, "supercategory": "shape"}
                  for cid, name in CATEGORIES.items()]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return image_dir, path
