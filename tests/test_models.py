"""One home per table (detector presets, SAM variants, default device, ZeroGPU), and the model
choice of the CLI and the app (`segmentation.models`): Hub ids, mistyped paths."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

from grounding import build as grounding_build
from grounding import devices, hub
from grounding.config import DETECTOR_PRESETS, PRESETS, detector_preset
from segmentation import build as build_module
from segmentation import sam as sam_module
from segmentation.build import load_pipeline
from segmentation.models import SAM_VARIANTS, ModelChoice, add_model_arguments, model_choice

ROOT = Path(__file__).resolve().parent.parent
HUB_ID = "IDEA-Research/grounding-dino-tiny"


def choose(flags: list[str], environ: dict[str, str] | None = None) -> ModelChoice:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return model_choice(parser.parse_args(["--device", "cpu", *flags]), environ or {})


class Loaded(Exception):
    """Raised by a stand-in loader, carrying its arguments."""


def test_every_detector_table_derives_from_the_one_registry():
    assert set(PRESETS) == set(DETECTOR_PRESETS) == set(hub.OFFICIAL_FILES)
    for name, preset in DETECTOR_PRESETS.items():
        assert PRESETS[name] is preset.config and hub.OFFICIAL_FILES[name] == preset.official_file
        for alias in (name, *preset.aliases, name.upper()):
            assert detector_preset(alias) is preset
            assert choose(["--detector", alias]).detector == name
        assert preset.display_name in ModelChoice(name, "vit_b", "cpu", False).describe()
    assert "SAM ViT-H" in ModelChoice("swint", "vit_h", "cuda", False).describe()
    assert detector_preset("vit_b") is None
    assert SAM_VARIANTS == tuple(sam_module.SAM_CHECKPOINTS)


def test_the_app_and_its_handlers_do_not_depend_on_the_cli_module():
    for path in (ROOT / "app.py", ROOT / "ui" / "handlers.py"):
        imported = {
            node.module
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom)
        }
        assert "segmentation.cli" not in imported and "segmentation.models" in imported


def test_a_hub_id_is_a_valid_detector_for_the_cli_the_app_and_load_pipeline(monkeypatch):
    choice = choose(["--detector", HUB_ID])
    assert choice.detector == HUB_ID and HUB_ID in choice.describe()

    def loader(*args, **kwargs):
        raise Loaded(args, kwargs)

    monkeypatch.setattr(build_module, "load_detector", loader)
    with pytest.raises(Loaded) as loaded:
        load_pipeline(detector=HUB_ID, sam_checkpoint="sam.pth", device="cpu")
    assert loaded.value.args[0] == (HUB_ID,)


@pytest.mark.parametrize("path", ["./my_model", "runs/x/last", "weights/model.pth"])
def test_a_mistyped_local_path_is_a_missing_file_not_a_hub_lookup(path, tmp_path, monkeypatch):
    def no_hub(repo_id):
        raise AssertionError(f"looked {repo_id} up on the Hub")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "transformers_checkpoint_dir", no_hub)
    with pytest.raises(FileNotFoundError, match=path):
        grounding_build.load_detector(path, device="cpu")
    with pytest.raises(FileNotFoundError, match=path):
        load_pipeline(detector=path, sam_checkpoint="sam.pth", device="cpu")
    with pytest.raises(ValueError, match=f"{path} does not exist"):
        choose(["--detector", path])


def test_a_path_in_an_existing_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_id("runs/last")
    (tmp_path / "runs").mkdir()
    assert not hub.is_hub_id("runs/last")  # a mistyped path in ./runs
    monkeypatch.setattr(hub, "transformers_checkpoint_dir", lambda repo_id: 1 / 0)
    with pytest.raises(FileNotFoundError, match="runs/last"):
        grounding_build.load_detector("runs/last", device="cpu")
    assert hub.is_hub_id(HUB_ID) and not hub.is_hub_id("a/b/c") and not hub.is_hub_id("x.pth")


@pytest.mark.parametrize("flag", ["1", "t", "true", "TRUE", "yes", "0", ""])
@pytest.mark.parametrize("has_spaces", [False, True])
def test_one_zero_gpu_test_for_the_default_device_and_the_app(flag, has_spaces, monkeypatch):
    from ui import zero_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "spaces_installed", lambda: has_spaces)
    monkeypatch.setattr(zero_gpu, "spaces", object() if has_spaces else None)
    environ = {"SPACES_ZERO_GPU": flag}
    on = zero_gpu.on_zero_gpu(environ)
    assert on == devices.on_zero_gpu(environ) == (has_spaces and flag.lower() in ("1", "t", "true"))
    assert devices.default_device(environ) == ("cuda" if on else "cpu")
    assert choose([], environ).device == "cpu"  # --device cpu wins
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert model_choice(parser.parse_args([]), environ).device == ("cuda" if on else "cpu")


def test_one_strict_loader_for_the_detector_and_sam():
    from grounding import checkpoint
    from segmentation import small_sam

    assert sam_module.load_strict is small_sam.load_strict is checkpoint.load_strict
    model = torch.nn.Linear(2, 3)
    state = {"weight": torch.zeros(3, 3), "other": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"1 missing keys.*bias.*other.*weight: checkpoint"):
        checkpoint.load_strict(model, state, source="x.pth", target="SAM vit_b", error=ValueError)
    with pytest.raises(ValueError, match="expected a state dict"):
        checkpoint.load_strict(model, [], source="x.pth", error=ValueError)  # type: ignore[arg-type]
