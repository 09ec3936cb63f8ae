"""Loading what users upload: bad files, huge images, every pixel format, EXIF rotation."""

import io
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from segmentation.images import load_image, rgb_array


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def pixels(source, **options) -> np.ndarray:
    image = load_image(source, **options)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_png_from_bytes_path_pil_and_array_are_the_same_pixels(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    data = encode(Image.fromarray(array))
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    for source in (data, path, str(path), Image.fromarray(array), array):
        np.testing.assert_array_equal(pixels(source), array)


def test_rgb_arrays_pass_through_without_a_copy():
    array = np.zeros((5, 6, 3), np.uint8)
    assert np.shares_memory(rgb_array(array), array)
    assert rgb_array(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, this is a text file\n" * 10, "not an image"),
    (np.random.default_rng(0).bytes(5000), "not an image"),
])
def test_empty_and_non_image_uploads_are_value_errors(data, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_image(data)
    path = tmp_path / "upload.jpg"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        load_image(path)


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_truncated_files_are_value_errors(format):
    array = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(array), format)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_missing_files_and_other_types_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="got int"):
        load_image(42)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels but carries almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(ValueError, match="too large"):
        load_image(png_header_only(100_000, 100_000))


def test_images_pillow_only_warns_about_are_loaded_without_a_warning(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.new("RGB", (40, 30), (10, 20, 30)))  # 1200 px: Pillow warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(data).size == (40, 30)
    with pytest.raises(ValueError, match="too large"):
        load_image(encode(Image.new("RGB", (50, 50))))  # 2500 px > 2 x 1000: refused


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_large_images_are_resized_to_the_pixel_cap(format):
    ramp = np.tile(np.linspace(0, 255, 1200).astype(np.uint8), (800, 1))
    data = encode(Image.fromarray(np.dstack([ramp] * 3)), format)
    image = load_image(data, max_pixels=60_000)
    assert image.width * image.height <= 60_000
    assert image.width * image.height > 50_000 and abs(image.width / image.height - 1.5) < 0.02
    row = np.asarray(image)[image.height // 2, :, 0].astype(int)
    expected = np.linspace(0, 255, image.width)
    assert np.abs(row - expected).max() < 6  # the content is resized, not cropped
    assert load_image(data, max_pixels=None).size == (1200, 800)


def test_alpha_is_composited_on_white():
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], np.uint8)
    expected = [[255, 255, 255], [255, 0, 0], [127, 127, 255]]
    for source in (encode(Image.fromarray(rgba)), rgba):
        np.testing.assert_allclose(pixels(source)[0], expected, atol=1)
    gray_alpha = Image.fromarray(rgba[..., [1, 3]], mode="LA")
    np.testing.assert_allclose(pixels(encode(gray_alpha))[0, :, 0], [255, 0, 127], atol=1)


def test_palette_with_a_transparent_entry():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 200, 0, 0, 0, 200] + [0] * 762)
    palette.putdata([0, 1])
    opaque = pixels(encode(palette))
    np.testing.assert_array_equal(opaque[0], [[0, 200, 0], [0, 0, 200]])
    transparent = pixels(encode(palette, transparency=1))
    np.testing.assert_array_equal(transparent[0], [[0, 200, 0], [255, 255, 255]])


def test_grayscale_bilevel_and_cmyk():
    gray = np.array([[0, 100, 255]], np.uint8)
    np.testing.assert_array_equal(pixels(encode(Image.fromarray(gray)))[0], np.repeat(
        gray[0, :, None], 3, axis=1))
    bilevel = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    np.testing.assert_array_equal(pixels(encode(bilevel))[0], [[0, 0, 0], [255, 255, 255]])
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    np.testing.assert_array_equal(pixels(encode(cmyk, "TIFF"))[0, 0], [255, 0, 0])
    np.testing.assert_allclose(pixels(encode(cmyk, "JPEG", quality=95))[0, 0], [255, 0, 0],
                               atol=4)


def test_sixteen_bit_images_are_scaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    expected = [0, 128, 255, 4]
    gray16 = Image.fromarray(values)
    assert Image.open(io.BytesIO(encode(gray16))).mode.startswith("I")
    np.testing.assert_array_equal(pixels(encode(gray16))[0, :, 0], expected)
    np.testing.assert_array_equal(pixels(values)[0, :, 1], expected)
    np.testing.assert_array_equal(pixels(Image.fromarray(values.astype(np.int32)))[0, :, 2],
                                  expected)
    rgb16 = np.zeros((2, 3, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 2] = 65535, 257 * 100
    ok, png = cv2.imencode(".png", rgb16[..., ::-1].copy())  # a 16-bit RGB PNG
    assert ok
    np.testing.assert_array_equal(pixels(png.tobytes())[0, 0], [255, 0, 100])
    np.testing.assert_array_equal(pixels(rgb16)[0, 0], [255, 0, 100])


def test_exif_orientation_is_applied():
    left_red_right_blue = np.zeros((20, 40, 3), np.uint8)
    left_red_right_blue[:, :20, 0] = 255
    left_red_right_blue[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    data = encode(Image.fromarray(left_red_right_blue), "JPEG", quality=95, exif=exif.tobytes())
    upright = pixels(data)
    assert upright.shape == (40, 20, 3)
    np.testing.assert_allclose(upright[:15].mean(axis=(0, 1)), [255, 0, 0], atol=8)
    np.testing.assert_allclose(upright[25:].mean(axis=(0, 1)), [0, 0, 255], atol=8)


@pytest.mark.parametrize("array, expected", [
    (np.array([[7, 8]], np.uint8), [[7, 7, 7], [8, 8, 8]]),
    (np.array([[[7], [8]]], np.uint8), [[7, 7, 7], [8, 8, 8]]),
    (np.array([[True, False]]), [[255, 255, 255], [0, 0, 0]]),
    (np.array([[[1.0, 0.5, 0.0]]], np.float32), [[255, 128, 0]]),
])
def test_arrays_of_other_shapes_and_types(array, expected):
    np.testing.assert_array_equal(pixels(array)[0], expected)


@pytest.mark.parametrize("array, message", [
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((4, 5, 2), np.uint8), "shape"),
    (np.zeros((4, 5, 3), np.int64), "int64"),
    (np.full((4, 5, 3), 2.0), r"\[0, 1\]"),
    (np.full((4, 5, 3), np.nan), r"\[0, 1\]"),
])
def test_unusable_arrays_are_value_errors(array, message):
    with pytest.raises(ValueError, match=message):
        load_image(array)
