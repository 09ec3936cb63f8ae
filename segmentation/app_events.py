"""What the app's events do: input checks, the process's one pipeline, and the handlers that
app.py wires to its components (layout and launch stay in app.py).

UI handlers return plain values for the page: the annotated image as a JPEG file (Gradio's PNG
encoding of an array takes 290 ms for 1200 x 800 on 2 cores, the JPEG under 10 ms), the legend,
the table, the COCO JSON download and a summary line. API handlers return what a script wants:
JSON, or a lossless PNG with the export files. Every run shows at most MAX_DETECTIONS detections.

On ZeroGPU, CUDA may only be used inside `@spaces.GPU` calls, which run in a forked worker
process: `gpu` wraps the one function that runs the models, the cache entries it adds are copied
back into the main process's pipeline, and a slider move whose masks are all cached is answered
there without a GPU call. No background thread decodes masks there; the GPU call decodes the boxes
just below the threshold instead (`ZERO_GPU_PREFETCH_BOXES`).
"""

from __future__ import annotations

try:  # ZeroGPU; app.py imports `spaces` first, before torch initialises CUDA.
    import spaces
except ImportError:  # not on a Space: @gpu is a no-op
    spaces = None

import contextlib
import functools
import html
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import gradio as gr
import numpy as np

from segmentation import report
from segmentation.cli import ModelChoice, load_models
from segmentation.export_folders import ExportFolders
from segmentation.pipeline import CacheMiss

MAX_PROMPT_CHARS = 2000
MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # also the server's max_file_size (app.py)
EXAMPLE_ASSETS = Path(__file__).resolve().parent.parent / "assets"
NOT_UPLOADED = (
    "The image must be uploaded (through the page, or with gradio_client's "
    "handle_file); server paths are not accepted."
)
MAX_DETECTIONS = 100  # each mask is H x W bytes and about 0.1 s of SAM decoding on a CPU
BACKGROUND_BOXES = 48  # decoded after each run, just below the threshold: sliding down is instant
ZERO_GPU_PREFETCH_BOXES = 48  # on ZeroGPU the GPU call decodes them (milliseconds each) instead
BOX_THRESHOLD, TEXT_THRESHOLD = 0.35, 0.25  # the sliders' and the examples' defaults
GPU_DURATION_S = 40
UI_OUTPUT_COUNT = 5  # annotated image, legend, detections, downloads, message
# Default of the handlers' `progress` parameter: Gradio gives each call its own tracker and only
# reads `track_tqdm` here (tqdm bars, e.g. weight downloads, show in the page).
PROGRESS = gr.Progress(track_tqdm=True)


def gpu(fn: Callable) -> Callable:
    """`spaces.GPU` when the `spaces` package is present (a no-op off ZeroGPU); else `fn`."""
    return spaces.GPU(duration=GPU_DURATION_S)(fn) if spaces is not None else fn


def on_zero_gpu(environ: Mapping[str, str] = os.environ) -> bool:
    """A ZeroGPU Space: the `spaces` package is there and SPACES_ZERO_GPU is set (as the package
    itself decides). @gpu calls then run in a forked worker process that holds the GPU."""
    flag = environ.get("SPACES_ZERO_GPU", "").lower()
    return spaces is not None and flag in ("1", "t", "true")


def background_boxes(environ: Mapping[str, str] = os.environ) -> int:
    """How many boxes below the threshold the pipeline decodes in a background thread after each
    run: BACKGROUND_BOXES, or 0 on ZeroGPU (CUDA only inside @gpu; the GPU call decodes
    ZERO_GPU_PREFETCH_BOXES of them instead)."""
    return 0 if on_zero_gpu(environ) else BACKGROUND_BOXES


class ModelStore:
    """The one pipeline of this process, loaded on first use (thread-safe)."""

    def __init__(self) -> None:
        self.choice: ModelChoice | None = None
        self._pipeline = None
        self._lock = threading.Lock()

    def configure(self, choice: ModelChoice) -> None:
        with self._lock:  # never while `get` is loading the previous choice
            if self.choice != choice:
                self.choice, self._pipeline = choice, None

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def get(self):
        """The GroundedSAM pipeline; the first call loads (and may download) the weights."""
        with self._lock:
            if self._pipeline is None:
                if self.choice is None:
                    raise RuntimeError("ModelStore.configure was never called")
                pipeline = load_models(self.choice)
                pipeline.background_boxes = background_boxes()
                if on_zero_gpu():
                    pipeline.prefetch_boxes = ZERO_GPU_PREFETCH_BOXES
                self._pipeline = pipeline
            return self._pipeline


