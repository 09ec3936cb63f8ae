"""What a user of the app waits for: a slider release until the new result image is on screen.

The app (`app.build_demo`, the real event handlers and model store) serves full-size Grounding DINO
(SwinT-OGC) and SAM (ViT-B by default) with random weights on this machine; headless Chromium
(Debian's, as in tests/test_browser.py) uploads an image, types a prompt, presses Segment, then
moves the box threshold slider (typing into its number box and leaving it: the slider's `release`
event). Each figure runs from the number box's `change` event (the release; for the first run,
the click) until the new image has been fetched and decoded by the browser (a MutationObserver on
the result, then `img.decode()`), so it includes the queue, the handler (pipeline, drawing, JSON
export, JPEG), the transfer and the browser's work. Two parts of it are printed too: the
server's answer (from the page sending the event to the end of its answer stream: queue, handler
and Gradio's processing) and the UI handler alone. Chromium shares the machine's cores with the
server here.

Thresholds are picked from the raw scores so that the first run shows exactly --boxes boxes and
each step down shows --step more. Rows:
- first run: Segment pressed, nothing cached (detector, SAM embedding, decoding);
- cached: alternating between two thresholds seen before;
- down, decoded ahead: the user paused first, so the background thread had decoded the boxes
  below the threshold (the time it needed after the previous answer is printed too);
- down, past what was decoded ahead: more boxes than `BACKGROUND_BOXES` revealed at once.

    PYTHONPATH=. python scripts/benchmark_app.py --boxes 10 --step 3 --moves 5
"""

from __future__ import annotations

import argparse
import functools
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from segment_anything import sam_model_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import app  # noqa: E402  (the repository's app.py)
from grounding import Detector, build_model  # noqa: E402
from grounding.config import PRESETS  # noqa: E402
from segmentation.models import ModelChoice  # noqa: E402
from segmentation.pipeline import GroundedSAM, LookAhead  # noqa: E402
from segmentation.sam import BoxSegmenter  # noqa: E402
from ui.handlers import BACKGROUND_BOXES, MAX_DETECTIONS, GroundedSamApp  # noqa: E402

VOCAB = Path(__file__).resolve().parents[1] / "tests" / "data" / "bert-base-uncased-vocab.txt"
PROMPT = "a cat . a remote control . a dog . a person ."
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
# Records when the slider's number box commits a value (window.__t0: its change event, the moment
# of the release) and when the result image changes and is decoded (window.__shownAt).
WATCH_RESULT = """() => {
  document.querySelector('#box_threshold input[type=number]').addEventListener(
    'change', () => { window.__t0 = performance.now(); }, {capture: true});
  const root = document.querySelector('#annotated');
  window.__last = root.querySelector('img') ? root.querySelector('img').src : null;
  new MutationObserver(() => {
    const img = root.querySelector('img');
    if (img && img.src && img.src !== window.__last) {
      window.__last = img.src;
      img.decode().then(() => { window.__shownAt = performance.now(); });
    }
  }).observe(root, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
}"""
# (input changed -> image shown, request sent -> answer received) in seconds, from the page's
# resource timings: the event's queue/join request and its queue/data stream.
TIMES = """() => {
  const after = performance.getEntriesByType('resource').filter(e => e.startTime >= window.__t0);
  const join = after.find(e => e.name.includes('/queue/join'));
  const data = after.find(e => e.name.includes('/queue/data'));
  return [(window.__shownAt - window.__t0) / 1000, (data.responseEnd - join.startTime) / 1000];
}"""


def full_size_pipeline(sam: str, device: torch.device) -> GroundedSAM:
    """SwinT-OGC and SAM with random weights, the app's background setting."""
    from transformers import BertTokenizer

    torch.manual_seed(0)
    model = build_model(PRESETS["swint_ogc"]())
    with torch.no_grad():  # random logits (std ~10) saturate to score 1.0; spread them out
        model.decoder.norm.weight.mul_(0.05)
        model.decoder.norm.bias.mul_(0.05)
    detector = Detector(model, BertTokenizer(vocab=str(VOCAB), do_lower_case=True),
                        device=device)
    segmenter = BoxSegmenter(sam_model_registry[sam](checkpoint=None).to(device).eval())
    return GroundedSAM(detector, segmenter, look_ahead=LookAhead.background(BACKGROUND_BOXES))


