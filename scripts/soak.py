"""Soak test: many concurrent API sessions against the offline app on localhost.

    python scripts/soak.py --sessions 8 --requests 25 --time-limit 600

Starts `app.py --offline` on a free localhost port (or uses --url, which must be a localhost
address), then runs N client sessions in parallel threads. Each makes M requests: uploads of a few
different images (new work for the models), threshold changes on the same image (cache hits),
hostile calls with server paths (must be refused), and abandoned requests (the client submits and
disconnects at once). Prints failures, latency percentiles per kind and the server's RSS before and
after; exits 1 on any unexpected failure. Bounded in count and time; sends traffic to this machine
only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "red ball . blue box . green triangle ."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "gradio"),
           "GRADIO_EXAMPLES_CACHE": str(folder / "examples"), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("SPACE_ID", None)
    server = subprocess.Popen([sys.executable, "app.py", "--offline", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"app.py exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("app.py did not answer within 120 s")


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB (Linux /proc)."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def make_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    scene = Image.open(ROOT / "assets" / "shapes.jpg")
    paths = []
    for index in range(count):
        width, height = int(rng.integers(200, 700)), int(rng.integers(200, 700))
        image = scene.resize((width, height)).rotate(int(rng.integers(0, 360)))
        paths.append(folder / f"soak-{index}.png")
        image.save(paths[-1])
    return paths


def raw_hostile_call(url: str) -> str:
    """A server path in a raw call: the event stream must end in an error."""
    request = urllib.request.Request(
        urllib.parse.urljoin(url, "gradio_api/call/segment"),
        data=json.dumps({"data": [{"path": "/etc/hostname"}, PROMPT, 0.3, 0.25]}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(urllib.parse.urljoin(url, f"gradio_api/call/segment/{event_id}"),
                                timeout=60) as stream:
        text = stream.read().decode()
    return "error" if "event: error" in text else "answered"


def session(url: str, images: list[Path], requests: int, seed: int, deadline: float,
            latencies: dict, failures: list, lock: threading.Lock) -> None:
    rng = np.random.default_rng(seed)
    client = Client(url, verbose=False, download_files=False)
    image = handle_file(str(images[seed % len(images)]))
    try:
        for index in range(requests):
            if time.monotonic() > deadline:
                return
            kind = ("new image", "threshold", "threshold", "hostile path", "disconnect")[index % 5]
            start = time.perf_counter()
            try:
                if kind == "new image":
                    image = handle_file(str(images[int(rng.integers(0, len(images)))]))
                    client.predict(image, PROMPT, 0.3, 0.25, api_name="/segment")
                elif kind == "threshold":
                    client.predict(image, PROMPT, float(rng.uniform(0.05, 0.6)), 0.25,
                                   api_name="/segment")
                elif kind == "hostile path":
                    if raw_hostile_call(url) != "error":
                        raise RuntimeError("a server path was answered")
                else:  # the client goes away while its request is queued or running
                    job = client.submit(image, PROMPT, 0.2, 0.25, api_name="/annotate")
                    time.sleep(float(rng.uniform(0, 0.3)))
                    job.cancel()
            except (AppError, OSError, RuntimeError, ValueError) as error:
                with lock:
                    failures.append(f"{kind}: {type(error).__name__}: {str(error)[:120]}")
                continue
            with lock:
                latencies[kind].append(time.perf_counter() - start)
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per session")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds, in all")
    parser.add_argument("--url", help="a running app on localhost (default: start one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server = None
        if args.url:
            if urllib.parse.urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
                raise SystemExit("--url must be on this machine (localhost)")
            url = args.url
        else:
            server, url = start_app(folder)
        images = make_images(folder, 6)
        warm = Client(url, verbose=False, download_files=False)  # models load once, not timed
        warm.predict(handle_file(str(images[0])), PROMPT, 0.3, 0.25, api_name="/segment")
        warm.close()
        before = rss_mb(server.pid) if server else float("nan")
        latencies: dict[str, list[float]] = defaultdict(list)
        failures: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + args.time_limit
        start = time.perf_counter()
        threads = [threading.Thread(target=session, args=(url, images, args.requests, seed,
                                                          deadline, latencies, failures, lock))
                   for seed in range(args.sessions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        alive = Client(url, verbose=False, download_files=False)  # still serving afterwards?
        final = alive.predict(handle_file(str(images[1])), PROMPT, 0.3, 0.25,
                              api_name="/segment")
        alive.close()
        after = rss_mb(server.pid) if server else float("nan")
        if server:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    done = sum(len(v) for v in latencies.values())
    print(f"{args.sessions} sessions x {args.requests} requests in {elapsed:.1f} s: "
          f"{done} completed, {len(failures)} failed; served afterwards: "
          f"{'yes' if 'boxes' in final else 'NO'}")
    print("| kind | count | p50 s | p95 s | max s |")
    print("|---|---|---|---|---|")
    for kind, values in sorted(latencies.items()):
        values = sorted(values)
        p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
        print(f"| {kind} | {len(values)} | {statistics.median(values):.3f} | {p95:.3f} | "
              f"{values[-1]:.3f} |")
    print(f"server RSS: {before:.0f} MB before, {after:.0f} MB after")
    for failure in failures[:20]:
        print("FAILED", failure)
    return 1 if failures or "boxes" not in final else 0


if __name__ == "__main__":
    sys.exit(main())
