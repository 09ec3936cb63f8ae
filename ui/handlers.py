"""What the app's events do: `GroundedSamApp`, whose bound methods app.py wires to its components.

One object per served app holds everything the handlers share: the pipeline (loaded on first
use), the export folders and the settings; nothing lives in module globals. Input checks are
Gradio-free (`segmentation.inputs`); here their InputErrors become gr.Error with the same words.

UI handlers return plain values for the page: the annotated image as a JPEG file (Gradio's PNG
encoding of an array takes 290 ms for 1200 x 800 on 2 cores, the JPEG under 10 ms), the legend,
the table, the COCO JSON download and a summary line. API handlers return what a script wants:
JSON, or a lossless PNG with the export files. Every run shows at most `max_detections`.

On ZeroGPU, CUDA may only be used inside `@spaces.GPU` calls, which run in a forked worker
process: `segment_on_device` is the one call that runs the models, the cache entries it adds are
copied back into the main process's pipeline, and a slider move whose masks are all cached is
answered there without a GPU call. No background thread decodes masks there; the GPU call decodes
the boxes just below the threshold instead (`ZERO_GPU_PREFETCH_BOXES`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr
import numpy as np

from segmentation import inputs, report
from segmentation.export_folders import ExportFolders
from segmentation.inputs import InputError, has_words, text_for_message, upload_name, upload_path
from segmentation.look_ahead import LookAhead
from segmentation.models import ModelChoice, load_models
from segmentation.pipeline import GroundedSAM
from segmentation.results import CacheMiss
from ui.zero_gpu import gpu, on_zero_gpu

EXAMPLE_ASSETS = Path(__file__).resolve().parent.parent / "assets"
MAX_DETECTIONS = 100  # each mask is H x W bytes and about 0.1 s of SAM decoding on a CPU
BACKGROUND_BOXES = 48  # decoded after each run, just below the threshold: sliding down is instant
ZERO_GPU_PREFETCH_BOXES = 48  # on ZeroGPU the GPU call decodes them (milliseconds each) instead
BOX_THRESHOLD, TEXT_THRESHOLD = 0.35, 0.25  # the sliders' and the examples' defaults
UI_OUTPUT_COUNT = 5  # annotated image, legend, detections, downloads, message
# Default of the handlers' `progress` parameter: Gradio gives each call its own tracker and only
# reads `track_tqdm` here (tqdm bars, e.g. weight downloads, show in the page).
PROGRESS = gr.Progress(track_tqdm=True)


def bad_input(message: str, title: str = "Error") -> gr.Error:
    """An error for the user (a toast, or AppError in gradio_client); not logged as a fault."""
    return gr.Error(message, title=title, print_exception=False)


@contextlib.contextmanager
def shown_to_user() -> Iterator[None]:
    """Turn an InputError of `segmentation.inputs` into the gr.Error that shows it."""
    try:
        yield
    except InputError as error:
        raise bad_input(str(error), title=error.title) from None


def pausing_background(handler: Callable) -> Callable:
    """Hold the pipeline's background decoding while the `handler` method runs, draws and
    exports: on a 2-core CPU it would slow the answer down (nothing to hold before the models
    load)."""

    @functools.wraps(handler)
    def held(self: GroundedSamApp, *args, **kwargs):
        with self.pipeline().hold() if self.loaded else contextlib.nullcontext():
            return handler(self, *args, **kwargs)

    return held


class GroundedSamApp:
    """The app's handlers and what they share.

    Args:
        choice: the models to serve; they load on first use (`pipeline`), not here.
        loader: builds the pipeline for `choice` and `look_ahead` (a benchmark hands in its
            own).
        example_folder: example images the handlers read besides Gradio's upload folder.
        zero_gpu: whether this is a ZeroGPU Space; None: `on_zero_gpu()`.

    Attributes:
        max_detections: the most detections an answer shows (the best ones); None: all.
        look_ahead: how the pipeline decodes masks ahead: a background thread, or on ZeroGPU
            (where CUDA may only be used inside a request) the GPU call itself.
        segment_on_device: `segment` where the models can run (`spaces.GPU` on ZeroGPU), and
            the cache entries it added.
    """

    def __init__(
        self,
        choice: ModelChoice,
        *,
        loader: Callable[[ModelChoice, LookAhead], GroundedSAM] = load_models,
        example_folder: str | Path = EXAMPLE_ASSETS,
        zero_gpu: bool | None = None,
    ) -> None:
        self.choice = choice
        self.loader = loader
        self.example_folder = Path(example_folder)
        self.zero_gpu = on_zero_gpu() if zero_gpu is None else zero_gpu
        self.max_detections: int | None = MAX_DETECTIONS
        self.look_ahead = (
            LookAhead.prefetch(ZERO_GPU_PREFETCH_BOXES)
            if self.zero_gpu
            else LookAhead.background(BACKGROUND_BOXES)
        )
        self._pipeline: GroundedSAM | None = None
        self._lock = threading.Lock()  # held while the models load
        # By parent: Gradio reads its upload folder from the environment on each call.
        self._export_folders: dict[str, ExportFolders] = {}
        self._folders_lock = threading.Lock()
        # On ZeroGPU this runs in a forked worker, which inherits `self` and its pipeline; only
        # the image, prompt and thresholds, and the result, are pickled.
        self.segment_on_device = gpu(self._segment_on_device)

    # ------------------------------------------------------------------------- shared state

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def pipeline(self) -> GroundedSAM:
        """The GroundedSAM pipeline; the first call loads (and may download) the weights, once
        even when several events ask at the same time."""
        with self._lock:
            if self._pipeline is None:
                self._pipeline = self.loader(self.choice, self.look_ahead)
            return self._pipeline

    def export_folders(self) -> ExportFolders:
        """The export folders under Gradio's upload folder (so that Gradio serves the files
        without copying them), started on first use: stale folders of dead processes are removed
        then, old runs on a timer, and this process's own at exit."""
        parent = gr.utils.get_upload_folder()
        with self._folders_lock:
            if parent not in self._export_folders:
                self._export_folders[parent] = ExportFolders(parent).start()
            return self._export_folders[parent]

    # ------------------------------------------------------------------------- running

    def decode_image(self, path: str | None) -> np.ndarray:
        """(H, W, 3) uint8 RGB of an uploaded file or an example image (nothing else is read)."""
        with shown_to_user():
            roots = (gr.utils.get_upload_folder(), self.example_folder)
            return inputs.decode_image(path, roots)

    def segment(
        self,
        image: np.ndarray,
        prompt: str,
        box_threshold: float,
        text_threshold: float,
        *,
        cache_only: bool = False,
    ):
        """One pipeline call, at most `max_detections` detections (`cache_only`: or CacheMiss
        when a model would have to run)."""
        try:
            return self.pipeline().run(
                image,
                prompt,
                box_threshold,
                text_threshold,
                max_detections=self.max_detections,
                cache_only=cache_only,
            )
        except ValueError as error:  # e.g. one phrase of the prompt longer than 256 tokens
            raise bad_input(text_for_message(error), title="Cannot segment") from None

    def _segment_on_device(
        self, image: np.ndarray, prompt: str, box_threshold: float, text_threshold: float
    ) -> tuple:
        with self.pipeline().cache.recording() as added:
            result = self.segment(image, prompt, box_threshold, text_threshold)
        return result, added

    def loaded_models(self) -> GroundedSAM:
        """The pipeline, or a gr.Error that says which file is missing and how to supply it."""
        try:
            return self.pipeline()
        except (OSError, ValueError, RuntimeError) as error:
            raise gr.Error(
                f"The models could not be loaded: {text_for_message(error, 500)} "
                "(To try the interface without weights, start the app with --offline.)",
                title="Models",
            ) from None

    def run_pipeline(
        self,
        image: np.ndarray,
        prompt: str,
        box_threshold,
        text_threshold,
        progress: gr.Progress | None = None,
    ):
        """Check inputs, load the models if needed (with progress), then segment."""
        with shown_to_user():
            prompt = inputs.check_prompt(prompt)
            box_threshold = inputs.check_threshold("box_threshold", box_threshold)
            text_threshold = inputs.check_threshold("text_threshold", text_threshold)
        if progress is not None and not self.loaded:
            progress(0.05, desc="Loading models (the first start downloads the weights)")
        self.loaded_models()
        if progress is not None:
            progress(0.3, desc="Detecting and segmenting")
        if self.zero_gpu:  # a slider move whose masks are all cached needs no GPU call
            with contextlib.suppress(CacheMiss):
                return self.segment(image, prompt, box_threshold, text_threshold, cache_only=True)
        result, added = self.segment_on_device(image, prompt, box_threshold, text_threshold)
        if self.zero_gpu:
            self.pipeline().adopt(added)
        return result

    def present(
        self,
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
        folder = self.export_folders().new_run()
        rles = report.cached_rles(result, rle_cache) if rle_cache is not None else None
        return (
            report.write_picture(annotate(image, result), folder, name),
            report.legend_html(result),
            report.table(result),
            report.write_exports(image, result, name, with_zip=False, folder=folder, rles=rles),
            report.summary(result, prompt, box_threshold, seconds),
        )

    def write_zip_exports(self, image: np.ndarray, result, name: str) -> list[str]:
        """[COCO JSON, ZIP] in a fresh export folder; a ZIP over its size bound is a user error."""
        try:
            folder = self.export_folders().new_run()
            return report.write_exports(image, result, name, with_zip=True, folder=folder)
        except ValueError as error:
            raise bad_input(text_for_message(error), title="Export too large") from None

    # ------------------------------------------------------------------------- event handlers

    @staticmethod
    def validate_run(image_value, prompt, box_threshold, text_threshold, session) -> list[dict]:
        """Event validator: refuse a run without image or prompt before it is queued."""
        valid = gr.validate(True, "")
        return [
            gr.validate(upload_path(image_value) is not None, "Upload an image first."),
            gr.validate(has_words(prompt), "Type what to find, for example 'cat . dog .'"),
            valid,
            valid,
            valid,
        ]

    @pausing_background
    def ui_segment(
        self, image_value, prompt, box_threshold, text_threshold, session, progress=PROGRESS
    ):
        """Run button / Enter: decode the upload once per session, run, show everything."""
        path = upload_path(image_value)
        if session is not None and session["source"] == path:
            image = session["image"]
        else:
            image = self.decode_image(path)
            session = {"source": path, "image": image, "rles": {}}
        start = time.perf_counter()
        result = self.run_pipeline(image, prompt, box_threshold, text_threshold, progress)
        outputs = self.present(
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

    def ui_prepare(self, image_value, session):
        """Image uploaded: decode it into the session and start SAM's embedding of it in the
        background, so that Segment finds it ready (more than half of a first run on a CPU).
        Not on ZeroGPU (CUDA only inside a request) and not before the models are loaded."""
        path = upload_path(image_value)
        if path is None:
            return gr.skip()
        if session is None or session["source"] != path:
            session = {"source": path, "image": self.decode_image(path), "rles": {}}
        if self.loaded and not self.zero_gpu:
            # an image the pipeline refuses (too thin) is reported by Segment, with the prompt
            with contextlib.suppress(ValueError):
                self.pipeline().prepare(session["image"])
        return session

    def ui_rethreshold(
        self, image_value, prompt, box_threshold, text_threshold, session, progress=PROGRESS
    ):
        """Slider release: the pipeline re-filters its cached result (no model runs, no decoding
        when the session holds the image); without an image and a prompt, nothing happens."""
        if upload_path(image_value) is None or not has_words(prompt):
            return (gr.skip(),) * (UI_OUTPUT_COUNT + 1)
        return self.ui_segment(
            image_value, prompt, box_threshold, text_threshold, session, progress
        )

    @pausing_background
    def ui_zip(
        self, image_value, prompt, box_threshold, text_threshold, session, progress=PROGRESS
    ) -> list[str]:
        """ "Prepare ZIP": the COCO JSON plus per-object masks and cut-outs for what is shown."""
        if session is None or session["source"] != upload_path(image_value):
            raise bad_input(
                "Press Segment first; the ZIP holds the masks of the shown result.",
                title="Nothing to export",
            )
        result = self.run_pipeline(
            session["image"], prompt, box_threshold, text_threshold, progress
        )
        progress(0.6, desc=f"Writing {len(result)} masks and cut-outs")
        return self.write_zip_exports(session["image"], result, upload_name(image_value))

    @pausing_background
    def example_segment(self, image_path: str, prompt: str, progress=PROGRESS):
        """Examples (lazily cached): default thresholds."""
        image = self.decode_image(image_path)
        start = time.perf_counter()
        result = self.run_pipeline(image, prompt, BOX_THRESHOLD, TEXT_THRESHOLD, progress)
        return self.present(
            image,
            result,
            prompt,
            BOX_THRESHOLD,
            upload_name(image_path),
            time.perf_counter() - start,
            progress,
        )

    @pausing_background
    def api_segment(self, image, prompt, box_threshold, text_threshold) -> dict:
        """Boxes (x0, y0, x1, y1 px), scores, phrases and COCO RLE masks for one image."""
        from segmentation.export import to_json_dict

        pixels = self.decode_image(upload_path(image))
        return to_json_dict(self.run_pipeline(pixels, prompt, box_threshold, text_threshold))

    @pausing_background
    def api_annotate(self, image, prompt, box_threshold, text_threshold) -> tuple:
        """Annotated image (an array: the API's output component encodes it as a lossless PNG),
        COCO JSON file and ZIP of per-object masks and cut-outs."""
        from segmentation.visualize import annotate

        pixels = self.decode_image(upload_path(image))
        result = self.run_pipeline(pixels, prompt, box_threshold, text_threshold)
        json_path, zip_path = self.write_zip_exports(pixels, result, upload_name(image))
        return annotate(pixels, result), json_path, zip_path

    def load_on_page_open(self, progress=PROGRESS) -> str:
        if not self.loaded:
            progress(0.1, desc="Loading models (the first start downloads the weights)")
        self.loaded_models()
        return f"Models ready: {self.choice.describe()}."
