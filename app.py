"""Grounded SAM in the browser: upload an image, name what to find, get boxes and masks (Gradio 6).

    python app.py                  # SwinT + SAM ViT-H on a GPU, SwinT + ViT-B on CPU
    python app.py --offline        # tiny random-weight models, no downloads (tests, UI demos)
    python app.py --sam vit_l --detector swinb --listen --port 7860

Flags fall back to environment variables (GROUNDED_SAM_DETECTOR, _SAM, _DEVICE, _OFFLINE=1,
GRADIO_SERVER_NAME, GRADIO_SERVER_PORT), which is how a Hugging Face Space is configured.
Named endpoints for gradio_client: `/segment` (image, prompt, box_threshold, text_threshold) ->
JSON with boxes, scores, phrases and COCO RLE masks; `/annotate` (same inputs) -> annotated PNG,
COCO JSON file, ZIP of masks and cut-outs. UI-only events are private.

Models load once, on first use (page load or first request), not at import; on Spaces they load at
import, outside any `@spaces.GPU` call, as ZeroGPU requires. Threshold sliders call the pipeline
again: it re-filters its cached detector output and decodes only new masks (no model re-run).
"""

from __future__ import annotations

try:  # ZeroGPU: `spaces` must be imported before torch initialises CUDA.
    import spaces
except ImportError:  # not on a Space: @gpu is a no-op
    spaces = None

import argparse
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np

from segmentation.cli import ModelChoice, add_model_arguments, load_models, model_choice
from segmentation.report import TABLE_HEADERS, legend_html, summary, table, write_exports

ASSETS = Path(__file__).parent / "assets"
EXAMPLES = [[str(ASSETS / "street.jpg"), "car . house . tree ."],
            [str(ASSETS / "fruit.jpg"), "apple . banana . bowl ."],
            [str(ASSETS / "shapes.jpg"), "red ball . blue box . green triangle ."]]
ON_SPACES = bool(os.environ.get("SPACE_ID"))
MAX_PROMPT_CHARS = 2000
GPU_DURATION_S = 40
# Default of the handlers' `progress` parameter: Gradio gives each call its own tracker and only
# reads `track_tqdm` here (tqdm bars, e.g. weight downloads, show in the page).
PROGRESS = gr.Progress(track_tqdm=True)


def gpu(fn: Callable) -> Callable:
    """`spaces.GPU` when the `spaces` package is present (a no-op off ZeroGPU); else `fn`."""
    return spaces.GPU(duration=GPU_DURATION_S)(fn) if spaces is not None else fn


class ModelStore:
    """The one pipeline of this process, loaded on first use (thread-safe)."""

    def __init__(self) -> None:
        self.choice: ModelChoice | None = None
        self._pipeline = None
        self._lock = threading.Lock()

    def configure(self, choice: ModelChoice) -> None:
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
                self._pipeline = load_models(self.choice)
            return self._pipeline


MODELS = ModelStore()


@dataclass(frozen=True)
class AppConfig:
    models: ModelChoice
    host: str
    port: int | None


def parse_args(argv: Sequence[str] | None = None) -> AppConfig:
    parser = argparse.ArgumentParser(description="Grounded SAM web app (Gradio).")
    add_model_arguments(parser)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1: this machine only; "
                             "env GRADIO_SERVER_NAME)")
    parser.add_argument("--listen", action="store_true",
                        help="bind 0.0.0.0: serve other machines on the network")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default: GRADIO_SERVER_PORT, else the first free from 7860)")
    args = parser.parse_args(argv)
    try:
        models = model_choice(args)
    except ValueError as error:
        parser.error(str(error))
    return AppConfig(models=models, host="0.0.0.0" if args.listen else args.host, port=args.port)


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
        raise bad_input("Type what to find, for example 'a cat . a remote control .'",
                       title="Empty prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad_input(f"The prompt has {len(prompt)} characters; the limit is "
                       f"{MAX_PROMPT_CHARS}.", title="Prompt too long")
    return prompt


