"""The batch command line (`python -m segmentation.cli`), in offline mode, and its model flags."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from segmentation.cli import main, merge_coco, output_stems
from segmentation.export import rle_decode
from segmentation.models import (
    ENV_DETECTOR,
    ENV_OFFLINE,
    ENV_SAM,
    add_model_arguments,
    model_choice,
)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "red circle . green triangle ."  # both images hold one of each


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Two small shapes images (JPEG and RGBA PNG) and one corrupt file."""
    images = tmp_path / "images"
    images.mkdir()
    scene = Image.open(ROOT / "assets" / "generated_shapes.jpg")
    scene.resize((256, 282)).save(images / "scene.jpg")
    shapes = Image.open(ROOT / "assets" / "shapes.jpg").resize((240, 180)).convert("RGBA")
    shapes.save(images / "shapes.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return images


def test_folder_to_annotated_images_and_one_coco_json(folder, tmp_path):
    out = tmp_path / "out"
    finished = subprocess.run(
        [sys.executable, "-m", "segmentation.cli", str(folder), "--prompt", PROMPT, "--out",
         str(out), "--offline", "--box-threshold", "0.3", "--text-threshold", "0", "--zip"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "skipped broken.jpg" in finished.stderr and "skipped 1: broken.jpg" in finished.stdout

    assert Image.open(out / "scene_annotated.png").size == (256, 282)
    assert Image.open(out / "shapes_annotated.png").size == (240, 180)
    assert not list(out.glob("broken*"))
    coco = json.loads((out / "annotations.json").read_text())
    assert coco["info"]["prompt"] == PROMPT and coco["info"]["box_threshold"] == 0.3
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        (1, "scene.jpg", 256, 282), (2, "shapes.png", 240, 180)]
    assert [c["name"] for c in coco["categories"]] == ["red circle", "green triangle"]
    annotations = coco["annotations"]
    # The offline models were trained on shapes: each image's red circle and green triangle.
    for image_id in (1, 2):
        assert {a["phrase"] for a in annotations if a["image_id"] == image_id} == \
            {"red circle", "green triangle"}
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    sizes = {i["id"]: (i["width"], i["height"]) for i in coco["images"]}
    for annotation in annotations:
        width, height = sizes[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        assert 0 <= x <= x + w <= width and 0 <= y <= y + h <= height
        assert annotation["score"] > 0.3 and annotation["category_id"] in (1, 2)
        assert annotation["phrase"] == coco["categories"][annotation["category_id"] - 1]["name"]
        mask = rle_decode(annotation["segmentation"])
        assert mask.shape == (height, width) and mask.sum() == annotation["area"]

    with zipfile.ZipFile(out / "scene_masks.zip") as archive:
        names = archive.namelist()
    scene_count = sum(a["image_id"] == 1 for a in annotations)
    assert sum(name.startswith("masks/") for name in names) == scene_count
    assert "annotations.json" in names


def test_no_readable_image_fails(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "notes.txt").write_text("not an image")
    assert main([str(images), "--prompt", PROMPT, "--out", str(tmp_path / "out"),
                 "--offline"]) == 1
    captured = capsys.readouterr()
    assert "skipped notes.txt" in captured.err and "0 images" in captured.out


@pytest.mark.parametrize("arguments", [
    ["--prompt", "   "],
    ["--prompt", PROMPT, "--box-threshold", "1.5"],
    ["--prompt", PROMPT, "--sam", "vit_x"],
    ["--prompt", PROMPT, "--detector", "swin_huge"],
])
def test_bad_arguments_exit_with_usage_error(folder, tmp_path, arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), "--out", str(tmp_path / "out"), "--offline", *arguments])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_output_folder_must_differ_from_the_input(folder):
    with pytest.raises(SystemExit):
        main([str(folder), "--prompt", PROMPT, "--out", str(folder), "--offline"])


def choose(flags: list[str], environ: dict[str, str]):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return model_choice(parser.parse_args(flags), environ)


def test_model_flags_then_environment_then_defaults():
    assert choose(["--device", "cpu"], {}) == choose(["--device", "cpu"], {ENV_OFFLINE: "0"})
    default_cpu = choose(["--device", "cpu"], {})
    assert (default_cpu.detector, default_cpu.sam, default_cpu.offline) == \
        ("swint_ogc", "vit_b", False)
    assert choose(["--device", "cuda"], {}).sam == "vit_h"
    from_env = choose(["--device", "cpu"],
                      {ENV_DETECTOR: "swinb", ENV_SAM: "vit_l", ENV_OFFLINE: "1"})
    assert (from_env.detector, from_env.sam, from_env.offline) == \
        ("swinb_cogcoor", "vit_l", True)
    flags_win = choose(["--device", "cpu", "--detector", "swint", "--sam", "vit_h"],
                       {ENV_DETECTOR: "swinb", ENV_SAM: "vit_l"})
    assert (flags_win.detector, flags_win.sam) == ("swint_ogc", "vit_h")
    with pytest.raises(ValueError, match="GROUNDED_SAM_SAM"):
        choose(["--device", "cpu"], {ENV_SAM: "vit_x"})


def test_a_checkpoint_path_is_a_valid_detector(tmp_path):
    checkpoint = tmp_path / "groundingdino_swint_ogc.pth"
    checkpoint.write_bytes(b"")
    assert choose(["--device", "cpu", "--detector", str(checkpoint)], {}).detector == \
        str(checkpoint)


def test_merge_coco_renumbers_ids_and_matches_categories_by_name():
    def part(image_id, names, category_ids):
        return {"images": [{"id": image_id, "file_name": f"{image_id}.png"}],
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
                "annotations": [{"id": k + 1, "image_id": image_id, "category_id": c}
                                for k, c in enumerate(category_ids)]}

    merged = merge_coco([part(1, ["cat", "dog"], [2, 1]), part(2, ["dog", "bird"], [1, 2, 2])])
    assert [c["name"] for c in merged["categories"]] == ["cat", "dog", "bird"]
    assert [c["id"] for c in merged["categories"]] == [1, 2, 3]
    assert [a["id"] for a in merged["annotations"]] == [1, 2, 3, 4, 5]
    names = {c["id"]: c["name"] for c in merged["categories"]}
    assert [names[a["category_id"]] for a in merged["annotations"]] == \
        ["dog", "cat", "dog", "bird", "bird"]


def test_output_names_stay_unique_across_extensions():
    stems = output_stems([Path("a.jpg"), Path("a.png"), Path("b.jpg")])
    assert stems == {Path("a.jpg"): "a_jpg", Path("a.png"): "a_png", Path("b.jpg"): "b"}


def test_any_failure_on_one_file_is_reported_and_the_batch_goes_on(folder, tmp_path, capsys,
                                                                   monkeypatch):
    from segmentation.pipeline import GroundedSAM

    Image.new("RGB", (20000, 1)).save(folder / "b_thin.png")  # too thin: a clear message
    Image.new("RGB", (64, 64)).save(folder / "c_explodes.png")
    real_run = GroundedSAM.run

    def run(self, image, *args, **kwargs):
        if image.shape[:2] == (64, 64):
            raise RuntimeError("something nobody expected")
        return real_run(self, image, *args, **kwargs)

    monkeypatch.setattr(GroundedSAM, "run", run)
    out = tmp_path / "out"
    assert main([str(folder), "--prompt", PROMPT, "--out", str(out), "--offline",
                 "--box-threshold", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "skipped b_thin.png: ValueError: the image is too thin (20000 x 1 pixels)" in err
    assert "skipped c_explodes.png: RuntimeError: something nobody expected" in err
    coco = json.loads((out / "annotations.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["scene.jpg", "shapes.png"]


def test_an_interrupted_batch_writes_what_it_did(folder, tmp_path, capsys, monkeypatch):
    from segmentation.pipeline import GroundedSAM

    real_run = GroundedSAM.run
    calls = []

    def run(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C (SIGTERM is turned into the same) on the 2nd image
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(GroundedSAM, "run", run)
    out = tmp_path / "out"
    assert main([str(folder), "--prompt", PROMPT, "--out", str(out), "--offline"]) == 130
    assert "interrupted: writing the 1 images done" in capsys.readouterr().err
    coco = json.loads((out / "annotations.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["scene.jpg"]
    assert not list(out.glob(".*.part"))


def test_sigterm_stops_the_batch_and_keeps_its_work(tmp_path):
    import os
    import signal
    import time

    images = tmp_path / "images"
    images.mkdir()
    for index in range(200):
        Image.new("RGB", (64 + index % 3, 64), (index, 0, 0)).save(images / f"{index:03d}.png")
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "segmentation.cli", str(images), "--prompt", PROMPT, "--out",
         str(out), "--offline"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*_annotated.png")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    coco = json.loads((out / "annotations.json").read_text())
    done = {i["file_name"] for i in coco["images"]}
    assert 0 < len(done) < 200
    assert {p.name.replace("_annotated", "") for p in out.glob("*_annotated.png")} >= done
    assert os.path.exists(out / "annotations.json")


def test_a_prompt_the_vocabulary_does_not_know_fails_once(folder, tmp_path, capsys):
    assert main([str(folder), "--prompt", "고양이 .", "--out", str(tmp_path / "out"),
                 "--offline"]) == 1
    assert "none of the prompt's words is known" in capsys.readouterr().err
