"""The training CLI: outputs, exact resume, NaN stop, bad images, freezing, accumulation, schedule.

A tiny random detector on four drawn images (96 px short side: smaller maps break the GroupNorm
of the smallest level), on the CPU.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import grounding
from grounding import train as train_module
from grounding import train_args
from grounding.config import tiny_config
from grounding.dataset import CocoGroundingDataset, collate
from grounding.losses import SetCriterion
from grounding.model import build_model
from grounding.native_format import is_native
from grounding.optim import (
    freeze,
    learning_rate_factor,
    parameter_groups,
    set_training_mode,
)
from grounding.training_checkpoint import read_training_state
from grounding.training_step import accumulate_gradients
from grounding.transformers_format import save_pretrained
from tests.key_lists import VOCAB_FILE

CATEGORIES = {1: "red square", 2: "blue square", 3: "green square"}
COLOURS = {1: (220, 30, 30), 2: (30, 30, 220), 3: (30, 200, 30)}
# image id -> (width, height, [(category id, x, y, w, h), ...])
IMAGES = {
    1: (128, 96, [(1, 8, 6, 40, 30), (2, 60, 30, 40, 50)]),
    2: (96, 112, [(3, 10, 10, 40, 40)]),
    3: (120, 100, [(2, 20, 20, 50, 40), (3, 70, 50, 30, 30), (1, 5, 5, 12, 12)]),
    4: (100, 100, [(1, 30, 30, 40, 40)]),
}


def write_coco(
    root,
    image_ids=tuple(IMAGES),
    *,
    corrupt_image: bool = False,
    same_size: tuple[int, int] | None = None,
):
    """Drawn rectangles in COCO format under `root`; returns (image folder, annotation file).

    Args:
        image_ids: which of `IMAGES` to draw.
        corrupt_image: also list an unreadable file (image id 99).
        same_size: draw every image at this (width, height) instead of its own size.
    """
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for image_id in image_ids:
        width, height, boxes = IMAGES[image_id]
        width, height = same_size or (width, height)
        image = Image.new("RGB", (width, height), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        for category_id, x, y, w, h in boxes:
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[category_id])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        image.save(image_dir / f"{image_id}.png")
        images.append(
            {"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height}
        )
    if corrupt_image:
        (image_dir / "broken.jpg").write_bytes(b"not an image" * 20)
        images.append({"id": 99, "file_name": "broken.jpg", "width": 100, "height": 100})
        annotations.append(
            {
                "id": 99,
                "image_id": 99,
                "category_id": 1,
                "bbox": [1, 1, 20, 20],
                "area": 400,
                "iscrowd": 0,
            }
        )
    path = root / "annotations.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": cid, "name": name} for cid, name in CATEGORIES.items()],
            }
        )
    )
    return image_dir, path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two OpenMP threads wait on each other at
    every barrier, and a tiny step takes seconds instead of 0.05 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def same_size_coco(tmp_path_factory):
    """Images 1 to 3 (2, 1 and 3 boxes) at one size, so batches need no padding."""
    return write_coco(tmp_path_factory.mktemp("same_size"), (1, 2, 3), same_size=(128, 96))


def arguments(coco, out, *extra, config: str | None = "tiny") -> list[str]:
    image_dir, annotations = coco
    argv = [
        "--train-images",
        str(image_dir),
        "--train-annotations",
        str(annotations),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--sizes",
        "96",
        "--max-size",
        "160",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--epochs",
        "1",
        "--no-progress",
        *extra,
    ]
    # From scratch: the tokenizer comes from the shipped vocabulary.
    return argv + (["--config", config, "--text-encoder", str(VOCAB_FILE)] if config else [])


def train_lines(out) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["type"] == "train"]


def test_outputs_and_exact_resume(coco, tmp_path):
    from transformers import GroundingDinoForObjectDetection

    image_dir, annotations = coco
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_module.main(arguments(coco, whole, "--epochs", "2")) == 0
    # Interrupted in the middle of epoch 2 (2 steps per epoch), evaluated, then resumed.
    validation = (
        "--val-images",
        str(image_dir),
        "--val-annotations",
        str(annotations),
        "--val-max-images",
        "2",
    )
    assert (
        train_module.main(arguments(coco, parts, "--epochs", "2", "--max-steps", "3", *validation))
        == 0
    )

    lines = [json.loads(line) for line in (parts / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if line["type"] == "train"]
    assert [line["step"] for line in steps] == [1, 2, 3]
    for key in (
        "epoch",
        "lr",
        "lr_backbone",
        "lr_text",
        "loss",
        "loss_class",
        "loss_l1",
        "loss_giou",
        "loss_class_0",
        "loss_giou_enc",
        "grad_norm",
        "seconds",
    ):
        assert key in steps[0], key
    # After epoch 1 and where --max-steps stopped the run.
    evaluations = [line for line in lines if line["type"] == "eval"]
    assert [line["step"] for line in evaluations] == [2, 3]
    assert {"AP", "AP50", "AP75", "per_category"} <= set(evaluations[0])
    assert evaluations[0]["images"] == 2
    assert (parts / "best" / "metrics.json").is_file()
    detector = grounding.load_detector(parts / "last", device="cpu")
    model, info = GroundingDinoForObjectDetection.from_pretrained(
        parts / "last", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert detector.model.config.num_queries == model.config.num_queries == 50
    state = read_training_state(parts / "last")
    assert state["progress"]["step"] == 3 and state["progress"]["position"] == 1
    # The run folder is not overwritten by accident, and the run's flags cannot change.
    assert train_module.main(arguments(coco, parts, "--epochs", "2")) == 1
    assert (
        train_module.main(
            arguments(coco, parts, "--epochs", "2", "--resume", "--lr", "1e-3", config=None)
        )
        == 1
    )

    assert train_module.main(arguments(coco, parts, "--epochs", "2", "--resume", config=None)) == 0
    expected, resumed = train_lines(whole), train_lines(parts)
    assert [line["step"] for line in resumed] == [1, 2, 3, 4]
    for a, b in zip(expected, resumed, strict=True):
        for key in ("loss", "loss_class", "loss_l1", "loss_giou_enc", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    final, final_resumed = (
        load_file(str(run / "last" / "model.safetensors")) for run in (whole, parts)
    )
    for key, value in final.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=1e-5, atol=1e-6)


def test_one_epoch_plus_a_resumed_epoch_equals_two_epochs(coco, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_module.main(arguments(coco, whole, "--epochs", "2")) == 0
    assert train_module.main(arguments(coco, parts, "--epochs", "1")) == 0
    # Data-loading processes give the same batches as loading in this process.
    assert (
        train_module.main(
            arguments(coco, parts, "--epochs", "2", "--resume", "--workers", "2", config=None)
        )
        == 0
    )
    expected, resumed = train_lines(whole), train_lines(parts)
    assert [line["loss"] for line in resumed] == pytest.approx(
        [line["loss"] for line in expected], rel=1e-5
    )
    final, final_resumed = (
        load_file(str(run / "last" / "model.safetensors")) for run in (whole, parts)
    )
    for key, value in final.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=1e-5, atol=1e-6)


def test_a_run_saved_in_our_own_format_resumes_exactly(coco, tmp_path):
    """--config shapes has the contrastive bias transformers' format cannot hold: its
    checkpoints are in our native format, and --resume reads them."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_module.main(arguments(coco, whole, "--epochs", "2", config="shapes")) == 0
    assert train_module.main(arguments(coco, parts, "--epochs", "1", config="shapes")) == 0
    assert is_native(parts / "last")
    assert train_module.main(arguments(coco, parts, "--epochs", "2", "--resume", config=None)) == 0
    expected, resumed = train_lines(whole), train_lines(parts)
    assert [line["loss"] for line in resumed] == pytest.approx(
        [line["loss"] for line in expected], rel=1e-5
    )


