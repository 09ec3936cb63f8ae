"""app.py's handlers called directly (no server): caching on slider moves, messages, settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "assets" / "shapes.jpg"
PROMPT = "red ball . blue box ."


def no_progress(*args, **kwargs) -> None:
    """Stands in for gr.Progress outside an event."""


@pytest.fixture(scope="module")
def app():
    import app
    from segmentation.cli import ModelChoice

    app.MODELS.configure(ModelChoice("swint_ogc", "vit_b", "cpu", offline=True))
    return app


@pytest.fixture()
def upload(tmp_path) -> dict:
    """What the image input sends with preprocess=False: a FileData dict."""
    from PIL import Image

    path = tmp_path / "scene.png"
    Image.open(IMAGE).resize((160, 120)).save(path)
    return {"path": str(path), "orig_name": "my scene.png", "meta": {"_type": "gradio.FileData"}}


def test_slider_release_reuses_the_decoded_image_and_the_models(app, upload, monkeypatch):
    decoded = []
    real_decode = app.decode_image
    monkeypatch.setattr(app, "decode_image", lambda path: decoded.append(path) or real_decode(path))
    *first, session = app.ui_segment(upload, PROMPT, 0.0, 0.25, None, no_progress)
    stats = app.MODELS.get().stats
    runs = (stats.detector_runs, stats.image_embeddings)

    *second, same_session = app.ui_rethreshold(upload, PROMPT, 0.6, 0.25, session, no_progress)
    assert decoded == [upload["path"]], "the upload was decoded again on a slider move"
    assert same_session["image"] is session["image"]
    assert (stats.detector_runs, stats.image_embeddings) == runs, "a model ran again"
    annotated, _, table, downloads, message = second
    assert 0 < len(table) < len(first[2])
    assert (table["score"] > 0.6).all()
    assert annotated.shape == session["image"].shape == (120, 160, 3)
    assert f"Found {len(table)} objects" in message
    assert [Path(p).name for p in downloads] == ["my_scene_coco.json"]


def test_zip_button_writes_masks_for_the_shown_result(app, upload):
    import zipfile

    *_, session = app.ui_segment(upload, PROMPT, 0.5, 0.25, None, no_progress)
    json_path, zip_path = app.ui_zip(upload, PROMPT, 0.5, 0.25, session, no_progress)
    with zipfile.ZipFile(zip_path) as archive:
        masks = [name for name in archive.namelist() if name.startswith("masks/")]
    shown = app.run_pipeline(session["image"], PROMPT, 0.5, 0.25)
    assert len(masks) == len(shown) > 0
    with pytest.raises(app.gr.Error, match="Segment first"):
        app.ui_zip(upload, PROMPT, 0.5, 0.25, None, no_progress)


@pytest.mark.parametrize("has_image, prompt", [(False, PROMPT), (True, " "), (True, None)])
def test_slider_release_without_image_or_prompt_changes_nothing(app, upload, has_image, prompt):
    outputs = app.ui_rethreshold(upload if has_image else None, prompt, 0.5, 0.25, None,
                                 no_progress)
    assert len(outputs) == app.UI_OUTPUT_COUNT + 1
    assert all(output == {"__type__": "update"} for output in outputs)


def test_slider_release_after_an_example_click_runs(app, upload):
    """An example fills the image input but not the session: the slider still updates."""
    *outputs, session = app.ui_rethreshold(upload, PROMPT, 0.5, 0.25, None, no_progress)
    assert session["source"] == upload["path"] and "Found" in outputs[-1]


def test_no_detections_is_a_message_not_an_error(app, upload):
    annotated, legend, table, downloads, message, session = app.ui_segment(
        upload, PROMPT, 1.0, 0.25, None, no_progress)
    assert "No objects found" in message and len(table) == 0
    np.testing.assert_array_equal(annotated, session["image"])
    assert "red ball (0)" in legend


def test_empty_prompt_and_missing_image_are_user_errors(app, upload):
    with pytest.raises(app.gr.Error, match="Type what to find"):
        app.ui_segment(upload, "  . ", 0.3, 0.25, None, no_progress)
    with pytest.raises(app.gr.Error, match="Upload an image"):
        app.ui_segment(None, PROMPT, 0.3, 0.25, None, no_progress)
    image_check, prompt_check, *rest = app.validate_run(None, " ", 0.3, 0.25, None)
    assert not image_check["is_valid"] and not prompt_check["is_valid"]
    assert len(rest) == 3 and all(check["is_valid"] for check in rest)
    assert all(check["is_valid"] for check in app.validate_run(upload, PROMPT, 0.3, 0.25, None))


def test_legend_escapes_html(app, upload):
    *_, session = app.ui_segment(upload, PROMPT, 0.5, 0.25, None, no_progress)
    result = app.run_pipeline(session["image"], PROMPT, 0.5, 0.25)
    result.prompt_phrases[0] = "<img src=x onerror=alert(1)>"
    assert "<img" not in app.legend_html(result)


def test_download_names_are_safe(app):
    assert app.upload_name({"path": "/tmp/x", "orig_name": "../../etc/my photo.jpg"}) == \
        "my_photo.jpg"
    assert app.upload_name({"path": "/tmp/x", "orig_name": None}) == "image"
    assert app.upload_name("/somewhere/street.jpg") == "street.jpg"


def test_examples_are_cached_per_model_choice(app, monkeypatch):
    from segmentation.cli import ModelChoice

    monkeypatch.setenv("GRADIO_EXAMPLES_CACHE", "/cache")
    with app.examples_cache(ModelChoice("swint_ogc", "vit_h", "cuda", offline=False)):
        assert os.environ["GRADIO_EXAMPLES_CACHE"] == "/cache/swint_ogc-vit_h"
    with app.examples_cache(ModelChoice("swint_ogc", "vit_b", "cpu", offline=True)):
        assert os.environ["GRADIO_EXAMPLES_CACHE"] == "/cache/offline"
    assert os.environ["GRADIO_EXAMPLES_CACHE"] == "/cache"


def test_binds_localhost_unless_asked(app, monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert app.parse_args(["--offline"]).host == "127.0.0.1"
    assert app.parse_args(["--offline", "--listen"]).host == "0.0.0.0"
    config = app.parse_args(["--offline", "--port", "8123", "--sam", "vit_l"])
    assert (config.port, config.models.sam, config.models.offline) == (8123, "vit_l", True)


def test_gpu_decorator_is_spaces_gpu_when_present(app, monkeypatch):
    calls = []

    class FakeSpaces:
        @staticmethod
        def GPU(duration):  # noqa: N802 (the spaces package's name)
            calls.append(duration)
            return lambda fn: ("on zero gpu", fn)

    def task():
        return None

    assert app.gpu(task) is task  # no `spaces` package here: unchanged
    monkeypatch.setattr(app, "spaces", FakeSpaces)
    assert app.gpu(task) == ("on zero gpu", task) and calls == [app.GPU_DURATION_S]


def test_import_opens_no_connection_and_loads_no_model():
    code = ("import socket\n"
            "def refuse(*args, **kwargs):\n"
            "    raise AssertionError('network used at import')\n"
            "socket.socket.connect = socket.create_connection = refuse\n"
            "import app\n"
            "assert not app.MODELS.loaded\n")
    env = {key: value for key, value in os.environ.items() if key != "SPACE_ID"}
    finished = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
