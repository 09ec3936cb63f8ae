"""A hostile caller of the HTTP API: raw calls with server paths, bombs, thin images, markup and odd
thresholds, against the offline app on localhost. Each is refused at once with a message that says
nothing about the server, and the server goes on serving."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "red circle . blue square ."
REFUSED = "The image must be uploaded"


def raw_call(client, endpoint: str, data: list) -> tuple[str, str]:
    """POST /gradio_api/call/<endpoint> as a script without gradio_client would, then read the
    event stream; returns (last event name, its data)."""
    base = client.src.rstrip("/")
    request = urllib.request.Request(
        f"{base}/gradio_api/call/{endpoint}", data=json.dumps({"data": data}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{base}/gradio_api/call/{endpoint}/{event_id}",
                                timeout=30) as stream:
        lines = stream.read().decode().splitlines()
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return events[-1], payloads[-1]


@pytest.fixture(scope="module")
def server_files(tmp_path_factory) -> dict[str, str]:
    """Paths on the server that no client uploaded."""
    folder = tmp_path_factory.mktemp("server-files")
    image = folder / "private.png"
    Image.open(ROOT / "assets" / "shapes.jpg").save(image)
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)
    return {"image outside the upload folder": str(image), "system file": "/etc/hostname",
            "directory": str(folder), "missing file": str(folder / "nothing-here.png"),
            "endless device": "/dev/zero", "FIFO": str(fifo),
            "traversal": os.path.join(os.environ.get("GRADIO_TEMP_DIR", "/tmp/gradio"),
                                      "..", "..", "etc", "hostname")}


@pytest.mark.parametrize("endpoint", ["segment", "annotate"])
@pytest.mark.parametrize("what", ["image outside the upload folder", "system file", "directory",
                                  "missing file", "endless device", "FIFO", "traversal"])
def test_server_paths_are_refused_at_once_without_details(served, server_files, endpoint, what):
    """Without `meta` Gradio hands the FileData to the handler as it came, and the handler refuses
    it; with `meta` Gradio's own check refuses it first, with an empty error message."""
    _, client = served
    path = server_files[what]
    for file_data, message in (({"path": path}, REFUSED),
                               ({"path": path, "meta": {"_type": "gradio.FileData"}}, "")):
        start = time.monotonic()
        event, data = raw_call(client, endpoint, [file_data, PROMPT, 0.35, 0.25])
        assert time.monotonic() - start < 10
        assert event == "error"
        assert message in data
        assert path not in data and "Errno" not in data and "No such file" not in data
        assert Path(path).name not in data


def test_a_link_in_the_upload_folder_leading_out_is_refused(served, server_files):
    _, client = served
    link = Path(os.environ.get("GRADIO_TEMP_DIR", "/tmp/gradio")) / "link.png"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(server_files["image outside the upload folder"])
    event, data = raw_call(client, "segment", [{"path": str(link)}, PROMPT, 0.35, 0.25])
    assert event == "error" and REFUSED in data


def test_the_server_keeps_serving_after_hostile_calls(served, server_files, tmp_path):
    _, client = served
    for path in server_files.values():
        raw_call(client, "segment", [{"path": path}, PROMPT, 0.35, 0.25])
    image = tmp_path / "mine.png"
    Image.open(ROOT / "assets" / "shapes.jpg").resize((96, 72)).save(image)
    result = client.predict(handle_file(str(image)), PROMPT, 0.0, 0.25, api_name="/segment")
    assert (result["width"], result["height"]) == (96, 72) and len(result["boxes"]) > 0


def tiny_bomb(path: Path, side: int = 13000) -> Path:
    """A 1-bit PNG of side x side pixels: about 20 KB on disk, 169 MP once decoded."""
    Image.new("1", (side, side)).save(path, optimize=True)
    return path


def test_a_small_file_claiming_a_huge_image_is_refused_from_its_header(tmp_path):
    from segmentation.images import MAX_DECODE_PIXELS, load_image

    bomb = tiny_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    start = time.monotonic()
    with pytest.raises(ValueError, match="13000 x 13000"):
        load_image(bomb.read_bytes())
    assert time.monotonic() - start < 1.0, "refused before decoding"
    assert 13000 * 13000 > MAX_DECODE_PIXELS


