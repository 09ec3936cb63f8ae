"""The app's HTTP API, end to end: app.py served on localhost in offline mode, called with
gradio_client exactly as a user's script would (tiny random-weight models, no downloads)."""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "red circle . blue square ."


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Small files of the kinds users upload, good and bad."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    scene = np.asarray(Image.open(ROOT / "assets" / "shapes.jpg").resize((96, 72)))
    paths = {}

    def save(name, image, **kwargs):
        paths[name] = folder / name
        image.save(paths[name], **kwargs)

    save("rgb.png", Image.fromarray(scene))
    save("gray.png", Image.fromarray(scene).convert("L"))
    save("rgba.png", Image.fromarray(np.dstack([scene, np.full(scene.shape[:2], 128, np.uint8)])))
    save("cmyk.jpg", Image.fromarray(scene).convert("CMYK"))
    save("16bit.png", Image.fromarray((rng.random((72, 96)) * 65535).astype(np.uint16)))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to display
    save("rotated.jpg", Image.fromarray(scene), exif=exif)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all")
    (folder / "truncated.jpg").write_bytes((folder / "cmyk.jpg").read_bytes()[:200])
    paths.update({name: folder / name for name in ("empty.png", "text.png", "truncated.jpg")})
    return paths


def segment(client, path, prompt=PROMPT, box=0.0, text=0.0) -> dict:
    """/segment; text threshold 0 by default, so every label is its whole phrase."""
    return client.predict(handle_file(str(path)), prompt, box, text, api_name="/segment")


def masks_of(result: dict) -> list[np.ndarray]:
    from segmentation.export import rle_decode

    return [rle_decode(rle) for rle in result["masks"]]


def test_named_endpoints_are_public_and_ui_events_are_not(served):
    _, client = served
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/segment", "/annotate"} <= set(endpoints)
    assert not {"/ui_segment", "/ui_rethreshold", "/load_on_page_open"} & set(endpoints)
    names = [p["parameter_name"] for p in endpoints["/segment"]["parameters"]]
    assert names == ["image", "prompt", "box_threshold", "text_threshold"]


def test_segment_returns_boxes_phrases_and_decodable_masks(served, images):
    _, client = served
    result = segment(client, images["rgb.png"], box=0.0)
    n = len(result["boxes"])
    assert n > 0, "box threshold 0 keeps every query"
    assert len(result["scores"]) == len(result["phrases"]) == len(result["masks"]) == n
    assert (result["width"], result["height"]) == (96, 72)
    assert result["prompt_phrases"] == ["red circle", "blue square"]
    assert result["phrases"] == [result["prompt_phrases"][i] for i in result["phrase_ids"]]
    assert result["scores"] == sorted(result["scores"], reverse=True)
    assert result["omitted"] == 0
    boxes = np.array(result["boxes"])
    assert boxes.shape == (n, 4)
    assert (boxes[:, :2] <= boxes[:, 2:]).all() and (boxes >= 0).all()
    assert (boxes[:, [0, 2]] <= 96).all() and (boxes[:, [1, 3]] <= 72).all()
    for mask in masks_of(result):
        assert mask.shape == (72, 96) and mask.dtype == bool


def test_threshold_change_refilters_without_running_the_models(served, images):
    handlers, client = served
    everything = segment(client, images["rgb.png"], box=0.0)
    stats = handlers.pipeline().stats
    runs = (stats.detector_runs, stats.image_embeddings)
    threshold = float(np.median(everything["scores"]))
    kept = segment(client, images["rgb.png"], box=threshold)
    assert (stats.detector_runs, stats.image_embeddings) == runs, "a model ran again"
    expected = [s for s in everything["scores"] if s > threshold]
    assert 0 < len(kept["scores"]) < len(everything["scores"])
    assert kept["scores"] == pytest.approx(expected)
    np.testing.assert_allclose(kept["boxes"], everything["boxes"][:len(expected)])


def test_no_detections_is_an_empty_result_not_an_error(served, images):
    _, client = served
    result = segment(client, images["rgb.png"], box=1.0)
    assert result["boxes"] == result["scores"] == result["phrases"] == result["masks"] == []


