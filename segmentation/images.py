"""Images from wherever users have them, as 8-bit RGB, or a ValueError that says what is wrong.

Handles files and uploads that are empty, corrupt or not images; decompression bombs (the size is
read from the file's header before any pixel is decoded: JPEGs larger than `max_pixels` are decoded
at 1/2, 1/4 or 1/8 scale, and whatever would still decode to more than MAX_DECODE_PIXELS (40 MP) is
refused with a message naming its size; anything over `max_pixels` is then resized); images too thin
to detect anything in (one side more than MAX_ASPECT_RATIO times the other: the detector would
shrink the short side below a pixel); every Pillow mode (grayscale, palette, alpha composited on
white, CMYK, 16-bit scaled to 8 bits); and the EXIF orientation tag.
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Larger images are resized to this many pixels. 4096 x 4096 keeps phone photos (12 MP) whole; the
# models see at most 1333 px (Grounding DINO) and 1024 px (SAM), so more only costs memory.
MAX_PIXELS = 4096 * 4096
# No file decodes to more pixels than this (about 160 MB as RGBA): larger ones are refused from
# their header. A 20 KB PNG can claim 13000 x 13000 pixels (1.6 GB and tens of seconds to decode).
MAX_DECODE_PIXELS = 40_000_000
# Long side / short side. Grounding DINO resizes the long side to at most 1333 px, so beyond this
# the short side would be under 67 px; at 20000 x 1 it would be 0.
MAX_ASPECT_RATIO = 20
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def load_image(
    source: str | os.PathLike | bytes | Image.Image | np.ndarray,
    *,
    max_pixels: int | None = MAX_PIXELS,
) -> Image.Image:
    """An RGB PIL image, upright, with at most `max_pixels` pixels.

    Args:
        source: a file path, the bytes of an image file, a PIL image (any mode), or an array:
            (H, W) gray, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA, of uint8, uint16, bool, or
            floats in [0, 1].
        max_pixels: larger images are resized (aspect kept) to fit; None keeps every pixel
            (files still decode to at most MAX_DECODE_PIXELS).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: empty, corrupt, not an image, too large to decode (over MAX_DECODE_PIXELS
            once a JPEG's reduced decoding is used), too thin (`check_shape`), or an unusable
            array.
    """
    if isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, Image.Image):
        image = source
    elif isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ValueError("the uploaded file is empty (0 bytes)")
        image = _open(io.BytesIO(source), "the uploaded file", max_pixels)
    elif isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no image file at {path}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path} is empty (0 bytes)")
        image = _open(path, path, max_pixels)
    else:
        raise ValueError(
            "expected an image file path, its bytes, a PIL image or a numpy array, "
            f"got {type(source).__name__}"
        )
    check_shape(image.width, image.height)
    image = to_rgb(_upright(image))
    if max_pixels is not None and image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def check_shape(width: int, height: int) -> None:
    """Raise a ValueError for an image with no pixels or one too thin to detect anything in."""
    if width <= 0 or height <= 0:
        raise ValueError("the image is empty (0 pixels)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(
            f"the image is too thin ({width} x {height} pixels): its long side may be "
            f"at most {MAX_ASPECT_RATIO} times its short side"
        )


def rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the array itself when it already is one, else `load_image` at full size.

    The same conversion everywhere (pipeline, drawing, export) keeps masks and pictures aligned.
    """
    if (
        isinstance(image, np.ndarray)
        and image.ndim == 3
        and image.shape[2] == 3
        and image.dtype == np.uint8
        and image.size
    ):
        return np.ascontiguousarray(image)
    return np.asarray(load_image(image, max_pixels=None))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any Pillow mode: alpha composited on white, 16-bit gray scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32)
        if image.mode != "I" or values.max(initial=0) > 255:  # 16-bit range -> 8-bit range
            values = values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _open(source: str | io.BytesIO, name: str, max_pixels: int | None) -> Image.Image:
    """Decode a file, turning Pillow's errors into ValueErrors that name `name`."""
    with warnings.catch_warnings():
        # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; such images are resized below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as error:
            raise ValueError(
                f"{name} is too large to open safely ({error}); resize it below 100 megapixels"
            ) from error
        except UnidentifiedImageError as error:
            raise ValueError(
                f"{name} is not an image (or not in a format Pillow reads: PNG, "
                "JPEG, WebP, GIF, BMP, TIFF, ...)"
            ) from error
        width, height = image.size  # from the header: nothing is decoded yet
        check_shape(width, height)
        limit = min(max_pixels or MAX_DECODE_PIXELS, MAX_DECODE_PIXELS)
        if width * height > limit:
            scale = math.sqrt(limit / (width * height))
            # JPEG decodes at 1/2, 1/4 or 1/8 scale here (no other format does): far less memory.
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        if image.width * image.height > MAX_DECODE_PIXELS:
            raise ValueError(
                f"{name} is too large: {width} x {height} pixels "
                f"({width * height / 1e6:.0f} MP); the limit is "
                f"{MAX_DECODE_PIXELS / 1e6:.0f} MP"
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"{name} is corrupt or truncated ({error})") from error
    return image


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, as cameras and browsers do."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):  # unreadable EXIF: keep as is
        return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.size == 0:
        raise ValueError(f"the image is empty (array of shape {array.shape})")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(
            "expected an (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA array, "
            f"got shape {array.shape}"
        )
    if array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise ValueError("a float image array must hold values in [0, 1]")
        array = np.rint(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"expected a uint8, uint16, bool or float image array, got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))  # L, RGB or RGBA from the shape
