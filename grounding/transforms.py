"""Input pipeline: the reference's resize and normalisation, and batching with a padding mask.

Reference: `RandomResize([800], max_size=1333)` then `ToTensor` and ImageNet `Normalize`
(reference study §2). The resize is PIL's bilinear filter on the uint8 image, as torchvision
applies it to PIL images, so our pixels equal the reference's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_pil_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL RGB image from a PIL image (any mode) or an H x W x 3 uint8 RGB array.

    Raises:
        ValueError: for any other type, shape or dtype, or an empty image.
    """
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError("the image is empty (0 pixels)")
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 RGB array, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB array, got dtype {image.dtype}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError("the image is empty (0 pixels)")
        return Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    raise ValueError(
        f"expected a PIL image or an H x W x 3 uint8 numpy array, got {type(image).__name__}"
    )


def resized_size(
    width: int,
    height: int,
    size: int = 800,
    max_size: int = 1333,
) -> tuple[int, int]:
    """(width, height) after the reference resize: short side `size`, long side <= `max_size`."""
    short, long = min(width, height), max(width, height)
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess(image: Image.Image | np.ndarray, size: int = 800, max_size: int = 1333) -> Tensor:
    """(3, H, W) float32: the image resized and normalised as the reference does."""
    pil = to_pil_rgb(image)
    new_size = resized_size(pil.width, pil.height, size, max_size)
    if new_size != pil.size:
        pil = pil.resize(new_size, Image.Resampling.BILINEAR)
    # (H, W, 3) uint8 -> (3, H, W) float in [0, 1]
    pixels = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)
    pixels = pixels.float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def batch_images(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad (3, H_i, W_i) images bottom/right to one batch.

    Returns:
        pixels (B, 3, H, W) zero-padded, and padding_mask (B, H, W) bool, True on padding.
    """
    if not images:
        raise ValueError("no images to batch")
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    pixels = images[0].new_zeros(len(images), 3, height, width)
    padding_mask = torch.ones(len(images), height, width, dtype=torch.bool, device=images[0].device)
    for index, image in enumerate(images):
        pixels[index, :, : image.shape[-2], : image.shape[-1]] = image
        padding_mask[index, : image.shape[-2], : image.shape[-1]] = False
    return pixels, padding_mask
