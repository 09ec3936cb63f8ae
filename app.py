"""Grounded SAM in the browser: upload an image, name what to find, get boxes and masks (Gradio 6).

    python app.py                  # SwinT + SAM ViT-H on a GPU, SwinT + ViT-B on CPU
    python app.py --offline        # small models trained here on shapes, no downloads
    python app.py --sam vit_l --detector swinb --listen --port 7860

Flags fall back to environment variables (GROUNDED_SAM_DETECTOR, _SAM, _DEVICE, _OFFLINE=1,
GRADIO_SERVER_NAME, GRADIO_SERVER_PORT), which is how a Hugging Face Space is configured.
Named endpoints for gradio_client: `/segment` (image, prompt, box_threshold, text_threshold) ->
JSON with boxes, scores, phrases, COCO RLE masks and how many were omitted (at most 100 are
kept); `/annotate` (same inputs) -> annotated PNG, COCO JSON file, ZIP of masks and cut-outs.
UI-only events are private. What the events do is in `ui/handlers.py`: `main` builds one
`GroundedSamApp` and this file wires its bound methods to the layout, then launches.

Models load once, on first use (page load or first request), not at import; on Spaces they load
before the launch, outside any `@spaces.GPU` call, as ZeroGPU requires. Threshold sliders call
the pipeline again: it re-filters its cached detector output and decodes only new masks (no model
re-run).
"""

from __future__ import annotations

try:  # ZeroGPU: `spaces` must be imported before torch initialises CUDA.
    import spaces  # noqa: F401
except ImportError:  # not on a Space: ui.zero_gpu makes `gpu` a no-op
    pass

import argparse
import os
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from segmentation.inputs import MAX_PROMPT_CHARS
from segmentation.models import ModelChoice, add_model_arguments, model_choice
from segmentation.offline import EXAMPLE_PROMPT, known_names_text
from segmentation.report import TABLE_HEADERS
from ui.handlers import BOX_THRESHOLD, TEXT_THRESHOLD, GroundedSamApp

ASSETS = Path(__file__).parent / "assets"
SHAPES_EXAMPLE = [str(ASSETS / "shapes.jpg"), EXAMPLE_PROMPT]
EXAMPLES = [
    [str(ASSETS / "street.jpg"), "car . house . tree ."],
    [str(ASSETS / "fruit.jpg"), "apple . banana . bowl ."],
    SHAPES_EXAMPLE,
]
# The offline models know only the shapes' 12 names: examples they can answer.
OFFLINE_EXAMPLES = [
    [str(ASSETS / "generated_shapes.jpg"), "red circle . green circle . green triangle ."],
    SHAPES_EXAMPLE,
]
ON_SPACES = bool(os.environ.get("SPACE_ID"))


@dataclass(frozen=True)
class AppConfig:
    models: ModelChoice
    host: str
    port: int | None


def parse_args(argv: Sequence[str] | None = None) -> AppConfig:
    parser = argparse.ArgumentParser(description="Grounded SAM web app (Gradio).")
    add_model_arguments(parser)
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to bind (default 127.0.0.1: this machine only; env GRADIO_SERVER_NAME)",
    )
    parser.add_argument(
        "--listen", action="store_true", help="bind 0.0.0.0: serve other machines on the network"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="port (default: GRADIO_SERVER_PORT, else the first free from 7860)",
    )
    args = parser.parse_args(argv)
    try:
        models = model_choice(args)
    except ValueError as error:
        parser.error(str(error))
    return AppConfig(models=models, host="0.0.0.0" if args.listen else args.host, port=args.port)


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
OFFLINE_BANNER = (
    "**Offline mode:** small models trained here on synthetic shapes, nothing "
    f"downloaded. They know 12 names: {known_names_text()}. Anything else (a dog, "
    "a car) finds little or nothing; start without `--offline` for the real "
    "Grounding DINO and SAM."
)