def check_threshold(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise bad_input(f"{name} must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise bad_input(f"{name} must be between 0 and 1, got {value}")
    return value


def decode_image(path: str | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an uploaded file (EXIF-rotated, any mode, size-capped)."""
    from segmentation.images import load_image

    if path is None:
        raise bad_input("Upload an image first (or pick an example).", title="No image")
    try:  # from bytes, so messages say "the uploaded file", not a server path
        return np.asarray(load_image(Path(path).read_bytes()))
    except (OSError, ValueError) as error:
        raise bad_input(f"This file cannot be used as an image: {error}",
                       title="Unreadable image") from None


def validate_run(image_value, prompt, box_threshold, text_threshold, session) -> list[dict]:
    """Event validator: refuse a run without image or prompt before it is queued."""
    has_words = isinstance(prompt, str) and any(character.isalnum() for character in prompt)
    valid = gr.validate(True, "")
    return [gr.validate(upload_path(image_value) is not None, "Upload an image first."),
            gr.validate(has_words, "Type what to find, for example 'cat . dog .'"),
            valid, valid, valid]


# ----------------------------------------------------------------------------- running


@gpu
def segment_on_device(image: np.ndarray, prompt: str, box_threshold: float,
                      text_threshold: float):
    """One pipeline call (on ZeroGPU: in the GPU worker; arguments and result are numpy)."""
    try:
        return MODELS.get().run(image, prompt, box_threshold, text_threshold)
    except ValueError as error:  # e.g. one phrase of the prompt longer than 256 tokens
        raise bad_input(str(error), title="Cannot segment") from None


def loaded_models():
    """The pipeline, or a gr.Error that says which file is missing and how to supply it."""
    try:
        return MODELS.get()
    except (OSError, ValueError, RuntimeError) as error:
        raise gr.Error(f"The models could not be loaded: {error} (To try the interface without "
                       "weights, start the app with --offline.)", title="Models") from None


def run_pipeline(image: np.ndarray, prompt: str, box_threshold, text_threshold,
                 progress: gr.Progress | None = None):
    """Check inputs, load the models if needed (with progress), then segment."""
    prompt = check_prompt(prompt)
    box_threshold = check_threshold("box_threshold", box_threshold)
    text_threshold = check_threshold("text_threshold", text_threshold)
    if progress is not None and not MODELS.loaded:
        progress(0.05, desc="Loading models (the first start downloads the weights)")
    loaded_models()
    if progress is not None:
        progress(0.3, desc="Detecting and segmenting")
    return segment_on_device(image, prompt, box_threshold, text_threshold)


def present(image: np.ndarray, result, prompt: str, box_threshold: float, name: str,
            seconds: float, progress: gr.Progress | None = None) -> tuple:
    """(annotated image, legend, table, [COCO JSON] download, message) for the UI.

    Plain values only: Gradio 6.31 fails on component updates returned while caching examples.
    """
    from segmentation.visualize import annotate

    if progress is not None:
        progress(0.8, desc="Drawing")
    return (annotate(image, result), legend_html(result), table(result),
            write_exports(image, result, name, with_zip=False),
            summary(result, prompt, box_threshold, seconds))


# ----------------------------------------------------------------------------- event handlers


def ui_segment(image_value, prompt, box_threshold, text_threshold, session,
               progress=PROGRESS):
    """Run button / Enter: decode the upload once per session, run, show everything."""
    path = upload_path(image_value)
    if session is not None and session["source"] == path:
        image = session["image"]
    else:
        image = decode_image(path)
        session = {"source": path, "image": image}
    start = time.perf_counter()
    result = run_pipeline(image, prompt, box_threshold, text_threshold, progress)
    outputs = present(image, result, prompt, float(box_threshold), upload_name(image_value),
                      time.perf_counter() - start, progress)
    return (*outputs, session)


def ui_rethreshold(image_value, prompt, box_threshold, text_threshold, session,
                   progress=PROGRESS):
    """Slider release: the pipeline re-filters its cached result (no model runs, no decoding
    when the session holds the image); without an image and a prompt, nothing happens."""
    if upload_path(image_value) is None or not isinstance(prompt, str) \
            or not any(character.isalnum() for character in prompt):
        return (gr.skip(),) * (UI_OUTPUT_COUNT + 1)
    return ui_segment(image_value, prompt, box_threshold, text_threshold, session, progress)


def ui_zip(image_value, prompt, box_threshold, text_threshold, session, progress=PROGRESS,
           ) -> list[str]:
    """"Prepare ZIP": the COCO JSON plus per-object masks and cut-outs for what is shown."""
    if session is None or session["source"] != upload_path(image_value):
        raise bad_input("Press Segment first; the ZIP holds the masks of the shown result.",
                        title="Nothing to export")
    result = run_pipeline(session["image"], prompt, box_threshold, text_threshold, progress)
    progress(0.6, desc=f"Writing {len(result)} masks and cut-outs")
    return write_exports(session["image"], result, upload_name(image_value), with_zip=True)


def example_segment(image_path: str, prompt: str, progress=PROGRESS):
    """Examples (lazily cached): default thresholds."""
    image = decode_image(image_path)
    start = time.perf_counter()
    result = run_pipeline(image, prompt, 0.35, 0.25, progress)
    return present(image, result, prompt, 0.35, upload_name(image_path),
                   time.perf_counter() - start, progress)


def api_segment(image, prompt, box_threshold, text_threshold) -> dict:
    """Boxes (x0, y0, x1, y1 px), scores, phrases and COCO RLE masks for one image."""
    from segmentation.export import to_json_dict

    pixels = decode_image(upload_path(image))
    return to_json_dict(run_pipeline(pixels, prompt, box_threshold, text_threshold))


def api_annotate(image, prompt, box_threshold, text_threshold) -> tuple:
    """Annotated PNG, COCO JSON file and ZIP of per-object masks and cut-outs."""
    from segmentation.visualize import annotate

    pixels = decode_image(upload_path(image))
    result = run_pipeline(pixels, prompt, box_threshold, text_threshold)
    json_path, zip_path = write_exports(pixels, result, upload_name(image), with_zip=True)
    return annotate(pixels, result), json_path, zip_path


def load_on_page_open(progress=PROGRESS) -> str:
    if not MODELS.loaded:
        progress(0.1, desc="Loading models (the first start downloads the weights)")
    loaded_models()
    return f"Models ready: {MODELS.choice.describe()}."


# ----------------------------------------------------------------------------- layout

UI_OUTPUT_COUNT = 5  # annotated, legend, detections, downloads, message
CSS = """
#offline_banner {background: #fff4d6; border: 1px solid #e0b84c; border-radius: 8px;
                 padding: 4px 12px; color: #5c4400}
.legend {display: flex; flex-wrap: wrap; gap: 10px; font-size: 0.95em}
.legend .chip {display: inline-flex; align-items: center; gap: 6px}
.legend .swatch {width: 14px; height: 14px; border-radius: 3px; display: inline-block}
"""
INTRO = """# Grounded SAM
Name what to find (phrases separated by “.”, e.g. `car . house . tree .`), upload an image and
press **Segment**. **Box threshold** decides which boxes are kept (a box's score is its best word
match); **text threshold** only decides which words of its phrase label a box. Moving a slider
re-filters the cached result: no model runs again.
"""
OFFLINE_BANNER = ("**Offline mode:** tiny random-weight models, nothing downloaded. Boxes, masks "
                  "and scores are meaningless; this mode is for tests and for trying the "
                  "interface.")


def build_demo(config: AppConfig) -> gr.Blocks:
    """The Blocks app for a configuration (models are not loaded here)."""
    MODELS.configure(config.models)
    with gr.Blocks(title="Grounded SAM", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        if config.models.offline:
            gr.Markdown(OFFLINE_BANNER, elem_id="offline_banner")
        status = gr.Markdown(f"Models: {config.models.describe()}.", elem_id="model_status")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", image_mode=None, label="Image",
                                 sources=["upload", "clipboard"], height=420,
                                 elem_id="input_image")
                prompt = gr.Textbox(label="What to find", placeholder="a cat . a remote control .",
                                    max_length=MAX_PROMPT_CHARS, elem_id="prompt")
                box_threshold = gr.Slider(0.0, 1.0, value=0.35, step=0.01, label="Box threshold",
                                          info="keep a box when its score is above this",
                                          elem_id="box_threshold")
                text_threshold = gr.Slider(0.0, 1.0, value=0.25, step=0.01,
                                           label="Text threshold",
                                           info="words above this label a box (never removes one)",
                                           elem_id="text_threshold")
                run = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column(scale=1):
                annotated = gr.Image(label="Result", type="numpy", format="png",
                                     interactive=False, height=420, elem_id="annotated")
                legend = gr.HTML(elem_id="legend")
                message = gr.Markdown(elem_id="message")
                downloads = gr.File(label="Downloads: COCO JSON with RLE masks (and the ZIP)",
                                    file_count="multiple", interactive=False,
                                    elem_id="downloads")
                make_zip = gr.Button("Prepare ZIP: PNG masks + transparent cut-outs", size="sm",
                                     elem_id="make_zip")
        detections = gr.Dataframe(headers=TABLE_HEADERS, label="Detections", interactive=False,
                                  elem_id="detections")
        ui_outputs = [annotated, legend, detections, downloads, message]
        inputs = [image, prompt, box_threshold, text_threshold, session]
        with examples_cache(config.models):
            gr.Examples(EXAMPLES, inputs=[image, prompt], outputs=ui_outputs,
                        fn=example_segment, cache_examples=True, cache_mode="lazy",
                        label="Examples (synthetic scenes)")
        shared = dict(concurrency_id="models", concurrency_limit=1, preprocess=False)
        gr.on([run.click, prompt.submit], ui_segment, inputs, [*ui_outputs, session],
              validator=validate_run, api_visibility="private", **shared)
        for slider in (box_threshold, text_threshold):
            slider.release(ui_rethreshold, inputs, [*ui_outputs, session],
                           api_visibility="private", show_progress="minimal", **shared)
        make_zip.click(ui_zip, inputs, downloads, api_visibility="private", **shared)
        demo.load(load_on_page_open, outputs=status, api_visibility="private",
                  concurrency_id="models", concurrency_limit=1)

        # API-only endpoints: hidden outputs, never triggered by the page.
        api_json = gr.JSON(label="detections", visible=False)
        api_image = gr.Image(label="annotated", type="numpy", format="png", visible=False)
        api_coco = gr.File(label="coco_json", visible=False)
        api_zip = gr.File(label="masks_zip", visible=False)
        api_inputs = [image, prompt, box_threshold, text_threshold]
        gr.on([], api_segment, api_inputs, api_json, api_name="segment", **shared)
        gr.on([], api_annotate, api_inputs, [api_image, api_coco, api_zip],
              api_name="annotate", **shared)
    return demo


@contextmanager
def examples_cache(choice: ModelChoice) -> Iterator[None]:
    """Cache examples per model choice (Gradio reads the folder from the environment when
    gr.Examples is built), so results of random offline weights never show for real models."""
    saved = os.environ.get("GRADIO_EXAMPLES_CACHE")
    tag = "offline" if choice.offline else f"{Path(choice.detector).name}-{choice.sam}"
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(Path(saved or ".gradio/cached_examples") / tag)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("GRADIO_EXAMPLES_CACHE")
        else:
            os.environ["GRADIO_EXAMPLES_CACHE"] = saved


def launch(demo: gr.Blocks, config: AppConfig, **kwargs):
    """Queue (one model call at a time) and serve; Spaces picks its own host and port."""
    host = {} if ON_SPACES else {"server_name": config.host, "server_port": config.port}
    return demo.queue(max_size=64).launch(
        **host, max_file_size="25mb", theme=gr.themes.Soft(), css=CSS,
        footer_links=["api", "gradio", "settings"], **kwargs)


if ON_SPACES:
    # At import, outside any @spaces.GPU call: ZeroGPU wants the weights on the device up front.
    SPACE_CONFIG = parse_args([])
    demo = build_demo(SPACE_CONFIG)
    MODELS.get()

if __name__ == "__main__":
    if ON_SPACES:
        launch(demo, SPACE_CONFIG)
    else:
        app_config = parse_args()
        launch(build_demo(app_config), app_config)
