"""segmentation.fast_modes: int8 Linear layers against fp32 (the shipped shapes models on
generated images, within the tolerances below), the compile fallback without a compiler, and the
--quantize / --compile flags with their environment variables."""

from __future__ import annotations

import argparse
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from grounding.shapes_categories import CATEGORIES
from grounding.shapes_drawing import generate_image
from segmentation import fast_modes
from segmentation import models as model_flags
from segmentation.cli import main
from segmentation.fast_modes import (
    FOLDED,
    INT8_PARTS,
    Int8Linear,
    apply_fast_modes,
    check_quantize,
    compile_models,
    quantize_int8,
)
from segmentation.models import ENV_COMPILE, ENV_QUANTIZE, add_model_arguments, model_choice
from segmentation.sam import BoxSegmenter
from segmentation.shapes_metrics import box_iou, mask_iou

PROMPT = " . ".join(CATEGORIES) + " ."
BOX_THRESHOLD, TEXT_THRESHOLD = 0.35, 0.25  # the app's defaults
FRESH_SEEDS = [[2026, index] for index in range(6)]  # no training or test split uses these
# Tolerances, int8 against fp32, with a margin (1.5 to 3 times) over the worst values measured
# here (AMD EPYC, the shipped shapes models) with 8-bit / 7-bit inputs (reduce_range False, the
# default on CPUs with VNNI / True, the default without):
# - a single layer (random weights and inputs): relative L2 error of the output, per input bits
#   (measured 0.0098 / 0.0184);
LINEAR_RELATIVE_ERROR = {False: 0.02, True: 0.04}  # reduce_range (7-bit inputs): True
# - the detector: each fp32 detection scoring at least BOX_THRESHOLD + SCORE_MARGIN has an int8
#   detection with the same phrase, a box IoU of at least DETECTION_BOX_IOU and a score within
#   SCORE_TOLERANCE (weaker fp32 detections may fall below the threshold in int8); measured on
#   these 6 images, 12 detections: box IoU 0.950 / 0.950 at worst, score change 0.097 / 0.096;
SCORE_MARGIN, DETECTION_BOX_IOU, SCORE_TOLERANCE = 0.1, 0.9, 0.15
# - SAM: the image embedding's relative L2 error (measured 0.0093 / 0.0195), and each mask's IoU
#   with the fp32 mask for the same ground-truth box (measured 0.9958 / 0.9903 at worst).
EMBEDDING_RELATIVE_ERROR, MASK_IOU = 0.05, 0.97


@pytest.fixture(scope="module")
def models():
    """The shipped shapes detector and SAM, fp32 and int8 (eager)."""
    from segmentation.offline import shapes_detector, shapes_sam

    detector, sam = shapes_detector("cpu"), shapes_sam("cpu")
    detector_int8, sam_int8 = copy.deepcopy(detector), copy.deepcopy(sam)
    report = apply_fast_modes(detector_int8, sam_int8, quantize="int8")
    return detector, sam, detector_int8, sam_int8, report


@pytest.fixture(scope="module")
def samples():
    return [generate_image(np.random.default_rng(seed)) for seed in FRESH_SEEDS]


@pytest.mark.parametrize("reduce_range", [True, fast_modes.default_reduce_range()])
def test_an_int8_linear_is_close_to_fp32(reduce_range):
    torch.manual_seed(0)
    linear = nn.Linear(256, 384)
    inputs = torch.randn(2, 50, 256)  # any leading dimensions
    quantized = Int8Linear(linear, reduce_range=reduce_range)
    with torch.inference_mode():
        expected, actual = linear(inputs), quantized(inputs)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    error = float((actual - expected).norm() / expected.norm())
    assert error <= LINEAR_RELATIVE_ERROR[reduce_range]
    # `weight` still reads (dtype, shape), within half a quantization step per row
    step = linear.weight.abs().amax(dim=1, keepdim=True) / 127
    assert quantized.weight.shape == linear.weight.shape
    assert bool(((quantized.weight - linear.weight).abs() <= step / 2 + 1e-6).all())


def test_the_quantized_models_have_int8_linear_layers(models):
    detector, sam, detector_int8, sam_int8, report = models
    total = 0
    for kind, fp32, int8 in (("detector", detector.model, detector_int8.model),
                             ("sam", sam, sam_int8)):
        for name in INT8_PARTS[kind]:
            folded = {id(m) for part in getattr(int8, name).modules() if isinstance(part, FOLDED)
                      for m in part.modules()}
            linears = sum(type(m) is nn.Linear for m in getattr(fp32, name).modules()) - sum(
                type(m) is nn.Linear for m in getattr(int8, name).modules() if id(m) in folded)
            quantized = [m for m in getattr(int8, name).modules() if isinstance(m, Int8Linear)]
            assert linears > 0 and len(quantized) == linears, name
            # every Linear but the fusion attention's (it multiplies their weights) is int8
            assert not any(type(m) is nn.Linear for m in getattr(int8, name).modules()
                           if id(m) not in folded)
            assert all(type(m) is not Int8Linear for m in getattr(int8, name).modules()
                       if id(m) in folded)
            weight, _ = torch.ops.quantized.linear_unpack(quantized[0]._packed)
            assert weight.dtype == torch.qint8
            total += linears
    # The text encoder, the decoder and the heads stay fp32 (int8 made them no faster).
    assert type(detector_int8.model.text_backbone.projection) is nn.Linear
    assert report == {"quantize": "int8", "int8_layers": total, "compiled": False}


