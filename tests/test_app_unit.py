"""The app's handlers (segmentation/app_events.py) called directly, no server: caching on slider
moves, messages, the detection cap, settings; and app.py's own helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "assets" / "shapes.jpg"
PROMPT = "red circle . blue square . green triangle . yellow circle ."


def no_progress(*args, **kwargs) -> None:
    """Stands in for gr.Progress outside an event."""


@pytest.fixture(scope="module")
def events():
    """segmentation.app_events with the offline models (trained on shapes) configured."""
    from segmentation import app_events
    from segmentation.cli import ModelChoice

    app_events.MODELS.configure(ModelChoice("swint_ogc", "vit_b", "cpu", offline=True))
    return app_events


@pytest.fixture(scope="module")
def app():
    import app

    return app


@pytest.fixture()
def upload(tmp_path, monkeypatch) -> dict:
    """What the image input sends with preprocess=False: a FileData dict of a file in Gradio's
    upload folder (the handlers read nothing else)."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    path = tmp_path / "gradio" / "upload-hash" / "scene.png"
    path.parent.mkdir(parents=True)
    Image.open(IMAGE).resize((160, 120)).save(path)
    return {"path": str(path), "orig_name": "my scene.png", "meta": {"_type": "gradio.FileData"}}


def test_slider_release_reuses_the_decoded_image_and_the_models(events, upload, monkeypatch):
    decoded = []
    real_decode = events.decode_image
    monkeypatch.setattr(events, "decode_image",
                        lambda path: decoded.append(path) or real_decode(path))
    *first, session = events.ui_segment(upload, PROMPT, 0.0, 0.25, None, no_progress)
    stats = events.MODELS.get().stats
    runs = (stats.detector_runs, stats.image_embeddings)

    *second, same_session = events.ui_rethreshold(upload, PROMPT, 0.3, 0.25, session,
                                                  no_progress)
    assert decoded == [upload["path"]], "the upload was decoded again on a slider move"
    assert same_session["image"] is session["image"]
    assert (stats.detector_runs, stats.image_embeddings) == runs, "a model ran again"
    picture, _, table, downloads, message = second
    assert 0 < len(table) < len(first[2])
    assert (table["score"] > 0.3).all()
    assert Path(picture).name == "my_scene_result.jpg"
    assert Path(picture).parent == Path(downloads[0]).parent, "one export folder per run"
    with Image.open(picture) as shown:
        assert shown.format == "JPEG" and shown.size == (160, 120)
    assert f"Found {len(table)} objects" in message
    assert [Path(p).name for p in downloads] == ["my_scene_coco.json"]


def test_result_image_is_a_jpeg_close_to_the_drawing(events, upload):
    from segmentation.visualize import annotate

    picture, *_, session = events.ui_segment(upload, PROMPT, 0.5, 0.25, None, no_progress)
    drawn = annotate(session["image"], events.run_pipeline(session["image"], PROMPT, 0.5, 0.25))
    shown = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    assert np.abs(shown - drawn).mean() < 3, "JPEG quality 90 stays close to the drawing"


def test_zip_button_writes_masks_for_the_shown_result(events, upload):
    import zipfile

    *_, session = events.ui_segment(upload, PROMPT, 0.5, 0.25, None, no_progress)
    json_path, zip_path = events.ui_zip(upload, PROMPT, 0.5, 0.25, session, no_progress)
    with zipfile.ZipFile(zip_path) as archive:
        masks = [name for name in archive.namelist() if name.startswith("masks/")]
    shown = events.run_pipeline(session["image"], PROMPT, 0.5, 0.25)
    assert len(masks) == len(shown) > 0
    with pytest.raises(gr.Error, match="Segment first"):
        events.ui_zip(upload, PROMPT, 0.5, 0.25, None, no_progress)


