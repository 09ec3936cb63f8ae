"""The reference input pipeline: resize rule, normalisation, batching with a padding mask."""

import numpy as np
import pytest
import torch
from PIL import Image

from grounding.transforms import batch_images, preprocess, resized_size, to_pil_rgb


@pytest.mark.parametrize(("size", "expected"), [
    ((640, 480), (1066, 800)),     # short side to 800, long side floor(800 * 640 / 480)
    ((480, 640), (800, 1066)),
    ((800, 600), (1066, 800)),
    ((1066, 800), (1066, 800)),    # short side already 800: unchanged
    ((2000, 500), (1332, 333)),    # capped: short = round(1333 * 500 / 2000), long = int(333 * 4)
    ((100, 100), (800, 800)),
])
def test_resize_rule_matches_reference(size, expected):
    assert resized_size(*size) == expected


def test_preprocess_is_pil_bilinear_then_imagenet_normalisation():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    pixels = preprocess(array)
    assert pixels.shape == (3, 800, 1066)
    resized = np.asarray(Image.fromarray(array).resize((1066, 800), Image.BILINEAR))
    expected = (torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255
                - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(pixels, expected)


def test_pil_modes_become_rgb():
    gray = Image.new("L", (8, 6), 128)
    rgba = Image.new("RGBA", (8, 6), (10, 20, 30, 0))
    assert to_pil_rgb(gray).mode == "RGB"
    assert to_pil_rgb(rgba).getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("bad", [
    "image.png", np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
    np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8), None,
])
def test_wrong_image_types_give_value_error(bad):
    with pytest.raises(ValueError):
        to_pil_rgb(bad)


def test_batch_pads_bottom_right_and_marks_padding():
    a, b = torch.ones(3, 4, 6), torch.full((3, 5, 3), 2.0)
    pixels, mask = batch_images([a, b])
    assert pixels.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert torch.equal(pixels[0, :, :4, :6], a) and pixels[0, :, 4:].abs().sum() == 0
    assert torch.equal(pixels[1, :, :5, :3], b) and pixels[1, :, :, 3:].abs().sum() == 0
    assert (~mask[0]).sum() == 24 and mask[0, 4].all()
    assert (~mask[1]).sum() == 15 and mask[1, :, 3:].all()