def test_between_the_display_cap_and_the_decode_cap_images_are_reduced(tmp_path):
    from segmentation.images import MAX_DECODE_PIXELS, MAX_PIXELS, load_image

    side = 5000  # 25 MP: above the 16 MP display cap, below the 40 MP decode cap
    assert MAX_PIXELS < side * side < MAX_DECODE_PIXELS
    path = tmp_path / "big.png"
    Image.new("L", (side, side), 90).save(path)
    image = load_image(path)
    assert image.width * image.height <= MAX_PIXELS and image.width == image.height


def test_bomb_through_the_api_names_its_size(served, tmp_path):
    _, client = served
    with pytest.raises(AppError, match="13000 x 13000"):
        client.predict(handle_file(str(tiny_bomb(tmp_path / "bomb.png"))), PROMPT, 0.35, 0.25,
                       api_name="/segment")


def test_thin_images_get_a_message_that_states_the_limit(served, tmp_path):
    from segmentation.images import MAX_ASPECT_RATIO, load_image

    _, client = served
    thin = tmp_path / "thin.png"
    Image.new("RGB", (20000, 1), (200, 10, 10)).save(thin)
    with pytest.raises(ValueError, match=f"too thin.*{MAX_ASPECT_RATIO} times"):
        load_image(thin)
    with pytest.raises(AppError, match="too thin"):
        client.predict(handle_file(str(thin)), PROMPT, 0.35, 0.25, api_name="/segment")
    ok = tmp_path / "wide.png"
    Image.new("RGB", (20 * 30, 30), (200, 10, 10)).save(ok)  # exactly at the limit: accepted
    assert client.predict(handle_file(str(ok)), PROMPT, 1.0, 0.25,
                          api_name="/segment")["width"] == 600


def test_thin_arrays_are_refused_by_the_pipeline_too(served):
    handlers, _ = served
    with pytest.raises(ValueError, match="too thin"):
        handlers.pipeline().run(np.zeros((1, 500, 3), np.uint8), PROMPT)


@pytest.mark.parametrize("threshold", [True, "0.3", None, -0.1, 1.5, [0.3]])
def test_thresholds_must_be_real_numbers_in_the_unit_interval(served, tmp_path, threshold):
    _, client = served
    image = tmp_path / "mine.png"
    Image.open(ROOT / "assets" / "shapes.jpg").resize((96, 72)).save(image)
    with pytest.raises(AppError, match="between 0 and 1"):
        client.predict(handle_file(str(image)), PROMPT, threshold, 0.25, api_name="/segment")


def test_a_prompt_of_unknown_words_gets_a_message_not_unk_labels(served, tmp_path):
    _, client = served
    image = tmp_path / "mine.png"
    Image.open(ROOT / "assets" / "shapes.jpg").resize((96, 72)).save(image)
    with pytest.raises(AppError, match="none of the prompt's words is known"):
        client.predict(handle_file(str(image)), "고양이 . 猫 .", 0.0, 0.25,
                       api_name="/segment")


def test_messages_that_echo_the_prompt_escape_markup():
    from segmentation.report import summary
    from segmentation.results import SegmentedDetections

    nothing = SegmentedDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [],
                                  np.zeros(0, np.int64), ["<img src=x onerror=alert(1)>"],
                                  np.zeros((0, 4, 4), bool), np.zeros(0, np.float32))
    message = summary(nothing, "<img src=x onerror=alert(1)> . [a](javascript:b) .", 0.35, 0.1)
    assert "<img" not in message and "&lt;img" in message
    assert "](" not in message  # no Markdown link survives
    found = SegmentedDetections(np.zeros((1, 4), np.float32), np.ones(1, np.float32),
                                ["<b>x</b>"], np.zeros(1, np.int64), ["<b>x</b>"],
                                np.zeros((1, 4, 4), bool), np.ones(1, np.float32))
    assert "<b>" not in summary(found, "<b>x</b>", 0.35, 0.1)