@pytest.mark.parametrize("has_image, prompt", [(False, PROMPT), (True, " "), (True, None)])
def test_slider_release_without_image_or_prompt_changes_nothing(events, upload, has_image,
                                                                prompt):
    outputs = events.ui_rethreshold(upload if has_image else None, prompt, 0.5, 0.25, None,
                                    no_progress)
    assert len(outputs) == events.UI_OUTPUT_COUNT + 1
    assert all(output == {"__type__": "update"} for output in outputs)


def test_slider_release_after_an_example_click_runs(events, upload):
    """An example fills the image input but not the session: the slider still updates."""
    *outputs, session = events.ui_rethreshold(upload, PROMPT, 0.5, 0.25, None, no_progress)
    assert session["source"] == upload["path"] and "Found" in outputs[-1]


def test_no_detections_is_a_message_not_an_error(events, upload, tmp_path):
    from segmentation.report import write_picture

    picture, legend, table, downloads, message, session = events.ui_segment(
        upload, PROMPT, 1.0, 0.25, None, no_progress)
    assert "No objects found" in message and len(table) == 0
    untouched = write_picture(session["image"], tmp_path, "scene.png")  # nothing drawn
    assert Path(picture).read_bytes() == Path(untouched).read_bytes()
    assert "red circle (0)" in legend


def test_detections_are_capped_and_the_summary_says_so(events, upload, monkeypatch):
    everything = events.run_pipeline(events.decode_image(upload["path"]), PROMPT, 0.0, 0.25)
    total = len(everything) + everything.omitted
    assert total > 3, "box threshold 0 keeps every query"
    monkeypatch.setattr(events, "MAX_DETECTIONS", 3)
    *outputs, _ = events.ui_segment(upload, PROMPT, 0.0, 0.25, None, no_progress)
    table, message = outputs[2], outputs[-1]
    assert len(table) == 3
    assert table["score"].tolist() == pytest.approx(everything.scores[:3].tolist(), abs=1e-3)
    assert f"Showing the best 3 of {total} detections above the box threshold" in message


def test_summary_mentions_omitted_detections_only_when_there_are_some():
    from segmentation.pipeline import SegmentedDetections
    from segmentation.report import summary

    result = SegmentedDetections(
        boxes=np.zeros((2, 4), np.float32), scores=np.array([0.9, 0.8], np.float32),
        phrases=["cat", "dog"], phrase_ids=np.array([0, 1]), prompt_phrases=["cat", "dog"],
        masks=np.zeros((2, 4, 4), bool), mask_scores=np.ones(2, np.float32))
    assert summary(result, "cat . dog", 0.3, 1.0) == \
        "**Found 2 objects:** cat × 1, dog × 1 (1.00 s)"
    result.omitted = 338
    assert summary(result, "cat . dog", 0.3, 1.0).endswith(
        "(1.00 s). Showing the best 2 of 340 detections above the box threshold; raise it to "
        "see fewer.")


def test_empty_prompt_and_missing_image_are_user_errors(events, upload):
    with pytest.raises(gr.Error, match="Type what to find"):
        events.ui_segment(upload, "  . ", 0.3, 0.25, None, no_progress)
    with pytest.raises(gr.Error, match="Upload an image"):
        events.ui_segment(None, PROMPT, 0.3, 0.25, None, no_progress)
    image_check, prompt_check, *rest = events.validate_run(None, " ", 0.3, 0.25, None)
    assert not image_check["is_valid"] and not prompt_check["is_valid"]
    assert len(rest) == 3 and all(check["is_valid"] for check in rest)
    assert all(check["is_valid"] for check in events.validate_run(upload, PROMPT, 0.3, 0.25, None))


def test_legend_escapes_html(events, upload):
    from segmentation.report import legend_html

    *_, session = events.ui_segment(upload, PROMPT, 0.5, 0.25, None, no_progress)
    result = events.run_pipeline(session["image"], PROMPT, 0.5, 0.25)
    result.prompt_phrases[0] = "<img src=x onerror=alert(1)>"
    assert "<img" not in legend_html(result)