def test_nan_loss_stops_naming_the_step_and_the_last_checkpoint(
    coco, tmp_path, monkeypatch, capsys
):
    original = SetCriterion.forward
    calls = []

    def forward(self, output, targets, token_mask):
        total, terms = original(self, output, targets, token_mask)
        calls.append(1)
        if len(calls) == 2:
            total, terms["loss_class"] = total * float("nan"), terms["loss_class"] * float("nan")
        return total, terms

    monkeypatch.setattr(SetCriterion, "forward", forward)
    out = tmp_path / "run"
    # One step per epoch: step 1 is saved at the end of epoch 1, step 2 breaks.
    assert train_module.main(arguments(coco, out, "--epochs", "2", "--batch-size", "4")) == 1
    message = capsys.readouterr().err
    assert "step 2 (epoch 2)" in message and "loss_class=nan" in message
    assert f"{out / 'last'} (step 1)" in message
    assert read_training_state(out / "last")["progress"]["step"] == 1
    assert [line["step"] for line in train_lines(out)] == [1]
    assert sorted(path.name for path in out.iterdir()) == ["last", "metrics.jsonl"]

    # Resuming drops what a killed run logged after its last checkpoint.
    monkeypatch.undo()
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"type": "train", "step": 7, "loss": 1.0}) + "\n")
    assert (
        train_module.main(
            arguments(coco, out, "--epochs", "2", "--batch-size", "4", "--resume", config=None)
        )
        == 0
    )
    assert [line["step"] for line in train_lines(out)] == [1, 2]


