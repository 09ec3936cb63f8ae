"""The app in a real browser: `python app.py --offline` in a subprocess, driven by Playwright
through Debian's headless Chromium (Playwright's own browser download is not used)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("playwright is not installed (requirements-test.txt)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--no-first-run"]
SCREENSHOT_COPY = Path("/tmp/app_screenshot.png")
PROMPT = "red circle . green triangle . green circle . yellow triangle ."
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="module")
def app_url(tmp_path_factory) -> str:
    """`python app.py --offline --port N` running until the module's tests are done."""
    tmp = tmp_path_factory.mktemp("browser-app")
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"),
           "GRADIO_EXAMPLES_CACHE": str(tmp / "examples"), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("SPACE_ID", None)
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "app.py", "--offline", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"app.py exited with {server.returncode}:\n"
                            f"{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer within {START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture()
def page(chromium, app_url):
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(chromium), headless=True,
                                         args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1300},
                                      accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(app_url)
        expect(page.locator("#model_status")).to_contain_text("Models ready", timeout=60_000)
        yield page
        browser.close()


def set_slider(page, elem_id: str, value: float) -> None:
    """Type into the slider's number box and leave it: the same `release` event as a drag."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(f"{value:.2f}")
    box.press("Tab")


def table_rows(page) -> int:
    """Rows of the detections table (it is virtualised: count from its ARIA row count)."""
    return int(page.locator("#detections [role=grid]").get_attribute("aria-rowcount")) - 1


def api_scores(app_url: str, image: Path, prompt: str) -> list[float]:
    """Every box score for the image at box threshold 0, from the same server's API."""
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    try:
        return client.predict(handle_file(str(image)), prompt, 0.0, 0.25,
                              api_name="/segment")["scores"]
    finally:
        client.close()


def test_upload_segment_rethreshold_and_download(page, app_url, tmp_path):
    image = ROOT / "assets" / "generated_shapes.jpg"  # the four shapes PROMPT names
    scores = api_scores(app_url, image, PROMPT)
    threshold = 0.35  # the default: the offline models find the shapes, not the other queries
    expected = sum(score > threshold for score in scores)
    assert 4 <= expected < len(scores)

    expect(page.locator("#offline_banner")).to_contain_text("Offline mode")
    page.locator("#input_image input[type=file]").set_input_files(str(image))
    page.locator("#prompt textarea").fill(PROMPT)
    set_slider(page, "box_threshold", 0.0)
    page.locator("#run").click()
    expect(page.locator("#message")).to_contain_text(f"Found {len(scores)} objects",
                                                     timeout=60_000)
    expect(page.locator("#annotated img")).to_be_visible()
    assert table_rows(page) == len(scores)
    first_image = page.locator("#annotated img").get_attribute("src")
    assert first_image.split("?")[0].endswith("generated_shapes_result.jpg"), \
        "the result is our JPEG"

    set_slider(page, "box_threshold", threshold)
    noun = "object" if expected == 1 else "objects"
    expect(page.locator("#message")).to_contain_text(f"Found {expected} {noun}")
    assert table_rows(page) == expected
    assert page.locator("#annotated img").get_attribute("src") != first_image

    with page.expect_download() as download_info:
        page.locator('#downloads a[download="generated_shapes_coco.json"]').click()
    coco = json.loads(Path(download_info.value.path()).read_text())
    assert len(coco["annotations"]) == expected
    names = ["red circle", "green triangle", "green circle", "yellow triangle"]
    assert [c["name"] for c in coco["categories"]] == names
    assert {a["phrase"] for a in coco["annotations"]} == set(names), "each shape found"

    page.locator("#make_zip").click()
    with page.expect_download() as download_info:
        page.locator('#downloads a[download="generated_shapes_masks.zip"]').click()
    with zipfile.ZipFile(download_info.value.path()) as archive:
        masks = [name for name in archive.namelist() if name.startswith("masks/")]
    assert len(masks) == expected

    screenshot = tmp_path / "app.png"
    page.screenshot(path=str(screenshot), full_page=True)
    shutil.copy(screenshot, SCREENSHOT_COPY)


def test_empty_prompt_is_refused_with_a_message(page):
    page.locator("#input_image input[type=file]").set_input_files(
        str(ROOT / "assets" / "fruit.jpg"))
    page.locator("#prompt textarea").fill("   ")
    page.locator("#run").click()
    expect(page.get_by_text("Type what to find").first).to_be_visible()
    expect(page.locator("#message")).not_to_contain_text("Found")


def test_example_click_shows_a_result_that_sliders_then_refilter(page):
    """The offline example names three of the four shapes in its image: each of those is
    labelled, the yellow triangle is not."""
    expect(page.locator("#offline_banner")).to_contain_text("red circle")
    example = "red circle . green circle . green triangle ."
    page.get_by_text(example).first.click()
    expect(page.locator("#annotated img")).to_be_visible(timeout=60_000)
    expect(page.locator("#prompt textarea")).to_have_value(example)
    expect(page.locator('#downloads a[download="generated_shapes_coco.json"]')).to_be_visible()
    for name in ("red circle", "green circle", "green triangle"):
        expect(page.locator("#detections")).to_contain_text(name)
        expect(page.locator("#legend")).not_to_contain_text(f"{name} (0)")
    expect(page.locator("#detections")).not_to_contain_text("yellow")
    set_slider(page, "box_threshold", 1.0)  # no score is above 1
    expect(page.locator("#message")).to_contain_text("No objects found")
    assert table_rows(page) == 0


def test_markup_in_the_prompt_is_shown_as_text(page):
    page.locator("#input_image input[type=file]").set_input_files(
        str(ROOT / "assets" / "fruit.jpg"))
    prompt = '<img src=x onerror="document.title=1"> . <b>bold</b> .'
    page.locator("#prompt textarea").fill(prompt)
    set_slider(page, "box_threshold", 1.0)  # nothing found: the message echoes the prompt
    page.locator("#run").click()
    expect(page.locator("#message")).to_contain_text("No objects found", timeout=60_000)
    expect(page.locator("#message")).to_contain_text("<img src=x")
    assert page.locator("#message img").count() == 0
    assert page.locator("#message b").count() == 0
    assert page.title() != "1"
