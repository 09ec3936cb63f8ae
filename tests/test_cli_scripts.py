"""The benchmark script's command line starts from any folder, without PYTHONPATH (it puts the
repository root on `sys.path` itself, as the other scripts do)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_benchmark_help_needs_no_pythonpath(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPTS / "benchmark.py"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "--boxes" in completed.stdout


def test_gpu_wheels_pins_what_requirements_pin_and_its_device_command_fits():
    """scripts/gpu_wheels.py --dry-run: the versions of requirements.txt (or installed here, for
    dependencies it does not pin), and a command the device tool takes (at most 2,000
    characters) that installs the carried folder, then runs gpu_check.py and the gpu tests."""
    completed = subprocess.run(
        [sys.executable, str(SCRIPTS / "gpu_wheels.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    specs = dict(line.split("==") for line in completed.stdout.splitlines() if "==" in line)
    requirements = (SCRIPTS.parent / "requirements.txt").read_text()
    for name in ("segment-anything", "supervision", "transformers", "huggingface_hub", "timm"):
        assert f"{name}=={specs[name]}\n" in requirements
    assert specs["httpx2"] == metadata.version("httpx2")  # not pinned: the version installed
    command = completed.stdout.strip().splitlines()[-1]
    assert len(command) <= 2000
    assert command.index(".whl/*.whl") < command.index("gpu_check.py") < command.index("-m gpu")


def test_gpu_check_dry_run_on_the_cpu_runs_every_section(tmp_path):
    """scripts/gpu_check.py waits for a session with a GPU: its CPU dry run (tiny models) keeps
    every section working meanwhile; rows that need CUDA are SKIP, none FAIL."""
    out = tmp_path / "gpu_check.json"
    completed = subprocess.run(
        [sys.executable, str(SCRIPTS / "gpu_check.py"), "--tiny", "--device", "cpu", "--runs",
         "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = completed.stdout.strip().splitlines()[-1]
    assert " 0 FAIL," in summary and "0 PASS" in summary, summary
    report = json.loads(out.read_text())
    for section in ("parity", "autocast", "sdpa", "deform", "bench"):
        assert report[section], section
