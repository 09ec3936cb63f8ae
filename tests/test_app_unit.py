"""The app's handlers (ui/handlers.py) called directly, no server: caching on slider moves,
messages, the detection cap, settings; and app.py's own helpers."""

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


def offline_choice():
    from segmentation.models import ModelChoice

    return ModelChoice("swint_ogc", "vit_b", "cpu", offline=True)


@pytest.fixture(scope="module")
def handlers():
    """A GroundedSamApp serving the offline models (trained on shapes)."""
    from ui.handlers import GroundedSamApp

    return GroundedSamApp(offline_choice())


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


def test_slider_release_reuses_the_decoded_image_and_the_models(handlers, upload, monkeypatch):
    decoded = []
    real_decode = handlers.decode_image
    monkeypatch.setattr(handlers, "decode_image",
                        lambda path: decoded.append(path) or real_decode(path))
    *first, session = handlers.ui_segment(upload, PROMPT, 0.0, 0.25, None, no_progress)
    stats = handlers.pipeline().stats
    runs = (stats.detector_runs, stats.image_embeddings)

    *second, same_session = handlers.ui_rethreshold(upload, PROMPT, 0.3, 0.25, session,
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


def test_an_upload_is_decoded_and_embedded_before_segment_is_pressed(handlers, upload,
                                                                       monkeypatch):
    pipeline = handlers.pipeline()  # loaded (the page's load event does it)
    with Image.open(upload["path"]) as picture:  # an image no other test has embedded
        picture.transpose(Image.Transpose.ROTATE_180).save(upload["path"])
    stats = pipeline.stats
    embeddings, detector_runs = stats.image_embeddings, stats.detector_runs
    session = handlers.ui_prepare(upload, None)
    assert session["source"] == upload["path"] and session["image"].shape == (120, 160, 3)
    assert pipeline.preparer.wait_idle(timeout=60)
    assert stats.image_embeddings == embeddings + 1 and stats.detector_runs == detector_runs
    monkeypatch.setattr(handlers, "decode_image", lambda path: pytest.fail("decoded again"))
    *_, same = handlers.ui_segment(upload, PROMPT, 0.3, 0.25, session, no_progress)
    assert same["image"] is session["image"]
    assert stats.image_embeddings == embeddings + 1, "Segment ran SAM's encoder again"
    assert stats.detector_runs == detector_runs + 1


def test_an_upload_on_zero_gpu_or_without_an_image_starts_nothing(handlers, upload, monkeypatch):
    pipeline = handlers.pipeline()
    monkeypatch.setattr(pipeline, "prepare", lambda image: pytest.fail("prepared"))
    import gradio as gr

    assert handlers.ui_prepare(None, None) == gr.skip()  # the session stays as it is
    monkeypatch.setattr(handlers, "zero_gpu", True)  # CUDA only inside a request there
    assert handlers.ui_prepare(upload, None)["source"] == upload["path"]


def test_result_image_is_a_jpeg_close_to_the_drawing(handlers, upload):
    from segmentation.visualize import annotate

    picture, *_, session = handlers.ui_segment(upload, PROMPT, 0.5, 0.25, None, no_progress)
    drawn = annotate(session["image"], handlers.run_pipeline(session["image"], PROMPT, 0.5, 0.25))
    shown = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    assert np.abs(shown - drawn).mean() < 3, "JPEG quality 90 stays close to the drawing"


def test_zip_button_writes_masks_for_the_shown_result(handlers, upload):
    import zipfile

    *_, session = handlers.ui_segment(upload, PROMPT, 0.5, 0.25, None, no_progress)
    json_path, zip_path = handlers.ui_zip(upload, PROMPT, 0.5, 0.25, session, no_progress)
    with zipfile.ZipFile(zip_path) as archive:
        masks = [name for name in archive.namelist() if name.startswith("masks/")]
    shown = handlers.run_pipeline(session["image"], PROMPT, 0.5, 0.25)
    assert len(masks) == len(shown) > 0
    with pytest.raises(gr.Error, match="Segment first"):
        handlers.ui_zip(upload, PROMPT, 0.5, 0.25, None, no_progress)


@pytest.mark.parametrize("has_image, prompt", [(False, PROMPT), (True, " "), (True, None)])
def test_slider_release_without_image_or_prompt_changes_nothing(handlers, upload, has_image,
                                                                prompt):
    from ui.handlers import UI_OUTPUT_COUNT

    outputs = handlers.ui_rethreshold(upload if has_image else None, prompt, 0.5, 0.25, None,
                                      no_progress)
    assert len(outputs) == UI_OUTPUT_COUNT + 1
    assert all(output == {"__type__": "update"} for output in outputs)


def test_slider_release_after_an_example_click_runs(handlers, upload):
    """An example fills the image input but not the session: the slider still updates."""
    *outputs, session = handlers.ui_rethreshold(upload, PROMPT, 0.5, 0.25, None, no_progress)
    assert session["source"] == upload["path"] and "Found" in outputs[-1]


def test_no_detections_is_a_message_not_an_error(handlers, upload, tmp_path):
    from segmentation.report import write_picture

    picture, legend, table, downloads, message, session = handlers.ui_segment(
        upload, PROMPT, 1.0, 0.25, None, no_progress)
    assert "No objects found" in message and len(table) == 0
    untouched = write_picture(session["image"], tmp_path, "scene.png")  # nothing drawn
    assert Path(picture).read_bytes() == Path(untouched).read_bytes()
    assert "red circle (0)" in legend


def test_detections_are_capped_and_the_summary_says_so(handlers, upload, monkeypatch):
    everything = handlers.run_pipeline(handlers.decode_image(upload["path"]), PROMPT, 0.0, 0.25)
    total = len(everything) + everything.omitted
    assert total > 3, "box threshold 0 keeps every query"
    monkeypatch.setattr(handlers, "max_detections", 3)
    *outputs, _ = handlers.ui_segment(upload, PROMPT, 0.0, 0.25, None, no_progress)
    table, message = outputs[2], outputs[-1]
    assert len(table) == 3
    assert table["score"].tolist() == pytest.approx(everything.scores[:3].tolist(), abs=1e-3)
    assert f"Showing the best 3 of {total} detections above the box threshold" in message


def test_summary_mentions_omitted_detections_only_when_there_are_some():
    from segmentation.report import summary
    from segmentation.results import SegmentedDetections

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


def test_empty_prompt_and_missing_image_are_user_errors(handlers, upload):
    with pytest.raises(gr.Error, match="Type what to find"):
        handlers.ui_segment(upload, "  . ", 0.3, 0.25, None, no_progress)
    with pytest.raises(gr.Error, match="Upload an image"):
        handlers.ui_segment(None, PROMPT, 0.3, 0.25, None, no_progress)
    image_check, prompt_check, *rest = handlers.validate_run(None, " ", 0.3, 0.25, None)
    assert not image_check["is_valid"] and not prompt_check["is_valid"]
    assert len(rest) == 3 and all(check["is_valid"] for check in rest)
    checks = handlers.validate_run(upload, PROMPT, 0.3, 0.25, None)
    assert all(check["is_valid"] for check in checks)


def test_legend_escapes_html(handlers, upload):
    from segmentation.report import legend_html

    *_, session = handlers.ui_segment(upload, PROMPT, 0.5, 0.25, None, no_progress)
    result = handlers.run_pipeline(session["image"], PROMPT, 0.5, 0.25)
    result.prompt_phrases[0] = "<img src=x onerror=alert(1)>"
    assert "<img" not in legend_html(result)


def test_download_names_are_safe():
    from segmentation.inputs import upload_name

    assert upload_name({"path": "/tmp/x", "orig_name": "../../etc/my photo.jpg"}) == "my_photo.jpg"
    assert upload_name({"path": "/tmp/x", "orig_name": None}) == "image"
    assert upload_name("/somewhere/street.jpg") == "street.jpg"


def test_examples_are_cached_per_model_choice(app, monkeypatch):
    from segmentation.models import ModelChoice

    monkeypatch.setenv("GRADIO_EXAMPLES_CACHE", "/cache")
    assert app.examples_cache_folder(ModelChoice("swint_ogc", "vit_h", "cuda", offline=False)) \
        == Path("/cache/swint_ogc-vit_h")
    assert app.examples_cache_folder(offline_choice()) == Path("/cache/offline-shapes")
    int8 = ModelChoice("swint_ogc", "vit_b", "cpu", offline=False, quantize="int8", compile=True)
    assert app.examples_cache_folder(int8) == Path("/cache/swint_ogc-vit_b-int8")
    assert os.environ["GRADIO_EXAMPLES_CACHE"] == "/cache"


def test_the_demo_caches_its_examples_in_the_folder_of_its_models(app, handlers, upload,
                                                                   tmp_path, monkeypatch):
    """The examples of a built demo (lazily cached on the first click) land in the folder of
    their model choice, without the environment being changed."""
    from gradio_client import utils as client_utils

    monkeypatch.setenv("GRADIO_EXAMPLES_CACHE", str(tmp_path / "examples"))
    built = []
    real_cache_examples_in = app.cache_examples_in
    monkeypatch.setattr(app, "cache_examples_in", lambda examples, folder: (
        built.append(examples), real_cache_examples_in(examples, folder)))
    config = app.AppConfig(models=offline_choice(), host="127.0.0.1", port=None)
    app.build_demo(config, handlers)
    [examples] = built
    assert os.environ["GRADIO_EXAMPLES_CACHE"] == str(tmp_path / "examples")
    client_utils.synchronize_async(examples.cache, 0)  # what the first click of example 0 does
    cached = tmp_path / "examples" / "offline-shapes" / str(examples.dataset._id)
    assert (cached / "log.csv").is_file() and (cached / "indices.csv").read_text() == "0\n"
    assert sorted(path.name for path in (tmp_path / "examples").iterdir()) == ["offline-shapes"]


def test_binds_localhost_unless_asked(app, monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert app.parse_args(["--offline"]).host == "127.0.0.1"
    assert app.parse_args(["--offline", "--listen"]).host == "0.0.0.0"
    config = app.parse_args(["--offline", "--port", "8123", "--sam", "vit_l"])
    assert (config.port, config.models.sam, config.models.offline) == (8123, "vit_l", True)


def test_gpu_decorator_is_spaces_gpu_when_present(monkeypatch):
    from ui import zero_gpu

    calls = []

    class FakeSpaces:
        @staticmethod
        def GPU(duration):  # noqa: N802 (the spaces package's name)
            calls.append(duration)
            return lambda fn: ("on zero gpu", fn)

    def task():
        return None

    assert zero_gpu.gpu(task) is task  # no `spaces` package here: unchanged
    monkeypatch.setattr(zero_gpu, "spaces", FakeSpaces)
    assert zero_gpu.gpu(task) == ("on zero gpu", task) and calls == [zero_gpu.GPU_DURATION_S]


def test_background_decoding_only_off_zero_gpu(handlers, monkeypatch):
    from types import SimpleNamespace

    from segmentation.look_ahead import LookAhead
    from ui import zero_gpu
    from ui.handlers import BACKGROUND_BOXES, ZERO_GPU_PREFETCH_BOXES, GroundedSamApp

    space = {"SPACE_ID": "user/app", "SPACES_ZERO_GPU": "true"}
    assert not zero_gpu.on_zero_gpu(space)  # no `spaces` package
    # The `spaces` package is importable (its GPU decorator a no-op here).
    monkeypatch.setattr(zero_gpu, "spaces", SimpleNamespace(GPU=lambda duration: lambda fn: fn))
    assert not zero_gpu.on_zero_gpu({}) and not zero_gpu.on_zero_gpu({"SPACE_ID": "user/app"})
    assert zero_gpu.on_zero_gpu(space)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert GroundedSamApp(offline_choice()).zero_gpu  # what the app detects by default
    monkeypatch.undo()
    assert not handlers.zero_gpu
    assert handlers.pipeline().look_ahead == LookAhead.background(BACKGROUND_BOXES)
    assert BACKGROUND_BOXES > 0

    def load(choice, look_ahead):  # what the app asks its loader for
        return SimpleNamespace(look_ahead=look_ahead)

    for on_zero_gpu, (background, ahead) in [(False, (BACKGROUND_BOXES, 0)),
                                             (True, (0, ZERO_GPU_PREFETCH_BOXES))]:
        pipeline = GroundedSamApp(offline_choice(), loader=load, zero_gpu=on_zero_gpu).pipeline()
        assert (pipeline.look_ahead.background_boxes,
                pipeline.look_ahead.prefetch_boxes) == (background, ahead)


def test_import_opens_no_connection_and_loads_no_model():
    code = ("import socket\n"
            "def refuse(*args, **kwargs):\n"
            "    raise AssertionError('network used at import')\n"
            "socket.socket.connect = socket.create_connection = refuse\n"
            "import app\n"
            "config = app.parse_args([])\n"  # the real models, which would need downloads
            "handlers = app.GroundedSamApp(config.models)\n"
            "app.build_demo(config, handlers)\n"
            "assert not handlers.loaded\n")
    env = {key: value for key, value in os.environ.items() if key != "SPACE_ID"}
    finished = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr


def test_slider_moves_reuse_mask_rles_and_the_coco_json_stays_exact(handlers, upload,
                                                                    monkeypatch):
    import json

    from segmentation import report
    from segmentation.export import rle_decode

    encoded = []
    real_encode = report.rle_encode
    monkeypatch.setattr(report, "rle_encode", lambda mask: encoded.append(1) or real_encode(mask))
    *first, session = handlers.ui_segment(upload, PROMPT, 0.0, 0.25, None, no_progress)
    assert len(encoded) == len(first[2]) > 0
    encoded.clear()
    *second, _ = handlers.ui_rethreshold(upload, PROMPT, 0.3, 0.25, session, no_progress)
    assert encoded == [], "masks shown before were encoded again"
    coco = json.loads(Path(second[3][0]).read_text())
    result = handlers.run_pipeline(session["image"], PROMPT, 0.3, 0.25)
    assert len(coco["annotations"]) == len(result) > 0
    for annotation, mask in zip(coco["annotations"], result.masks, strict=True):
        np.testing.assert_array_equal(rle_decode(annotation["segmentation"]), mask)


def test_cached_rles_are_redone_when_a_mask_differs():
    from segmentation import report
    from segmentation.export import rle_decode
    from segmentation.results import SegmentedDetections

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


def test_ui_exports_are_written_where_gradio_serves_them_without_copying(handlers, upload):
    picture, _, _, downloads, _, _ = handlers.ui_segment(upload, PROMPT, 0.5, 0.25, None,
                                                         no_progress)
    cache = Path(gr.utils.get_upload_folder()).resolve()
    for path in (picture, *downloads):
        assert cache in Path(path).resolve().parents


def test_zero_gpu_worker_caches_come_back_and_cached_moves_need_no_gpu(handlers, tmp_path,
                                                                      monkeypatch):
    """ZeroGPU runs @spaces.GPU functions in a forked worker process; simulated with a fork."""
    import dataclasses
    import multiprocessing

    import torch

    from segmentation.look_ahead import PREFETCH_MARGIN, LookAhead
    from segmentation.pipeline import GroundedSAM
    from ui.handlers import GroundedSamApp

    shared = handlers.pipeline()
    shared.wait_idle()  # no background thread may hold a lock across the fork

    def load(choice, look_ahead):  # the look-ahead a ZeroGPU app asks for, with fewer boxes
        assert look_ahead.mode == "prefetch" and look_ahead.background_boxes == 0
        return GroundedSAM(shared.detector, shared.segmenter,  # the loaded models, a new cache
                           look_ahead=dataclasses.replace(look_ahead, boxes=4))  # < 50 queries

    handlers = GroundedSamApp(offline_choice(), loader=load, zero_gpu=True)
    task = handlers.segment_on_device  # undecorated: no `spaces` package here
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

    pipeline = handlers.pipeline()
    assert pipeline.look_ahead == LookAhead.prefetch(4) and handlers.zero_gpu
    handlers.segment_on_device = in_forked_worker
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # where uploads are read from
    from grounding.shapes_drawing import generate_image

    path = tmp_path / "fresh.png"  # pixels no earlier test cached: a red circle, a blue square
    Image.fromarray(generate_image(np.random.default_rng([7, 3])).image).save(path)
    upload = {"path": str(path), "orig_name": "fresh.png"}

    *first, session = handlers.ui_segment(upload, PROMPT, 0.3, 0.25, None, no_progress)
    found = len(first[2])
    assert gpu_calls == [0.3] and found > 0
    raw = pipeline.detector.infer(session["image"], PROMPT)  # the expected boxes, uncached
    # Decoded ahead in the worker: up to 4 boxes scoring within PREFETCH_MARGIN below 0.3.
    ahead = pipeline.detector.select(raw, 0.3 - PREFETCH_MARGIN, 0.25).scores[found:found + 4]
    just_below = float(ahead[-1]) - 1e-4 if len(ahead) else 0.25
    for threshold in (0.5, just_below, 0.3):  # seen, or decoded ahead
        *outputs, session = handlers.ui_rethreshold(upload, PROMPT, threshold, 0.25, session,
                                                    no_progress)
        expected = pipeline.detector.select(raw, threshold, 0.25)
        np.testing.assert_allclose(outputs[2][["x0", "y0", "x1", "y1"]].to_numpy(),
                                   np.rint(expected.boxes[:handlers.max_detections]))
    assert gpu_calls == [0.3], "a cached slider move went to the GPU"
    handlers.ui_rethreshold(upload, PROMPT, 0.0, 0.25, session, no_progress)  # masks not decoded
    assert gpu_calls == [0.3, 0.0]


@pytest.mark.parametrize("value", [True, False, "0.5", None, float("nan"), float("inf"), -0.01,
                                   1.01, [0.5]])
def test_thresholds_that_are_not_real_numbers_in_the_unit_interval_are_refused(handlers, value):
    from segmentation.inputs import InputError, check_threshold

    with pytest.raises(InputError, match="between 0 and 1") as refused:
        check_threshold("box_threshold", value)
    assert refused.value.title == "Bad threshold"
    assert check_threshold("box_threshold", 0) == 0.0
    assert check_threshold("box_threshold", 0.35) == 0.35
    with pytest.raises(gr.Error, match="between 0 and 1"):  # what the handlers make of it
        handlers.run_pipeline(np.zeros((8, 8, 3), np.uint8), PROMPT, value, 0.25)


def test_a_sessions_rle_cache_stays_bounded():
    from segmentation import report
    from segmentation.results import SegmentedDetections

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


def test_concurrent_first_events_load_the_models_once():
    import threading
    from types import SimpleNamespace

    from ui.handlers import GroundedSamApp

    loads, release = [], threading.Event()

    def slow_load(choice, look_ahead):
        loads.append(choice)
        release.wait(5)
        return SimpleNamespace()

    handlers = GroundedSamApp(offline_choice(), loader=slow_load)
    got = []
    threads = [threading.Thread(target=lambda: got.append(handlers.pipeline())) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    assert not handlers.loaded and len(loads) == 1, "a second load started during the first"
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(loads) == 1 and len(got) == 3 and all(p is got[0] for p in got)
    assert handlers.loaded