def build_demo(config: AppConfig, handlers: GroundedSamApp | None = None) -> gr.Blocks:
    """The Blocks app for a configuration, its events answered by `handlers` (default: a new
    GroundedSamApp for `config.models`; models are not loaded here)."""
    if handlers is None:
        handlers = GroundedSamApp(config.models, example_folder=ASSETS)
    # Now, not on the first answer: export folders left by processes that died are removed.
    handlers.export_folders()
    with gr.Blocks(
        title="Grounded SAM", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as demo:
        gr.Markdown(INTRO)
        if config.models.offline:
            gr.Markdown(OFFLINE_BANNER, elem_id="offline_banner")
        status = gr.Markdown(f"Models: {config.models.describe()}.", elem_id="model_status")
        session = gr.State(None, time_to_live=3600)  # the decoded image: bounded in time too
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    label="Image",
                    sources=["upload", "clipboard"],
                    height=420,
                    elem_id="input_image",
                )
                prompt = gr.Textbox(
                    label="What to find",
                    placeholder="a cat . a remote control .",
                    max_length=MAX_PROMPT_CHARS,
                    elem_id="prompt",
                )
                box_threshold = gr.Slider(
                    0.0,
                    1.0,
                    value=BOX_THRESHOLD,
                    step=0.01,
                    label="Box threshold",
                    info="keep a box when its score is above this",
                    elem_id="box_threshold",
                )
                text_threshold = gr.Slider(
                    0.0,
                    1.0,
                    value=TEXT_THRESHOLD,
                    step=0.01,
                    label="Text threshold",
                    info="words above this label a box (never removes one)",
                    elem_id="text_threshold",
                )
                run = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column(scale=1):
                # A JPEG file written by the handler: Gradio's PNG of an array is ~30x slower.
                annotated = gr.Image(
                    label="Result",
                    type="filepath",
                    interactive=False,
                    height=420,
                    elem_id="annotated",
                )
                legend = gr.HTML(elem_id="legend")
                message = gr.Markdown(elem_id="message")
                downloads = gr.File(
                    label="Downloads: COCO JSON with RLE masks (and the ZIP)",
                    file_count="multiple",
                    interactive=False,
                    elem_id="downloads",
                )
                make_zip = gr.Button(
                    "Prepare ZIP: PNG masks + transparent cut-outs", size="sm", elem_id="make_zip"
                )
        detections = gr.Dataframe(
            headers=TABLE_HEADERS, label="Detections", interactive=False, elem_id="detections"
        )
        ui_outputs = [annotated, legend, detections, downloads, message]
        inputs = [image, prompt, box_threshold, text_threshold, session]
        examples = gr.Examples(
            OFFLINE_EXAMPLES if config.models.offline else EXAMPLES,
            inputs=[image, prompt],
            outputs=ui_outputs,
            fn=handlers.example_segment,
            cache_examples=True,
            cache_mode="lazy",
            label="Examples (synthetic scenes)",
        )
        cache_examples_in(examples, examples_cache_folder(config.models))
        shared: dict[str, Any] = dict(
            concurrency_id="models", concurrency_limit=1, preprocess=False
        )
        gr.on(
            [run.click, prompt.submit],
            handlers.ui_segment,
            inputs,
            [*ui_outputs, session],
            validator=handlers.validate_run,
            api_visibility="private",
            **shared,
        )
        for slider in (box_threshold, text_threshold):
            slider.release(
                handlers.ui_rethreshold,
                inputs,
                [*ui_outputs, session],
                api_visibility="private",
                show_progress="minimal",
                **shared,
            )
        make_zip.click(handlers.ui_zip, inputs, downloads, api_visibility="private", **shared)
        # SAM's embedding starts on upload, while the prompt is typed (its own queue: the
        # handler only decodes the image and hands it to the pipeline's thread).
        image.upload(
            handlers.ui_prepare,
            [image, session],
            session,
            api_visibility="private",
            show_progress="hidden",
            preprocess=False,
            concurrency_id="prepare",
            concurrency_limit=1,
        )
        demo.load(
            handlers.load_on_page_open,
            outputs=status,
            api_visibility="private",
            concurrency_id="models",
            concurrency_limit=1,
        )

        # API-only endpoints: hidden outputs, never triggered by the page.
        api_json = gr.JSON(label="detections", visible=False)
        api_image = gr.Image(label="annotated", type="numpy", format="png", visible=False)
        api_coco = gr.File(label="coco_json", visible=False)
        api_zip = gr.File(label="masks_zip", visible=False)
        api_inputs = [image, prompt, box_threshold, text_threshold]
        gr.on([], handlers.api_segment, api_inputs, api_json, api_name="segment", **shared)
        gr.on(
            [],
            handlers.api_annotate,
            api_inputs,
            [api_image, api_coco, api_zip],
            api_name="annotate",
            **shared,
        )
    return demo


def examples_cache_folder(choice: ModelChoice) -> Path:
    """Where the examples' results are cached for a model choice: its own folder in Gradio's
    examples cache, so that results of the offline shapes models never show for real models,
    nor fp32 results in int8 mode (`--compile` gives the same outputs: no folder of its own)."""
    tag = "offline-shapes" if choice.offline else f"{Path(choice.detector).name}-{choice.sam}"
    if choice.quantize == "int8":
        tag += "-int8"
    return gr.utils.get_cache_folder() / tag


def cache_examples_in(examples: gr.helpers.Examples, folder: Path) -> None:
    """Make `examples` cache its results in `folder` instead of Gradio's shared one.

    Gradio 6 has no argument for this: gr.Examples takes its folder from the process-wide
    GRADIO_EXAMPLES_CACHE when it is built. The paths it derives are set again here, before
    anything is cached (lazy caching reads them on the first click). Gradio serves files from
    anywhere under its cache folder, `folder` included. (Gradio's start-up line "Will cache
    examples in ..." still names the shared folder.)
    """
    examples.cached_folder = folder / str(examples.dataset._id)
    examples.cached_file = examples.cached_folder / "log.csv"
    examples.cached_indices_file = examples.cached_folder / "indices.csv"
    if os.environ.get("GRADIO_RESET_EXAMPLES_CACHE") == "True" and examples.cached_folder.exists():
        shutil.rmtree(examples.cached_folder)  # what gr.Examples did for the shared folder


def launch(demo: gr.Blocks, config: AppConfig, **kwargs):
    """Queue (one model call at a time) and serve; Spaces picks its own host and port."""
    host = {} if ON_SPACES else {"server_name": config.host, "server_port": config.port}
    return demo.queue(max_size=64).launch(
        **host,
        max_file_size="25mb",
        theme=gr.themes.Soft(),
        css=CSS,
        footer_links=["api", "gradio", "settings"],
        **kwargs,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the app; on Spaces with the Space's configuration (environment variables only)."""
    # SIGTERM (docker stop, Spaces restarts) ends the server like Ctrl-C does, so exit handlers
    # run: the export folder of this process is removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    config = parse_args([] if ON_SPACES else argv)
    handlers = GroundedSamApp(config.models, example_folder=ASSETS)
    demo = build_demo(config, handlers)
    if ON_SPACES:
        # Before the launch, outside any @spaces.GPU call: ZeroGPU wants the weights on the
        # device up front.
        handlers.pipeline()
    launch(demo, config)


if __name__ == "__main__":
    main()