def serve(pipeline: GroundedSAM, sam: str, device: torch.device,
          handler_seconds: list[float]) -> str:
    """The app on a free localhost port, its handlers serving `pipeline`; the duration of each
    call of the UI handler is appended to `handler_seconds`."""
    choice = ModelChoice(detector="swint_ogc", sam=sam, device=str(device), offline=False)
    # No weights loaded; `pipeline` has the app's look-ahead already.
    handlers = GroundedSamApp(choice, loader=lambda choice, look_ahead: pipeline)
    handler = handlers.ui_segment  # the run button's, and the sliders' through ui_rethreshold

    @functools.wraps(handler)
    def timed_handler(*args, **kwargs):
        start = time.perf_counter()
        try:
            return handler(*args, **kwargs)
        finally:
            handler_seconds.append(time.perf_counter() - start)

    handlers.ui_segment = timed_handler  # shadows the method, for ui_rethreshold too
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = app.AppConfig(models=choice, host="127.0.0.1", port=port)
    app.launch(app.build_demo(config, handlers), config, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sam", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--size", default="800x1200", help="HxW of the image")
    parser.add_argument("--boxes", type=int, default=10, help="boxes shown by the first run")
    parser.add_argument("--step", type=int, default=3, help="boxes added by a slider step")
    parser.add_argument("--moves", type=int, default=5, help="slider moves of each kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    height, width = (int(v) for v in args.size.split("x"))
    pipeline = full_size_pipeline(args.sam, device)
    ahead = pipeline.look_ahead.background_boxes
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image_path = Path(tempfile.mkdtemp()) / "random.png"
    Image.fromarray(image).save(image_path)

    detector = pipeline.detector  # the scores, from a separate detector run (not cached)
    scores = np.sort(detector.select(detector.infer(image, PROMPT), 0.0, 0.0).scores)[::-1]
    shown = {"first": args.boxes}
    shown["down"] = [args.boxes + args.step * (i + 1) for i in range(args.moves)]
    shown["past"] = shown["down"][-1] + ahead + args.step
    if shown["past"] > MAX_DETECTIONS:
        parser.error(f"--boxes + --step x (--moves + 1) + {ahead} must stay within the app's "
                     f"cap of {MAX_DETECTIONS} detections")
    if len(np.unique(scores[:shown["past"] + 1])) <= shown["past"]:
        raise RuntimeError("tied scores: thresholds cannot pick exact box counts")

    def threshold(count: int) -> float:  # shows exactly `count` boxes
        return float(scores[count - 1] + scores[count]) / 2

    handler_seconds: list[float] = []
    url = serve(pipeline, args.sam, device, handler_seconds)
    rows: dict[str, list[tuple[float, float, float]]] = {}  # (total, server answer, handler)
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.set_default_timeout(600_000)
        page.goto(url)
        expect(page.locator("#model_status")).to_contain_text("Models ready")
        page.locator("#input_image input[type=file]").set_input_files(str(image_path))
        number = page.locator("#box_threshold input[type=number]")

        def release(count: int) -> None:  # no prompt yet: the release event does nothing
            number.fill(repr(threshold(count)))
            number.press("Tab")

        def timed_release(count: int, row: str, action=None) -> None:
            page.evaluate("() => { window.__shownAt = null; window.__t0 = performance.now(); }")
            (action or (lambda: release(count)))()
            page.wait_for_function("() => window.__shownAt !== null")
            total, answer = page.evaluate(TIMES)
            noun = "object" if count == 1 else "objects"
            expect(page.locator("#message")).to_contain_text(f"Found {count} {noun}")
            rows.setdefault(row, []).append((total, answer, handler_seconds[-1]))

        release(shown["first"])
        page.locator("#prompt textarea").fill(PROMPT)
        page.evaluate(WATCH_RESULT)
        timed_release(shown["first"], "first run (Segment pressed, nothing cached)",
                      action=lambda: page.locator("#run").click())
        start = time.perf_counter()
        pipeline.wait_idle()
        waits = [time.perf_counter() - start]
        for index in range(args.moves):
            count = shown["first"] - args.step if index % 2 == 0 else shown["first"]
            timed_release(count, "slider, thresholds seen before")
        for count in shown["down"]:
            start = time.perf_counter()
            pipeline.wait_idle()  # the user paused: the background caught up
            waits.append(time.perf_counter() - start)
            timed_release(count, f"slider down, +{args.step} boxes, decoded ahead")
        pipeline.wait_idle()
        decoded = pipeline.stats.boxes_decoded
        timed_release(shown["past"], f"slider down, +{ahead + args.step} boxes, "
                                     f"{args.step} past those decoded ahead")
        past_decoded = pipeline.stats.boxes_decoded - decoded
        browser.close()
    pipeline.wait_idle()  # before the interpreter exits under a running decode

    print(f"SwinT-OGC + SAM {args.sam}, {height}x{width} image on {device} ({args.threads} "
          f"threads, fp32), random weights; app in-process, headless Chromium")
    print("| what | in the browser, median s | server answer | handler | browser runs |")
    print("|---|---|---|---|---|")
    for name, values in rows.items():
        total, answer, handler = (statistics.median(v[i] for v in values) for i in range(3))
        print(f"| {name} | {total:.3f} | {answer:.3f} | {handler:.3f} | "
              f"{' / '.join(f'{v[0]:.3f}' for v in values)} |")
    print(f"background decoding still going when the next move came, waited for: first "
          f"{waits[0]:.2f} s ({ahead} boxes), then median {statistics.median(waits[1:]):.2f} s")
    print(f"boxes decoded by the last move: {past_decoded}; pipeline stats {pipeline.stats}")


if __name__ == "__main__":
    main()
