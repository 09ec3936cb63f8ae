"""The habits CI enforces: ruff's lint and format, mypy, and declared imports.

The tools run as `python -m TOOL` from the repository root with the configuration in
pyproject.toml, so these tests check what `.pre-commit-config.yaml` checks locally. mypy keeps its
cache in `.mypy_cache` (a first run takes about a minute; later runs a few seconds).
"""

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORMATTED = ["grounding", "segmentation", "ui", "app.py"]
# Code shipped to users: what it imports must be in requirements.txt.
RUNTIME_SOURCES = ["grounding", "segmentation", "ui", "app.py"]
# Tests and tools: what they import may be in either requirements file.
TEST_SOURCES = ["tests", "scripts"]
LOCAL_PACKAGES = {"grounding", "segmentation", "ui", "tests", "app", "scripts"}
# Imported in a try/except, present only where the platform provides it (Hugging Face Spaces).
OPTIONAL_MODULES = {"spaces"}


def run_tool(*args: str, timeout: float = 600) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    status, output = completed.returncode, (completed.stdout + completed.stderr).strip()
    assert status == 0, f"`{' '.join(args)}` exited {status}:\n{output}"


def test_ruff_check():
    run_tool("ruff", "check", ".")


def test_ruff_format():
    run_tool("ruff", "format", "--check", *FORMATTED)


def test_mypy():
    # Files, options and per-module exceptions: [tool.mypy] in pyproject.toml.
    run_tool("mypy")


def _python_files(source: str) -> list[Path]:
    path = ROOT / source
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


def imported_modules(sources: list[str]) -> dict[str, set[str]]:
    """Third-party top-level module -> the files (relative paths) that import it."""
    found: dict[str, set[str]] = {}
    for source in sources:
        for path in _python_files(source):
            # Scripts import their neighbours as top-level modules (`from timing import ...`),
            # modules and packages alike; a package's modules import its parent's neighbours.
            folders = [path.parent]
            if (path.parent / "__init__.py").exists():
                folders.append(path.parent.parent)
            neighbours = {
                sibling.stem
                for folder in folders
                for sibling in folder.iterdir()
                if sibling.suffix == ".py" or (sibling / "__init__.py").exists()
            }
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if (
                        top in sys.stdlib_module_names
                        or top in LOCAL_PACKAGES
                        or top in neighbours
                        or top == "__future__"
                    ):
                        continue
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements_file: str) -> set[str]:
    """Normalised distribution names pinned in a requirements file (not following `-r`)."""
    names = set()
    for line in (ROOT / requirements_file).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        names.add(_normalise(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]))
    return names


@pytest.mark.parametrize(
    ("sources", "requirement_files"),
    [
        (RUNTIME_SOURCES, ["requirements.txt"]),
        (TEST_SOURCES, ["requirements.txt", "requirements-test.txt"]),
    ],
    ids=["runtime", "tests-and-scripts"],
)
def test_every_import_is_declared(sources, requirement_files):
    distributions = importlib.metadata.packages_distributions()
    allowed = set().union(*(declared(name) for name in requirement_files))
    problems = []
    for module, files in sorted(imported_modules(sources).items()):
        if module in OPTIONAL_MODULES:
            continue
        owners = distributions.get(module)
        where = ", ".join(sorted(files))
        if not owners:
            problems.append(f"{module} (imported by {where}) belongs to no installed distribution")
        elif not any(_normalise(owner) in allowed for owner in owners):
            problems.append(
                f"{module} (distribution {', '.join(owners)}; imported by {where}) is not in "
                f"{' or '.join(requirement_files)}"
            )
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_the_import_survey_sees_the_known_imports():
    # Guards the test above against silently finding nothing.
    runtime = imported_modules(RUNTIME_SOURCES)
    assert {"torch", "transformers", "gradio", "pandas", "spaces"} <= set(runtime)
    assert "playwright" in imported_modules(TEST_SOURCES)


def test_the_libraries_never_import_the_app_layer():
    # Gradio code (and ZeroGPU's `spaces`) lives with app.py, in ui/; the libraries stay usable
    # without a web framework.
    for library in ("grounding", "segmentation"):
        imported = imported_modules([library])
        assert not {"gradio", "gradio_client", "spaces"} & set(imported), library
        local = [
            str(path.relative_to(ROOT))
            for path in _python_files(library)
            if re.search(r"^\s*(from|import)\s+(ui|app)\b", path.read_text(), re.MULTILINE)
        ]
        assert not local, f"{library} imports the app: {local}"


def test_tests_import_helpers_not_other_tests_or_conftest():
    offenders = []
    for path in _python_files("tests"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            offenders += [
                f"{path.relative_to(ROOT)}: {name}"
                for name in names
                if name.split(".")[-1].startswith("test_") or name.split(".")[-1] == "conftest"
            ]
    assert offenders == [], "shared test code belongs in helper modules: " + ", ".join(offenders)