def test_annotate_returns_png_coco_json_and_zip(served, images):
    _, client = served
    annotated, coco_path, zip_path = client.predict(
        handle_file(str(images["rgb.png"])), PROMPT, 0.0, 0.0, api_name="/annotate")
    assert Path(annotated).suffix == ".png"
    assert Image.open(annotated).size == (96, 72)
    coco = json.loads(Path(coco_path).read_text())
    assert [c["name"] for c in coco["categories"]] == ["red circle", "blue square"]
    assert coco["images"][0]["width"] == 96 and coco["images"][0]["height"] == 72
    assert len(coco["annotations"]) > 0
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    assert sum(name.endswith(".png") for name in names) >= len(coco["annotations"])


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "cmyk.jpg", "16bit.png"])
def test_unusual_image_modes_are_accepted(served, images, name):
    _, client = served
    result = segment(client, images[name], box=0.6)
    assert (result["width"], result["height"]) == (96, 72)
    assert all(mask.shape == (72, 96) for mask in masks_of(result))


def test_exif_rotation_is_applied(served, images):
    _, client = served
    result = segment(client, images["rotated.jpg"], box=0.6)
    assert (result["width"], result["height"]) == (72, 96)
    assert all(mask.shape == (96, 72) for mask in masks_of(result))


@pytest.mark.parametrize("name", ["empty.png", "text.png", "truncated.jpg"])
def test_unreadable_uploads_give_a_clear_error_and_the_server_keeps_serving(served, images,
                                                                              name):
    _, client = served
    with pytest.raises(AppError, match="cannot be used as an image"):
        segment(client, images[name])
    assert len(segment(client, images["rgb.png"])["boxes"]) > 0


@pytest.mark.parametrize(("prompt", "box", "message"), [
    ("", 0.3, "Type what to find"),
    ("   . ", 0.3, "Type what to find"),
    ("x" * 5000, 0.3, "limit"),
    ("ball " * 300, 0.3, "one phrase of the prompt has"),
    (PROMPT, 1.5, "between 0 and 1"),
])
def test_bad_prompts_and_thresholds_give_clear_errors(served, images, prompt, box, message):
    _, client = served
    with pytest.raises(AppError, match=message):
        segment(client, images["rgb.png"], prompt=prompt, box=box)
    assert len(segment(client, images["rgb.png"])["boxes"]) > 0


def test_long_prompt_and_the_detection_cap(served, images, monkeypatch):
    """Over 256 tokens: the detector runs several text passes, each adding its own boxes; of
    those above the threshold the API returns the best MAX_DETECTIONS and counts the rest."""
    handlers, client = served
    # 200 phrases of 2 words, 600 tokens: 3 text passes of the offline detector's 50 queries.
    phrases = [f"{letter} {digit}" for letter in "abcdefghijklmnopqrst" for digit in range(10)]
    prompt = " . ".join(phrases)
    capped = segment(client, images["rgb.png"], prompt=prompt, box=0.0)
    assert len(capped["boxes"]) == len(capped["masks"]) == handlers.max_detections == 100
    assert capped["omitted"] > 0

    monkeypatch.setattr(handlers, "max_detections", None)
    everything = segment(client, images["rgb.png"], prompt=prompt, box=0.0)
    monkeypatch.undo()
    assert everything["omitted"] == 0
    assert len(everything["boxes"]) == len(capped["boxes"]) + capped["omitted"]
    assert capped["scores"] == everything["scores"][:len(capped["scores"])], "not the best ones"
    assert capped["boxes"] == everything["boxes"][:len(capped["boxes"])]
    assert everything["prompt_phrases"] == phrases
    assert set(everything["phrases"]) <= set(phrases)
    assert max(everything["phrase_ids"]) >= 100, "phrases past token 256 were dropped"

    _, coco_path, _ = client.predict(handle_file(str(images["rgb.png"])), prompt, 0.0, 0.0,
                                     api_name="/annotate")
    assert len(json.loads(Path(coco_path).read_text())["annotations"]) == len(capped["boxes"])


def test_huge_image_is_downscaled_not_fatal(served, tmp_path):
    from segmentation.images import MAX_PIXELS

    _, client = served
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (10000, 7500), (40, 90, 200)).save(path, quality=50)
    result = segment(client, path, box=1.0)
    assert result["width"] * result["height"] <= MAX_PIXELS
    assert result["width"] / result["height"] == pytest.approx(10000 / 7500, rel=0.01)


def test_decompression_bomb_is_refused_with_a_message(served, images, tmp_path):
    """A PNG header claiming 40000 x 40000 pixels: refused before anything is decoded."""
    _, client = served

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))
    with pytest.raises(AppError, match="too large"):
        segment(client, bomb)
    assert len(segment(client, images["rgb.png"])["boxes"]) > 0
