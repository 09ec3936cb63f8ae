"""The wheels a lent GPU machine lacks for scripts/gpu_check.py and tests/test_gpu.py, and the
one command to run there.

    python scripts/gpu_wheels.py            # downloads into .whl/ (ignored by git, ~21 MB)

The `device` tool's machine (its KINDS.md) runs Python 3.12 with torch 2.11, torchvision, numpy,
scipy, pillow, OpenCV, pytest and pytest-timeout, but not segment_anything, supervision or
pycocotools, and an older transformers / huggingface_hub; nothing can be fetched there. This
downloads `CARRY` as CPython 3.12 manylinux wheels, without dependencies (those are on the
machine already): the versions pinned in requirements.txt, and for the packages that
requirements.txt does not pin (dependencies of the pinned ones) the versions installed here.
Then it prints the device command (`run` with `carry: [".whl"]`, `timeout_s: 600`): it
installs the wheels into /tmp/site, runs `gpu_check.py` within a budget that leaves time for the
`gpu` tests, and writes both outputs to $OUT.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ".whl"  # ignored by git (.gitignore), as the device tool's README suggests
# Imported by the checks and missing (or older) on the device machine.
CARRY = (
    "segment-anything",
    "supervision",
    "pycocotools",
    "transformers",
    "huggingface_hub",
    "tokenizers",
    "timm",
    # dependencies of the above that the machine lacks
    "httpx2",
    "httpcore2",
    "truststore",
    "pydeprecate",
    "defusedxml",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
GPU_CHECK_BUDGET_S = 360  # of the command's 600 s: building models, then the tests after it


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: Path) -> dict[str, str]:
    """name -> version of the `name==version` lines of a requirements file."""
    found = {}
    for line in requirements.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+).*", line)
        if match:
            found[canonical(match[1])] = match[2]
    return found


def requirements(names=CARRY, pinned: dict[str, str] | None = None) -> list[str]:
    """`name==version` for each name: pinned in requirements.txt, else installed here.

    Raises:
        SystemExit: a name neither pinned nor installed.
    """
    pinned = pins(ROOT / "requirements.txt") if pinned is None else pinned
    specs = []
    for name in names:
        version = pinned.get(canonical(name))
        if version is None:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                raise SystemExit(f"{name} is neither pinned in requirements.txt nor installed "
                                 "here: install requirements-test.txt first") from None
        specs.append(f"{name}=={version}")
    return specs


def device_command(folder: str = FOLDER) -> str:
    """The one command for the device tool's `run` (with `carry: [folder]`)."""
    return (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        f"--target /tmp/site {folder}/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 "
        f"|| exit; python3 scripts/gpu_check.py --budget {GPU_CHECK_BUDGET_S} --json "
        f"$OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.txt; python3 -m pytest -m gpu -q "
        f"-p no:cacheprovider tests/test_gpu.py 2>&1 | tee $OUT/gpu_tests.txt"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/gpu_wheels.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="print the requirements and the command, download nothing")
    args = parser.parse_args()
    specs = requirements()
    dest = ROOT / FOLDER
    print("\n".join(specs))
    if not args.dry_run:
        platform_flags = [flag for name in PLATFORMS for flag in ("--platform", name)]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.12", "--implementation", "cp", *platform_flags,
             "-d", str(dest), *specs],
            check=True,
        )
        wheels = list(dest.glob("*.whl"))
        size = sum(path.stat().st_size for path in wheels)
        print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {dest}")
    print(f"\nOn the device (`run`, carry [\"{FOLDER}\"], timeout_s 600):\n")
    print(device_command())


if __name__ == "__main__":
    main()