MODELS = ModelStore()


@functools.cache
def export_folders(parent: str) -> ExportFolders:
    """This process's export folders under `parent` (Gradio's upload folder, so that Gradio serves
    the files without copying them), started on first use: stale folders of dead processes are
    removed then, old runs on a timer, and this process's own at exit."""
    return ExportFolders(parent).start()


# ----------------------------------------------------------------------------- input checks


def upload_path(value) -> str | None:
    """The server-side path of an image input: a FileData dict (events run with
    preprocess=False, so Gradio never opens the file itself) or a path string (examples)."""
    if isinstance(value, dict):
        return value.get("path")
    return value if isinstance(value, str) and value else None


def upload_name(value) -> str:
    """The uploaded file's original name, made safe for download names ("image" if unknown)."""
    name = value.get("orig_name") if isinstance(value, dict) else value
    name = Path(name).name if isinstance(name, str) and name else "image"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-80:].lstrip(".") or "image"


def bad_input(message: str, title: str = "Error") -> gr.Error:
    """An error for the user (a toast, or AppError in gradio_client); not logged as a fault."""
    return gr.Error(message, title=title, print_exception=False)


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not any(character.isalnum() for character in prompt):
        raise bad_input(
            "Type what to find, for example 'a cat . a remote control .'", title="Empty prompt"
        )
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad_input(
            f"The prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.",
            title="Prompt too long",
        )
    return prompt


def check_threshold(name: str, value) -> float:
    """A real number in [0, 1]: not a string, not `true`, not NaN."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0.0 <= float(value) <= 1.0
    ):
        shown = text_for_message(repr(value), 40)
        raise bad_input(
            f"{name} must be a number between 0 and 1, got {shown}", title="Bad threshold"
        )
    return float(value)


def read_upload(path: str) -> bytes:
    """The bytes of an image input, only when it is a regular file inside Gradio's upload folder
    (uploads and cached examples) or one of our example assets.

    Anything else (a server path sent through the API, a directory, a device, a FIFO, a missing
    file, a link leading out of those folders) gets one message that says nothing about the path,
    without opening it; no OS error text reaches the caller.
    """
    real = os.path.realpath(path)
    roots = (os.path.realpath(gr.utils.get_upload_folder()), str(EXAMPLE_ASSETS))
    if not any(os.path.commonpath((real, root)) == root for root in roots):
        raise bad_input(NOT_UPLOADED, title="Image not uploaded")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise bad_input(NOT_UPLOADED, title="Image not uploaded") from None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise bad_input(NOT_UPLOADED, title="Image not uploaded")
        if info.st_size > MAX_UPLOAD_BYTES:
            raise bad_input(
                f"The file has {info.st_size / 2**20:.0f} MB; the limit is "
                f"{MAX_UPLOAD_BYTES // 2**20} MB.",
                title="File too large",
            )
        try:
            return handle.read(MAX_UPLOAD_BYTES + 1)
        except OSError:
            raise bad_input(NOT_UPLOADED, title="Image not uploaded") from None


def decode_image(path: str | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an uploaded file (EXIF-rotated, any mode, size-capped)."""
    from segmentation.images import load_image

    if path is None:
        raise bad_input("Upload an image first (or pick an example).", title="No image")
    data = read_upload(path)
    try:  # from bytes, so messages say "the uploaded file", not a server path
        return np.asarray(load_image(data))
    except (OSError, ValueError) as error:
        raise bad_input(
            f"This file cannot be used as an image: {text_for_message(error)}",
            title="Unreadable image",
        ) from None


def text_for_message(value, limit: int = 200) -> str:
    """`value` as plain text for a message: HTML-escaped and cut to `limit` characters (toasts
    and Markdown render markup; prompts and errors may hold some)."""
    return html.escape(str(value)[:limit], quote=False)


