"""Disk hygiene of a served app: `python app.py --offline` in a subprocess leaves no export files
behind when it is stopped, and removes what killed processes left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def start_app(tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"),
           "GRADIO_EXAMPLES_CACHE": str(tmp / "examples"), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("SPACE_ID", None)
    server = subprocess.Popen([sys.executable, "app.py", "--offline", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, "app.py exited"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    pytest.fail("app.py did not answer within 120 s")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_app_removes_its_exports_and_start_up_removes_stale_ones(tmp_path, stop):
    exports = tmp_path / "gradio" / "grounded-sam-exports"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no process holds now: as if that server had been killed
    stale = exports / f"process-{gone.pid}" / "run-old"
    stale.mkdir(parents=True)
    (stale / "left.json").write_text("{}")

    server, url = start_app(tmp_path)
    try:
        assert not stale.parent.exists(), "a dead process's exports survived the start"
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        image = tmp_path / "mine.png"
        Image.open(ROOT / "assets" / "shapes.jpg").resize((96, 72)).save(image)
        client.predict(handle_file(str(image)), "red circle .", 0.0, 0.25, api_name="/annotate")
        client.close()
        own = exports / f"process-{server.pid}"
        assert any(own.rglob("*_masks.zip")), "the answer's files are in the process's folder"
    finally:
        server.send_signal(stop)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            pytest.fail(f"app.py did not stop on {stop.name}")
    assert not own.exists(), f"exports left behind after {stop.name}"