def test_an_unreadable_image_is_skipped(tmp_path, caplog):
    coco = write_coco(tmp_path / "data", (1,), corrupt_image=True)
    args = train_args.parse_args(arguments(coco, tmp_path / "run", "--batch-size", "1"))
    with caplog.at_level(logging.WARNING):
        summary = train_module.train(args)
    assert "skipping image 99" in caplog.text
    assert summary["skipped_batches"] == 1
    assert summary["steps"] == 1 and summary["epochs"] == 1


def test_frozen_parts_do_not_change_and_the_rest_does(coco, tmp_path, tokenizer):
    torch.manual_seed(0)
    start = save_pretrained(build_model(tiny_config(len(tokenizer))), tmp_path / "start", tokenizer)
    out = tmp_path / "run"
    argv = arguments(
        coco,
        out,
        "--checkpoint",
        str(start),
        "--freeze",
        "backbone",
        "--max-steps",
        "1",
        config=None,
    )
    assert train_module.main(argv) == 0
    before = load_file(str(start / "model.safetensors"))
    after = load_file(str(out / "last" / "model.safetensors"))
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    # transformers' names: BERT is frozen by default when fine-tuning; its projection is not.
    frozen = ("model.backbone.", "model.text_backbone.")
    assert changed and not {key for key in changed if key.startswith(frozen)}
    for prefix in (
        "model.input_proj_vision.",
        "model.encoder.",
        "model.decoder.",
        "model.text_projection.",
        "model.enc_output.",
    ):
        assert any(key.startswith(prefix) for key in changed), prefix
    assert read_training_state(out / "last")["frozen"] == ["backbone", "text"]

    out = tmp_path / "text"
    assert (
        train_module.main(
            arguments(
                coco,
                out,
                "--checkpoint",
                str(start),
                "--train-text",
                "--max-steps",
                "1",
                config=None,
            )
        )
        == 0
    )
    after = load_file(str(out / "last" / "model.safetensors"))
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert any(key.startswith("model.text_backbone.") for key in changed)
    assert any(key.startswith("model.backbone.") for key in changed)


def test_parameter_groups_follow_freezing(tokenizer):
    model = build_model(tiny_config(len(tokenizer)))
    frozen_modules = freeze(model, ["text", "decoder"])
    assert frozen_modules == ["text_backbone.bert", "decoder", "bbox_embed"]
    set_training_mode(model, frozen_modules)  # frozen parts without dropout / drop path
    assert model.training and model.backbone.training and model.text_backbone.projection.training
    assert not model.text_backbone.bert.training and not model.decoder.training
    groups = parameter_groups(model, lr=1e-4, lr_backbone=1e-5, lr_text=1e-5, weight_decay=1e-4)
    assert [(group["name"], group["lr"]) for group in groups] == [
        ("backbone", 1e-5),
        ("detector", 1e-4),
    ]
    with pytest.raises(ValueError, match="cannot freeze"):
        freeze(model, ["bert"])