def validate_run(image_value, prompt, box_threshold, text_threshold, session) -> list[dict]:
    """Event validator: refuse a run without image or prompt before it is queued."""
    has_words = isinstance(prompt, str) and any(character.isalnum() for character in prompt)
    valid = gr.validate(True, "")
    return [
        gr.validate(upload_path(image_value) is not None, "Upload an image first."),
        gr.validate(has_words, "Type what to find, for example 'cat . dog .'"),
        valid,
        valid,
        valid,
    ]


# ----------------------------------------------------------------------------- running


def segment(
    image: np.ndarray, prompt: str, box_threshold: float, text_threshold: float, models: bool = True
):
    """One pipeline call, at most MAX_DETECTIONS detections."""
    try:
        return MODELS.get().run(
            image,
            prompt,
            box_threshold,
            text_threshold,
            max_detections=MAX_DETECTIONS,
            models=models,
        )
    except ValueError as error:  # e.g. one phrase of the prompt longer than 256 tokens
        raise bad_input(text_for_message(error), title="Cannot segment") from None


@gpu
def segment_on_device(
    image: np.ndarray, prompt: str, box_threshold: float, text_threshold: float
) -> tuple:
    """`segment` where the models can run, and the cache entries it added.

    On ZeroGPU this runs in a forked worker process: arguments and results are pickled, and
    what the worker caches stays there, so the entries go back to the main process too.
    """
    with MODELS.get().cache.recording() as added:
        result = segment(image, prompt, box_threshold, text_threshold)
    return result, added


def loaded_models():
    """The pipeline, or a gr.Error that says which file is missing and how to supply it."""
    try:
        return MODELS.get()
    except (OSError, ValueError, RuntimeError) as error:
        raise gr.Error(
            f"The models could not be loaded: {text_for_message(error, 500)} "
            "(To try the interface without weights, start the app with --offline.)",
            title="Models",
        ) from None


def run_pipeline(
    image: np.ndarray,
    prompt: str,
    box_threshold,
    text_threshold,
    progress: gr.Progress | None = None,
):
    """Check inputs, load the models if needed (with progress), then segment."""
    prompt = check_prompt(prompt)
    box_threshold = check_threshold("box_threshold", box_threshold)
    text_threshold = check_threshold("text_threshold", text_threshold)
    if progress is not None and not MODELS.loaded:
        progress(0.05, desc="Loading models (the first start downloads the weights)")
    loaded_models()
    if progress is not None:
        progress(0.3, desc="Detecting and segmenting")
    zero_gpu = on_zero_gpu()
    if zero_gpu:  # a slider move whose masks are all cached needs no GPU call
        with contextlib.suppress(CacheMiss):
            return segment(image, prompt, box_threshold, text_threshold, models=False)
    result, added = segment_on_device(image, prompt, box_threshold, text_threshold)
    if zero_gpu:
        MODELS.get().adopt(added)
    return result


def present(
    image: np.ndarray,
    result,
    prompt: str,
    box_threshold: float,
    name: str,
    seconds: float,
    progress: gr.Progress | None = None,
    rle_cache: dict | None = None,
) -> tuple:
    """(annotated JPEG path, legend, table, [COCO JSON] download, message) for the UI.

    Plain values only: Gradio 6.31 fails on component updates returned while caching examples.
    `rle_cache` keeps the masks' RLEs of one image between slider moves (`report.cached_rles`).
    """
    from segmentation.visualize import annotate

    if progress is not None:
        progress(0.8, desc="Drawing")
    # In Gradio's own cache folder, so that it serves the files without hashing and copying
    # them (about 30 ms per answer).
    folder = export_folders(gr.utils.get_upload_folder()).new_run()
    rles = report.cached_rles(result, rle_cache) if rle_cache is not None else None
    return (
        report.write_picture(annotate(image, result), folder, name),
        report.legend_html(result),
        report.table(result),
        report.write_exports(image, result, name, with_zip=False, folder=folder, rles=rles),
        report.summary(result, prompt, box_threshold, seconds),
    )


def write_zip_exports(image: np.ndarray, result, name: str) -> list[str]:
    """[COCO JSON, ZIP] in a fresh export folder; a ZIP over its size bound is a user error."""
    try:
        return report.write_exports(
            image,
            result,
            name,
            with_zip=True,
            folder=export_folders(gr.utils.get_upload_folder()).new_run(),
        )
    except ValueError as error:
        raise bad_input(text_for_message(error), title="Export too large") from None