def test_int8_detections_match_fp32(models, samples):
    detector, _, detector_int8, _, _ = models
    compared = 0
    for sample in samples:
        expected = detector.predict(sample.image, PROMPT, BOX_THRESHOLD, TEXT_THRESHOLD)
        actual = detector_int8.predict(sample.image, PROMPT, BOX_THRESHOLD, TEXT_THRESHOLD)
        for index, phrase in enumerate(expected.phrases):
            if expected.scores[index] < BOX_THRESHOLD + SCORE_MARGIN:
                continue
            same = [j for j, other in enumerate(actual.phrases) if other == phrase]
            assert same, f"{phrase} lost in int8"
            ious = box_iou(expected.boxes[index : index + 1], actual.boxes[same])[0]
            best = same[int(ious.argmax())]
            assert ious.max() >= DETECTION_BOX_IOU, phrase
            assert abs(actual.scores[best] - expected.scores[index]) <= SCORE_TOLERANCE, phrase
            compared += 1
    assert compared >= 10


def test_int8_masks_match_fp32(models, samples):
    _, sam, _, sam_int8, _ = models
    for sample in samples:
        image = np.asarray(sample.image)
        fp32, int8 = BoxSegmenter(sam), BoxSegmenter(sam_int8)
        expected, actual = fp32.embed(image).features, int8.embed(image).features
        assert float((actual - expected).norm() / expected.norm()) <= EMBEDDING_RELATIVE_ERROR
        expected_masks, _ = fp32.segment(sample.boxes)
        actual_masks, _ = int8.segment(sample.boxes)
        assert mask_iou(expected_masks, actual_masks).min() >= MASK_IOU


def test_int8_is_refused_off_the_cpu():
    with pytest.raises(ValueError, match="CPU only"):
        check_quantize("int8", "cuda")
    with pytest.raises(ValueError, match="unknown quantize mode"):
        check_quantize("int4", "cpu")
    assert check_quantize(None, "cuda") == check_quantize("none", "cuda") == "none"
    from segmentation import load_pipeline

    with pytest.raises(ValueError, match="CPU only"):
        load_pipeline(offline=True, device="cuda", quantize="int8")  # before loading anything


def test_compile_without_a_compiler_warns_once_and_runs_eagerly(monkeypatch, samples):
    from segmentation import load_pipeline

    monkeypatch.setattr(fast_modes.shutil, "which", lambda name: None)
    assert "found none" in fast_modes.missing_compiler("cpu")
    eager = load_pipeline(offline=True, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline = load_pipeline(offline=True, device="cpu", compile=True)
        image = np.asarray(samples[0].image)
        result = pipeline.run(image, PROMPT, BOX_THRESHOLD, TEXT_THRESHOLD)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "--compile ignored, running eagerly" in messages[0]
    assert "C++ compiler" in messages[0]
    assert pipeline.segmenter.sam.image_encoder._compiled_call_impl is None
    expected = eager.run(image, PROMPT, BOX_THRESHOLD, TEXT_THRESHOLD)
    assert result.phrases == expected.phrases and len(result) > 0
    np.testing.assert_array_equal(result.boxes, expected.boxes)
    np.testing.assert_array_equal(result.scores, expected.scores)
    np.testing.assert_array_equal(result.masks, expected.masks)


@pytest.mark.parametrize(("triton", "found", "cc", "reason"), [
    (False, {"gcc"}, None, "Triton is not installed"),
    (True, set(), None, "looked for gcc, clang"),
    (True, {"clang"}, None, None),  # what Triton falls back to
    (True, {"gcc"}, "my-cc", "looked for my-cc"),  # $CC wins, as in Triton
    (True, {"my-cc"}, "my-cc", None),
])
def test_compile_on_cuda_needs_triton_and_a_c_compiler(monkeypatch, triton, found, cc, reason):
    import torch.utils._triton

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: triton)
    monkeypatch.setattr(fast_modes.shutil, "which", lambda name: name if name in found else None)
    if cc is None:
        monkeypatch.delenv("CC", raising=False)
    else:
        monkeypatch.setenv("CC", cc)
    missing = fast_modes.missing_compiler("cuda")
    assert missing is None if reason is None else reason in missing