def test_download_names_are_safe(events):
    assert events.upload_name({"path": "/tmp/x", "orig_name": "../../etc/my photo.jpg"}) == \
        "my_photo.jpg"
    assert events.upload_name({"path": "/tmp/x", "orig_name": None}) == "image"
    assert events.upload_name("/somewhere/street.jpg") == "street.jpg"


def test_examples_are_cached_per_model_choice(app, monkeypatch):
    from segmentation.cli import ModelChoice

    monkeypatch.setenv("GRADIO_EXAMPLES_CACHE", "/cache")
    with app.examples_cache(ModelChoice("swint_ogc", "vit_h", "cuda", offline=False)):
        assert os.environ["GRADIO_EXAMPLES_CACHE"] == "/cache/swint_ogc-vit_h"
    with app.examples_cache(ModelChoice("swint_ogc", "vit_b", "cpu", offline=True)):
        assert os.environ["GRADIO_EXAMPLES_CACHE"] == "/cache/offline-shapes"
    assert os.environ["GRADIO_EXAMPLES_CACHE"] == "/cache"


def test_binds_localhost_unless_asked(app, monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert app.parse_args(["--offline"]).host == "127.0.0.1"
    assert app.parse_args(["--offline", "--listen"]).host == "0.0.0.0"
    config = app.parse_args(["--offline", "--port", "8123", "--sam", "vit_l"])
    assert (config.port, config.models.sam, config.models.offline) == (8123, "vit_l", True)


def test_gpu_decorator_is_spaces_gpu_when_present(events, monkeypatch):
    calls = []

    class FakeSpaces:
        @staticmethod
        def GPU(duration):  # noqa: N802 (the spaces package's name)
            calls.append(duration)
            return lambda fn: ("on zero gpu", fn)

    def task():
        return None

    assert events.gpu(task) is task  # no `spaces` package here: unchanged
    monkeypatch.setattr(events, "spaces", FakeSpaces)
    assert events.gpu(task) == ("on zero gpu", task) and calls == [events.GPU_DURATION_S]


def test_background_decoding_only_off_zero_gpu(events, monkeypatch):
    zero_gpu = {"SPACE_ID": "user/app", "SPACES_ZERO_GPU": "true"}
    assert events.background_boxes(zero_gpu) == events.BACKGROUND_BOXES > 0  # no `spaces`
    monkeypatch.setattr(events, "spaces", object())  # the `spaces` package is importable
    assert events.background_boxes({}) == events.BACKGROUND_BOXES
    assert events.background_boxes({"SPACE_ID": "user/app"}) == events.BACKGROUND_BOXES
    assert events.background_boxes(zero_gpu) == 0
    monkeypatch.undo()
    assert events.MODELS.get().background_boxes == events.BACKGROUND_BOXES


def test_import_opens_no_connection_and_loads_no_model():
    code = ("import socket\n"
            "def refuse(*args, **kwargs):\n"
            "    raise AssertionError('network used at import')\n"
            "socket.socket.connect = socket.create_connection = refuse\n"
            "import app\n"
            "assert not app.events.MODELS.loaded\n")
    env = {key: value for key, value in os.environ.items() if key != "SPACE_ID"}
    finished = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr


def test_slider_moves_reuse_mask_rles_and_the_coco_json_stays_exact(events, upload,
                                                                    monkeypatch):
    import json

    from segmentation import report
    from segmentation.export import rle_decode

    encoded = []
    real_encode = report.rle_encode
    monkeypatch.setattr(report, "rle_encode", lambda mask: encoded.append(1) or real_encode(mask))
    *first, session = events.ui_segment(upload, PROMPT, 0.0, 0.25, None, no_progress)
    assert len(encoded) == len(first[2]) > 0
    encoded.clear()
    *second, _ = events.ui_rethreshold(upload, PROMPT, 0.3, 0.25, session, no_progress)
    assert encoded == [], "masks shown before were encoded again"
    coco = json.loads(Path(second[3][0]).read_text())
    result = events.run_pipeline(session["image"], PROMPT, 0.3, 0.25)
    assert len(coco["annotations"]) == len(result) > 0
    for annotation, mask in zip(coco["annotations"], result.masks, strict=True):
        np.testing.assert_array_equal(rle_decode(annotation["segmentation"]), mask)


def test_cached_rles_are_redone_when_a_mask_differs():
    from segmentation import report
    from segmentation.export import rle_decode
    from segmentation.pipeline import SegmentedDetections

    masks = np.zeros((1, 8, 10), bool)
    masks[0, 2:5, 3:7] = True
    result = SegmentedDetections(np.array([[3, 2, 7, 5]], np.float32),
                                 np.array([0.9], np.float32), ["cat"], np.array([0]), ["cat"],
                                 masks, np.array([0.8], np.float32))
    cache = {}
    np.testing.assert_array_equal(rle_decode(report.cached_rles(result, cache)[0]), masks[0])
    masks[0, 6, 1] = True  # same box, another mask: the cached RLE must not be reused
    np.testing.assert_array_equal(rle_decode(report.cached_rles(result, cache)[0]), masks[0])


def test_export_runs_older_than_the_limit_are_pruned_by_the_timer(tmp_path):
    from segmentation.export_folders import ExportFolders

    folders = ExportFolders(tmp_path, max_age_s=3600, prune_every_s=0.05)
    old, recent = folders.new_run(), folders.new_run()
    assert old.parent == tmp_path / "grounded-sam-exports" / f"process-{os.getpid()}"
    hour_ago = os.path.getmtime(old) - 3600 - 5
    os.utime(old, (hour_ago, hour_ago))
    deadline = time.monotonic() + 5
    while old.exists() and time.monotonic() < deadline:  # no new export needed: the timer runs
        time.sleep(0.02)
    assert not old.exists() and recent.exists()
    folders.close()
    assert not folders.folder.exists()


def test_export_folders_of_dead_processes_are_removed_at_start(tmp_path):
    from segmentation.export_folders import ExportFolders

    root = tmp_path / "grounded-sam-exports"
    child = subprocess.Popen(["sleep", "30"])
    try:
        gone_pid = subprocess.Popen(["true"])
        gone_pid.wait()  # its pid is free now
        stale, alive, legacy = (root / f"process-{gone_pid.pid}", root / f"process-{child.pid}",
                                root / "run-abc123")
        for folder in (stale, alive, legacy):
            (folder / "run-x").mkdir(parents=True)
        ExportFolders(tmp_path).start().close()
        assert not stale.exists() and not legacy.exists()
        assert alive.exists()  # another running server's files stay
    finally:
        child.kill()


def test_ui_exports_are_written_where_gradio_serves_them_without_copying(events, upload):
    picture, _, _, downloads, _, _ = events.ui_segment(upload, PROMPT, 0.5, 0.25, None,
                                                       no_progress)
    cache = Path(gr.utils.get_upload_folder()).resolve()
    for path in (picture, *downloads):
        assert cache in Path(path).resolve().parents


def test_zero_gpu_worker_caches_come_back_and_cached_moves_need_no_gpu(events, tmp_path,
                                                                      monkeypatch):
    """ZeroGPU runs @spaces.GPU functions in a forked worker process; simulated with a fork."""
    import multiprocessing

    import torch

    task = events.segment_on_device  # undecorated: no `spaces` package here
    gpu_calls = []

    def in_forked_worker(*args):
        gpu_calls.append(args[2])
        context = multiprocessing.get_context("fork")
        parent, child = context.Pipe()
        received = context.Event()

        def worker():
            torch.set_num_threads(1)
            child.send(task(*args))
            received.wait(60)  # tensors travel as shared file descriptors: stay until read

        process = context.Process(target=worker)
        process.start()
        answer = parent.recv()
        received.set()
        process.join(timeout=60)
        return answer

    pipeline = events.MODELS.get()
    pipeline.wait_idle()  # no background thread may hold a lock across the fork
    monkeypatch.setattr(pipeline, "background_boxes", 0)
    monkeypatch.setattr(pipeline, "prefetch_boxes", 4)  # fewer than the model's 50 queries
    monkeypatch.setattr(events, "spaces", object())
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(events, "segment_on_device", in_forked_worker)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # where uploads are read from
    from grounding.shapes_data import generate_image
    from segmentation.pipeline import PREFETCH_MARGIN

    path = tmp_path / "fresh.png"  # pixels no earlier test cached: a red circle, a blue square
    Image.fromarray(generate_image(np.random.default_rng([7, 3])).image).save(path)
    upload = {"path": str(path), "orig_name": "fresh.png"}

    *first, session = events.ui_segment(upload, PROMPT, 0.3, 0.25, None, no_progress)
    found = len(first[2])
    assert gpu_calls == [0.3] and found > 0
    raw = pipeline.detector.infer(session["image"], PROMPT)  # the expected boxes, uncached
    # Decoded ahead in the worker: up to 4 boxes scoring within PREFETCH_MARGIN below 0.3.
    ahead = pipeline.detector.select(raw, 0.3 - PREFETCH_MARGIN, 0.25).scores[found:found + 4]
    just_below = float(ahead[-1]) - 1e-4 if len(ahead) else 0.25
    for threshold in (0.5, just_below, 0.3):  # seen, or decoded ahead
        *outputs, session = events.ui_rethreshold(upload, PROMPT, threshold, 0.25, session,
                                                  no_progress)
        expected = pipeline.detector.select(raw, threshold, 0.25)
        np.testing.assert_allclose(outputs[2][["x0", "y0", "x1", "y1"]].to_numpy(),
                                   np.rint(expected.boxes[:events.MAX_DETECTIONS]))
    assert gpu_calls == [0.3], "a cached slider move went to the GPU"
    events.ui_rethreshold(upload, PROMPT, 0.0, 0.25, session, no_progress)  # masks not decoded
    assert gpu_calls == [0.3, 0.0]


@pytest.mark.parametrize("value", [True, False, "0.5", None, float("nan"), float("inf"), -0.01,
                                   1.01, [0.5]])
def test_thresholds_that_are_not_real_numbers_in_the_unit_interval_are_refused(events, value):
    with pytest.raises(gr.Error, match="between 0 and 1"):
        events.check_threshold("box_threshold", value)
    assert events.check_threshold("box_threshold", 0) == 0.0
    assert events.check_threshold("box_threshold", 0.35) == 0.35


def test_a_sessions_rle_cache_stays_bounded():
    from segmentation import report
    from segmentation.pipeline import SegmentedDetections

    cache: dict = {}
    for start in range(0, 3 * report.RLE_CACHE_ENTRIES, 50):
        count = 50
        masks = np.zeros((count, 8, 10), bool)
        masks[:, 2:5, 3:7] = True
        boxes = np.arange(start, start + count, dtype=np.float32)[:, None].repeat(4, 1)
        result = SegmentedDetections(boxes, np.ones(count, np.float32), ["cat"] * count,
                                     np.zeros(count, np.int64), ["cat"], masks,
                                     np.ones(count, np.float32))
        report.cached_rles(result, cache)
        assert len(cache) <= report.RLE_CACHE_ENTRIES
        assert all(box.tobytes() in cache for box in boxes), "the shown masks stay cached"


def test_model_store_configure_waits_for_a_load_in_progress():
    import threading

    from segmentation.app_events import ModelStore
    from segmentation.cli import ModelChoice

    store = ModelStore()
    configured = threading.Event()
    with store._lock:  # what `get` holds while it loads the weights
        thread = threading.Thread(target=lambda: (
            store.configure(ModelChoice("swint_ogc", "vit_b", "cpu", offline=True)),
            configured.set()))
        thread.start()
        assert not configured.wait(0.2), "configure swapped the models under a running load"
    assert configured.wait(5) and store.choice.offline