# ----------------------------------------------------------------------------- event handlers


def pausing_background(handler: Callable) -> Callable:
    """Hold the pipeline's background decoding while `handler` runs, draws and exports: on a
    2-core CPU it would slow the answer down (nothing to hold before the models load)."""

    @functools.wraps(handler)
    def held(*args, **kwargs):
        with MODELS.get().hold() if MODELS.loaded else contextlib.nullcontext():
            return handler(*args, **kwargs)

    return held


@pausing_background
def ui_segment(image_value, prompt, box_threshold, text_threshold, session, progress=PROGRESS):
    """Run button / Enter: decode the upload once per session, run, show everything."""
    path = upload_path(image_value)
    if session is not None and session["source"] == path:
        image = session["image"]
    else:
        image = decode_image(path)
        session = {"source": path, "image": image, "rles": {}}
    start = time.perf_counter()
    result = run_pipeline(image, prompt, box_threshold, text_threshold, progress)
    outputs = present(
        image,
        result,
        prompt,
        float(box_threshold),
        upload_name(image_value),
        time.perf_counter() - start,
        progress,
        session["rles"],
    )
    return (*outputs, session)


def ui_rethreshold(image_value, prompt, box_threshold, text_threshold, session, progress=PROGRESS):
    """Slider release: the pipeline re-filters its cached result (no model runs, no decoding
    when the session holds the image); without an image and a prompt, nothing happens."""
    if (
        upload_path(image_value) is None
        or not isinstance(prompt, str)
        or not any(character.isalnum() for character in prompt)
    ):
        return (gr.skip(),) * (UI_OUTPUT_COUNT + 1)
    return ui_segment(image_value, prompt, box_threshold, text_threshold, session, progress)


@pausing_background
def ui_zip(
    image_value,
    prompt,
    box_threshold,
    text_threshold,
    session,
    progress=PROGRESS,
) -> list[str]:
    """ "Prepare ZIP": the COCO JSON plus per-object masks and cut-outs for what is shown."""
    if session is None or session["source"] != upload_path(image_value):
        raise bad_input(
            "Press Segment first; the ZIP holds the masks of the shown result.",
            title="Nothing to export",
        )
    result = run_pipeline(session["image"], prompt, box_threshold, text_threshold, progress)
    progress(0.6, desc=f"Writing {len(result)} masks and cut-outs")
    return write_zip_exports(session["image"], result, upload_name(image_value))


@pausing_background
def example_segment(image_path: str, prompt: str, progress=PROGRESS):
    """Examples (lazily cached): default thresholds."""
    image = decode_image(image_path)
    start = time.perf_counter()
    result = run_pipeline(image, prompt, BOX_THRESHOLD, TEXT_THRESHOLD, progress)
    return present(
        image,
        result,
        prompt,
        BOX_THRESHOLD,
        upload_name(image_path),
        time.perf_counter() - start,
        progress,
    )


@pausing_background
def api_segment(image, prompt, box_threshold, text_threshold) -> dict:
    """Boxes (x0, y0, x1, y1 px), scores, phrases and COCO RLE masks for one image."""
    from segmentation.export import to_json_dict

    pixels = decode_image(upload_path(image))
    return to_json_dict(run_pipeline(pixels, prompt, box_threshold, text_threshold))


@pausing_background
def api_annotate(image, prompt, box_threshold, text_threshold) -> tuple:
    """Annotated image (an array: the API's output component encodes it as a lossless PNG),
    COCO JSON file and ZIP of per-object masks and cut-outs."""
    from segmentation.visualize import annotate

    pixels = decode_image(upload_path(image))
    result = run_pipeline(pixels, prompt, box_threshold, text_threshold)
    json_path, zip_path = write_zip_exports(pixels, result, upload_name(image))
    return annotate(pixels, result), json_path, zip_path


def load_on_page_open(progress=PROGRESS) -> str:
    if not MODELS.loaded:
        progress(0.1, desc="Loading models (the first start downloads the weights)")
    loaded_models()
    choice = MODELS.choice
    assert choice is not None  # loaded_models raised otherwise
    return f"Models ready: {choice.describe()}."
