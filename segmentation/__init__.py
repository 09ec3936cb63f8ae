"""Segment Anything (SAM), prompted by Grounding DINO's boxes: the Grounded SAM pipeline.

import segmentation
pipeline = segmentation.load_pipeline()            # SwinT-OGC + SAM ViT-B
image = segmentation.load_image("cats.jpg")
result = pipeline.run(image, "a cat . a remote control .", box_threshold=0.35)
picture = segmentation.annotate(image, result)     # (H, W, 3) uint8 RGB
coco = segmentation.to_coco(result, file_name="cats.jpg", width=image.width,
                            height=image.height)
"""

from segmentation.build import load_pipeline
from segmentation.export import (
    rle_decode,
    rle_encode,
    to_coco,
    to_json_dict,
    to_zip,
    write_zip,
)
from segmentation.images import load_image
from segmentation.look_ahead import LookAhead
from segmentation.pipeline import GroundedSAM
from segmentation.results import CacheMiss, SegmentedDetections
from segmentation.runner import PipelineStats
from segmentation.sam import (
    SAM_CHECKPOINTS,
    BoxSegmenter,
    ImageEmbedding,
    build_sam,
    sam_checkpoint,
)
from segmentation.visualize import annotate, annotated_image_value, legend

__all__ = [
    "SAM_CHECKPOINTS",
    "BoxSegmenter",
    "CacheMiss",
    "GroundedSAM",
    "ImageEmbedding",
    "LookAhead",
    "PipelineStats",
    "SegmentedDetections",
    "annotate",
    "annotated_image_value",
    "build_sam",
    "legend",
    "load_image",
    "load_pipeline",
    "rle_decode",
    "rle_encode",
    "sam_checkpoint",
    "to_coco",
    "to_json_dict",
    "to_zip",
    "write_zip",
]