def deterministic_config(vocab_size: int):
    """The tiny config without drop path or dropout, so that a step depends on the data only."""
    config = tiny_config(vocab_size)
    return replace(
        config,
        backbone=replace(config.backbone, drop_path_rate=0.0),
        fusion_drop_path=0.0,
        text={**config.text, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    )


def test_accumulated_gradients_equal_one_large_batch(same_size_coco, tokenizer):
    torch.manual_seed(0)
    model = build_model(deterministic_config(len(tokenizer))).train()
    dataset = CocoGroundingDataset(
        *same_size_coco, tokenizer, train=True, sizes=(96,), max_size=160, negatives=1
    )
    samples = [dataset[index] for index in (0, 1, 2)]  # 2, 1 and 3 boxes
    special = (
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        *tokenizer.convert_tokens_to_ids([".", "?"]),
    )

    def gradients(windows):
        model.zero_grad()
        loss, _ = accumulate_gradients(model, SetCriterion(), windows, torch.device("cpu"), special)
        return loss, {
            name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
        }

    whole_loss, whole = gradients([collate(samples)])
    split_loss, split = gradients([collate(samples[:1]), collate(samples[1:])])
    assert split_loss == pytest.approx(whole_loss, rel=1e-4)
    assert whole.keys() == split.keys()
    for name, gradient in whole.items():
        # Gradients reach ~1e3; a bias before a GroupNorm (or a key bias) has a gradient that
        # is zero in exact arithmetic, here rounding noise of ~1e-4.
        error = float((split[name] - gradient).norm())
        assert error <= 1e-4 * float(gradient.norm()) + 1e-3, (name, error)


def test_accumulation_run_equals_a_larger_batch_run(same_size_coco, tmp_path, monkeypatch):
    monkeypatch.setitem(train_args.SCRATCH_CONFIGS, "deterministic", deterministic_config)
    runs = {}
    for name, flags in {
        "batch2": ("--batch-size", "2"),
        "batch1x2": ("--batch-size", "1", "--accumulate", "2"),
    }.items():
        out = tmp_path / name
        argv = arguments(same_size_coco, out, *flags, "--max-steps", "2", config="deterministic")
        assert train_module.main(argv) == 0
        runs[name] = (train_lines(out), load_file(str(out / "last" / "model.safetensors")))
    (lines, weights), (accumulated_lines, accumulated_weights) = runs.values()
    # Epoch 1 of three images: a window of 2, then the rest (1).
    assert [line["images"] for line in lines] == [line["images"] for line in accumulated_lines]
    for a, b in zip(lines, accumulated_lines, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for key, value in weights.items():
        # Parameters whose gradient is rounding noise (see above) move by up to ~lr / 30.
        torch.testing.assert_close(
            accumulated_weights[key],
            value,
            rtol=1e-4,
            atol=1e-5,
            msg=lambda message, key=key: f"{key}: {message}",
        )


def test_learning_rate_schedule():
    common = dict(steps_per_epoch=10, total_steps=100)
    step = [
        learning_rate_factor(s, schedule="step", warmup_steps=0, drop_epochs=(2, 4), **common)
        for s in (0, 19, 20, 39, 40)
    ]
    assert step == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    warm = [learning_rate_factor(s, schedule="step", warmup_steps=4, **common) for s in (0, 3, 4)]
    assert warm == pytest.approx([0.2, 0.8, 1.0])
    cosine = [
        learning_rate_factor(s, schedule="cosine", warmup_steps=0, **common) for s in (0, 50, 100)
    ]
    assert cosine == pytest.approx([1.0, 0.5, 0.0], abs=1e-9)


def test_bf16_is_refused_on_the_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        device, bf16 = train_module.choose_device("cpu", True)
    assert device.type == "cpu" and not bf16 and "CUDA" in caplog.text


@pytest.mark.parametrize("contrastive_bias", [True, False], ids=["native", "transformers"])
def test_a_checkpoint_folder_takes_a_vocabulary_file_as_text_encoder(
    coco, tmp_path, tokenizer, contrastive_bias
):
    """`--checkpoint DIR --text-encoder VOCAB.txt`: the file is read as without --checkpoint
    (it used to go to the Hub as a repository id). DIR has no tokenizer files of its own here, so
    the run can only have its vocabulary from the file."""
    torch.manual_seed(0)
    config = replace(tiny_config(len(tokenizer)), contrastive_bias=contrastive_bias)
    start = grounding.save_detector(build_model(config), tmp_path / "start")
    assert not (start / "vocab.txt").exists()
    out = tmp_path / "run"
    argv = arguments(coco, out, "--checkpoint", str(start), "--max-steps", "1", config=None)
    assert train_module.main([*argv, "--text-encoder", str(VOCAB_FILE)]) == 0
    assert read_training_state(out / "last")["progress"]["step"] == 1
    saved = grounding.load_detector(out / "last", device="cpu").tokenizer
    assert saved.get_vocab() == tokenizer.get_vocab()


def test_resume_flags_are_checked_against_one_parser(monkeypatch, tmp_path):
    built = []
    build_parser = train_args.build_parser

    def counting_build_parser():
        built.append(1)
        return build_parser()

    monkeypatch.setattr(train_args, "build_parser", counting_build_parser)
    args = train_args.parse_args(
        ["--train-images", "x", "--train-annotations", "x.json", "--out", "run", "--config", "tiny"]
    )
    built.clear()
    # A run recorded before any of the fixed flags existed: each is taken at its default.
    train_args.check_resume_flags({}, args)
    assert len(built) == 1
    with pytest.raises(ValueError, match=r"--lr 0\.5 -> 0\.0001; --seed 3 -> 0"):
        train_args.check_resume_flags({"lr": 0.5, "seed": 3}, args)
    # The command line's description is the first line of grounding.train's docstring.
    assert train_module.__doc__.split("\n")[0] == train_args.DESCRIPTION