# Importing torch._dynamo (by nn.Module.compile) warns about torch's own TorchScript classes.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_marks_sam_encoder_when_a_compiler_exists(monkeypatch):
    from segmentation.tiny_models import tiny_sam

    monkeypatch.setattr(fast_modes.shutil, "which", lambda name: f"/usr/bin/{name}")
    sam = tiny_sam()
    assert compile_models(sam) is True  # compiled lazily, on the first call (not made here)
    assert sam.image_encoder._compiled_call_impl is not None
    assert sam.mask_decoder._compiled_call_impl is None


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(fast_modes.missing_compiler("cpu") is not None, reason="no C++ compiler")
def test_compiled_sam_encoder_equals_eager():
    """As build_sam returns SAM (SDPA attention, fused Linear layers), compiled for real."""
    from segmentation.sam_attention import accelerate_sam
    from segmentation.tiny_models import tiny_sam

    sam = accelerate_sam(tiny_sam(image_size=256))
    pixels = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        expected = sam.image_encoder(pixels)
        assert compile_models(sam) is True
        torch.testing.assert_close(sam.image_encoder(pixels), expected, atol=1e-5, rtol=1e-5)


def test_quantize_int8_refuses_models_off_the_cpu():
    with pytest.raises(ValueError, match="CPU only"):
        quantize_int8(nn.Sequential(nn.Linear(4, 4, device="meta")))


def choose(flags: list[str], environ: dict[str, str]):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return model_choice(parser.parse_args(flags), environ)


def test_fast_mode_flags_then_environment_then_defaults():
    assert model_flags.QUANTIZE_MODES is fast_modes.QUANTIZE_MODES  # one table
    default = choose(["--device", "cpu"], {})
    assert (default.quantize, default.compile) == ("none", False)
    flags = choose(["--device", "cpu", "--quantize", "int8", "--compile"], {})
    assert (flags.quantize, flags.compile) == ("int8", True)
    from_env = choose(["--device", "cpu"], {ENV_QUANTIZE: "INT8", ENV_COMPILE: "1"})
    assert (from_env.quantize, from_env.compile) == ("int8", True)
    off = choose(["--device", "cpu"], {ENV_QUANTIZE: "none", ENV_COMPILE: "false"})
    assert (off.quantize, off.compile) == ("none", False)
    flags_win = choose(["--device", "cpu", "--quantize", "none", "--compile"],
                       {ENV_QUANTIZE: "int8", ENV_COMPILE: "0"})
    assert (flags_win.quantize, flags_win.compile) == ("none", True)
    described = flags.describe()
    assert "int8 Linear layers" in described and "torch.compile" in described
    assert "int8" not in default.describe() and "compile" not in default.describe()


@pytest.mark.parametrize(("flags", "environ", "message"), [
    (["--device", "cpu"], {ENV_QUANTIZE: "int4"}, ENV_QUANTIZE),
    (["--device", "cuda", "--quantize", "int8"], {}, "CPU only"),
    (["--device", "cuda"], {ENV_QUANTIZE: "int8"}, "CPU only"),
    (["--device", "cpu"], {ENV_COMPILE: "maybe"}, ENV_COMPILE),
])
def test_bad_fast_mode_values_are_errors(flags, environ, message):
    with pytest.raises(ValueError, match=message):
        choose(flags, environ)


@pytest.mark.parametrize("arguments", [
    ["--quantize", "int4"],
    ["--quantize"],
    ["--quantize", "int8", "--device", "cuda"],
    ["--compile", "yes"],
])
def test_bad_fast_mode_arguments_exit_with_usage_error(tmp_path, arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--prompt", "red circle .", "--out", str(tmp_path / "out"),
              "--offline", *arguments])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_app_shows_the_flags(capsys):
    import app

    with pytest.raises(SystemExit):
        app.parse_args(["--help"])
    printed = capsys.readouterr().out
    assert "--quantize {none,int8}" in printed and "--compile" in printed
    assert ENV_QUANTIZE in printed and ENV_COMPILE in printed


def test_evaluate_shapes_takes_the_fast_mode_flags(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "evaluate_shapes.py"
    spec = importlib.util.spec_from_file_location("evaluate_shapes", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    required = ["--detector", str(tmp_path), "--sam", str(tmp_path / "sam.safetensors")]
    args = script.parse_args([*required, "--quantize", "int8", "--compile"])
    assert (args.quantize, args.compile) == ("int8", True)
    assert (script.parse_args(required).quantize, script.parse_args(required).compile) == \
        ("none", False)
    with pytest.raises(SystemExit):
        script.parse_args([*required, "--quantize", "int4"])
    summary = script.timing_summary([(10.0, 9.0), (0.2, 0.1), (0.4, 0.3)])
    assert summary["first_image"] == 10.0 and summary["mean_after_first"] == pytest.approx(0.3)
    assert summary["cpu_mean_after_first"] == pytest.approx(0.2)
