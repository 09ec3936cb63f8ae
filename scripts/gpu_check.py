"""Every GPU check of issue "P7 Speed" (item 4) in one run, ending in one table.

Sections (`--sections`, default all; each is guarded: a failure is a FAIL row with the error and
the run goes on; each has a share of `--budget` seconds, so the run stays within it):

- env: torch / CUDA / cuDNN versions, the GPU, its memory, TF32 and SDPA switches.
- parity: our detector (`Detector.detect`) and SAM (`BoxSegmenter.embed` + `segment`, 5 boxes) in
  fp32 on the CPU vs the same weights on CUDA, TF32 off (targets: boxes 1e-3, logits 1e-3
  relative to 1 + the row's largest |logit|, SAM embedding 1e-3 relative to its largest |value|,
  mask IoU >= 0.99, >= 99% of the 900 selected image cells in common and >= 95% of the queries
  in the same slot), then again with TF32 on (reported, no target). Detector queries are compared
  slot by slot where both runs selected the same image cell for the slot (a swap between near-tied
  scores is counted, not compared: the decoder's content query belongs to the slot).
- autocast: bf16 and fp16 autocast on CUDA vs fp32 on CUDA: output differences; finite logits and
  >= 90% of the selected cells in common; detections at box threshold 0.35 and at the fp32 run's
  20th best score: of the clear ones (score above the threshold + 0.02), >= 90% found by the
  other run above the threshold - 0.02 (same phrase, box IoU >= 0.9), both ways; SAM finite, mask
  IoU mean >= 0.95.
- sync: `torch.cuda.set_sync_debug_mode("warn")` around the bare forwards (detector
  encode_image + ground, SAM image encoder, SAM prompt encoder + mask decoder, inputs already on
  the GPU: target 0 synchronisations) and around the wrappers (`detect`, `infer`, `embed`,
  `segment`, a first `GroundedSAM.run`: counted, the first call sites listed).
- sdpa: which scaled_dot_product_attention kernels (flash, memory-efficient, cuDNN, math) run on
  SAM's global-attention shape, fp32 and bf16, with and without a float bias (SAM's relative
  positions); and, when `segmentation/sam_attention.py` exists, `accelerate_sam(sam)` (SAM's
  ViT attention through SDPA) against plain segment_anything: outputs, kernels used (profiler),
  embedding time.
- deform: the two multi-scale deformable attention implementations of
  `grounding/deformable_attention.py`, `grid_sample_deformable_attention` (what
  `multi_scale_deformable_attention` dispatches to off the CPU) and
  `gathered_deformable_attention` (the CPU's), alone on random inputs at SwinT's sizes for an
  800 x 1200 image (levels 100x150, 50x75, 25x38, 13x19; 8 heads x 32, 4 points; the encoder's
  19,947 queries and the decoder's 900; value N(0, 1), locations uniform in [-0.1, 1.1], softmax
  weights): largest output difference in fp32 (target <= 1e-4), then with a bf16 value under
  bf16 autocast (as the model's value projection gives it, reported), medians of --runs calls
  after a warm-up, and which one the dispatch picks; one line says which is faster on the device.
- bench: medians of --runs interleaved rounds after one warm-up (CUDA synchronised around every
  call; peak GPU memory per stage): our detector vs transformers' `GroundingDinoForObjectDetection`
  (eager, fp32 and bf16 autocast), SAM embedding `BoxSegmenter.embed` vs
  `SamPredictor.set_image`, 5-box mask decoding vs `predict_torch`, "text -> masks" (a first
  `GroundedSAM.run` on an uncached image, box threshold 0, max_detections=5: SwinT + --sam-variant)
  in fp32, TF32, bf16 autocast (and bf16 + accelerate_sam, with its default mask blocks and with
  one SDPA call per block, when available) vs the same chain from transformers + SamPredictor,
  and the app's request (run + drawing + COCO JSON). Targets: text -> masks <= 30 ms; detector
  >= 5x transformers eager fp32. Precisions: "fp32" is TF32 off for matmuls and convolutions
  alike, "TF32" on for both (PyTorch's default lies between: TF32 convolutions, fp32 matmuls),
  "bf16" / "fp16" autocast.

Models: random weights, nothing downloaded. The detector is transformers' full-size
`GroundingDinoConfig()` (SwinT-OGC), perturbed and saved with `save_pretrained` plus a tokenizer
from tests/data/bert-base-uncased-vocab.txt (`scripts/benchmark_peers.py` builds it), loaded with
`grounding.load_detector` (which restores the processor's resize: the --size image stays as it
is); SAM is `segment_anything.sam_model_registry[--sam-variant](checkpoint=None)` after a fixed
seed, with its all-zero parameters (positional embedding, relative positions, LayerNorm biases)
given small noise so that every path of the attention counts. The image is seeded uniform noise.
Random weights do not give meaningful boxes; what is measured is speed, numerical agreement and
the kernels used.

On a CPU (`--device cpu`, for checking this script with `--tiny`) the CUDA-only checks are SKIP
and every PASS/FAIL becomes SKIP with "cpu dry run" (the CPU compared with itself).

Exit status: 0 when no row FAILs, 1 otherwise, 2 when --device cuda has no CUDA.

The device run (one call, H200: building the models takes about a minute, the sections stay under
--budget, default 420 s, so `timeout_s` 600 leaves room):

    python scripts/gpu_check.py --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.txt

Paste into the README (or notes) the header line and the final Markdown table, with the command
line; the JSON keeps every raw time. Check of this script on a CPU (tiny models, under a minute):

    OMP_NUM_THREADS=1 python scripts/gpu_check.py --tiny --device cpu --runs 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import benchmark_peers as peers  # scripts/benchmark_peers.py, beside this script
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import grounding  # noqa: E402
from grounding.predictor import Detector, RawPrediction  # noqa: E402
from grounding.text_masks import sub_sentence_masks  # noqa: E402
from grounding.transforms import preprocess  # noqa: E402
from segmentation.pipeline import GroundedSAM, LookAhead  # noqa: E402
from segmentation.sam import BoxSegmenter  # noqa: E402

CAPTION = peers.CAPTION
TEXT_THRESHOLD = peers.TEXT_THRESHOLD
BOXES = 5
SECTIONS = ("env", "parity", "autocast", "sync", "sdpa", "deform", "bench")
# Shares of --budget; a section's unused time goes to the ones after it.
SHARES = {"env": 0.02, "parity": 0.2, "autocast": 0.12, "sync": 0.06, "sdpa": 0.15, "deform": 0.03,
          "bench": 0.42}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Targets.
PARITY_BOX_ATOL, PARITY_LOGIT_RTOL, PARITY_EMBED_RTOL, PARITY_MASK_IOU = 1e-3, 1e-3, 1e-3, 0.99
AUTOCAST_MATCH, AUTOCAST_CELLS, AUTOCAST_MASK_IOU = 0.9, 0.9, 0.95
# Detections within this of the threshold may flip either way under rounding: not counted.
AUTOCAST_MARGIN = 0.02
TEXT_TO_MASKS_MS, DETECTOR_SPEEDUP = 30.0, 5.0
DEFORM_ATOL = 1e-4  # fp32 outputs of the two deformable attentions (about 1e-5 on a CPU)
# Deformable attention inputs: SwinT's four levels for an 800 x 1200 image (strides 8 to 64),
# heads, head width, points, decoder queries; with --tiny much smaller levels and queries.
DEFORM_SHAPES = [(100, 150), (50, 75), (25, 38), (13, 19)]
DEFORM_TINY_SHAPES = [(16, 24), (8, 12), (4, 6), (2, 3)]
DEFORM_HEADS, DEFORM_HEAD_DIM, DEFORM_POINTS = 8, 32, 4
DEFORM_QUERIES, DEFORM_TINY_QUERIES = 900, 100


# ----------------------------------------------------------------------------- report


@dataclass
class Row:
    section: str
    check: str
    value: str
    target: str = ""
    verdict: str = "INFO"  # PASS, FAIL, INFO, SKIP


@dataclass
class Report:
    """Rows as they come (printed at once), per-section data, written to --json after each
    section so that a run cut short keeps what it measured."""

    cuda: bool
    json_path: Path | None
    header: str = ""
    rows: list[Row] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def add(self, section: str, check: str, value: str, target: str = "",
            verdict: str = "INFO") -> None:
        if not self.cuda and verdict in ("PASS", "FAIL"):
            value, verdict = f"cpu dry run: {value}", "SKIP"
        row = Row(section, check, value, target, verdict)
        self.rows.append(row)
        print(f"[{section}] {check}: {value}" + (f" (target {target})" if target else "")
              + f" -> {verdict}", flush=True)

    def check(self, section: str, check: str, value: str, target: str, ok: bool) -> None:
        self.add(section, check, value, target, "PASS" if ok else "FAIL")

    def skip(self, section: str, check: str, why: str) -> None:
        self.rows.append(Row(section, check, why, "", "SKIP"))
        print(f"[{section}] {check}: {why} -> SKIP", flush=True)

    def fail(self, section: str, check: str, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
        self.rows.append(Row(section, check, message, "", "FAIL"))
        self.data.setdefault("errors", []).append(
            {"section": section, "check": check, "traceback": traceback.format_exc()})
        print(f"[{section}] {check}: {message} -> FAIL", flush=True)
        traceback.print_exc()

    def write_json(self) -> None:
        if self.json_path is None:
            return
        self.json_path.write_text(json.dumps(
            {"header": self.header, "command": sys.argv,
             "rows": [asdict(row) for row in self.rows], **self.data},
            indent=1, default=str))

    def table(self) -> str:
        lines = ["| section | check | value | target | verdict |", "|---|---|---|---|---|"]
        for row in self.rows:
            cells = (row.section, row.check, row.value, row.target, row.verdict)
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
        return "\n".join(lines)


@contextlib.contextmanager
def guarded(report: Report, section: str, check: str):
    """A failing check becomes a FAIL row; the section goes on."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 (any failure is a result here)
        report.fail(section, check, error)


# ----------------------------------------------------------------------------- models


@dataclass
class Context:
    """Everything the sections share: arguments, inputs and models (on the device)."""

    args: argparse.Namespace
    device: torch.device
    image: np.ndarray  # (H, W, 3) uint8
    pixels: torch.Tensor  # (1, 3, H, W) on the device, the detector's input
    boxes: np.ndarray  # (BOXES, 4) fixed SAM prompts, pixels
    detector: Detector
    sam: torch.nn.Module
    hf_model: torch.nn.Module | None = None
    processor: object = None
    _fast: tuple | None = None  # ({label: accelerated SAM}, why none)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def n_tokens(self) -> int:
        return len(self.detector.tokenizer(CAPTION)["input_ids"])

    def fast_sams(self) -> tuple[dict[str, torch.nn.Module], str]:
        """Copies of SAM with `segmentation.sam_attention.accelerate_sam` applied: its defaults
        ("accelerate_sam") and, when it takes `bias_elements`, the whole mask in one SDPA call
        per block ("accelerate_sam 1-call", bias_elements=0); or {} and why not. Built once."""
        if self._fast is None:
            try:
                module = importlib.import_module("segmentation.sam_attention")
            except ModuleNotFoundError as error:
                if error.name != "segmentation.sam_attention":
                    raise
                self._fast = ({}, "not available (no segmentation/sam_attention.py)")
                return self._fast
            accelerate = getattr(module, "accelerate_sam", None)
            if accelerate is None:
                raise AttributeError("segmentation.sam_attention has no accelerate_sam")
            variants = {"accelerate_sam": {}}
            if "bias_elements" in inspect.signature(accelerate).parameters:
                variants["accelerate_sam 1-call"] = {"bias_elements": 0}
            models = {}
            for label, kwargs in variants.items():
                model = copy.deepcopy(self.sam)
                result = accelerate(model, **kwargs)  # in place, or returning the model
                model = result if isinstance(result, torch.nn.Module) else model
                models[label] = model.to(self.device).eval()
            self._fast = (models, "")
        return self._fast


def build_context(args: argparse.Namespace, device: torch.device, report: Report) -> Context:
    height, width = args.size or ((256, 384) if args.tiny else (800, 1200))
    image = np.random.default_rng(args.seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        hf_model, processor = peers.save_random_transformers_model(
            Path(directory), args.tiny, (height, width), args.seed)
        detector = grounding.load_detector(directory, device=device)
    if "bench" in args.sections:
        hf_model.to(device)
    else:
        hf_model = processor = None
    sam = build_random_sam(args.sam_variant, args.tiny, args.seed).to(device).eval()
    pixels = preprocess(image, detector.image_size, detector.max_size)[None].to(device)
    report.data["build_seconds"] = time.perf_counter() - start
    return Context(args, device, image, pixels, peers.fixed_boxes(BOXES, height, width, args.seed),
                   detector, sam, hf_model, processor)


def build_random_sam(variant: str, tiny: bool, seed: int) -> torch.nn.Module:
    """segment_anything's `variant` after a fixed seed; all-zero parameters get N(0, 0.02^2)."""
    if tiny:
        from segmentation.tiny_models import tiny_sam

        return tiny_sam(seed)
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    sam = sam_model_registry[variant](checkpoint=None)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sam.parameters():
            if not parameter.any():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return sam


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def precision(device: torch.device, name: str):
    """"fp32" (TF32 off for matmuls and convolutions), "tf32" (on for both), or "bf16" / "fp16"
    autocast (TF32 off); the switches are restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        if name in DTYPES:
            with torch.autocast(device.type, dtype=DTYPES[name]):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, runs: int,
              deadline: float) -> tuple[float, list[float]]:
    """Median milliseconds of `fn` over up to `runs` calls after one warm-up (fewer past
    `deadline`, at least one)."""
    fn()
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() > deadline:
            break
    return statistics.median(times), times


def compare_detector(a, b, n_tokens: int) -> dict:
    """Two GroundingOutputs of one image: queries paired by slot where both selected the same
    image cell there. Returns the share of such slots, the share of cells both selected, the
    largest box difference and the largest logit difference relative to 1 + the row's largest
    |logit| (over the caption's tokens), and whether `a` has non-finite caption logits."""
    cells_a, cells_b = a.query_indices[0].cpu(), b.query_indices[0].cpu()
    same = cells_a == cells_b
    boxes_a, boxes_b = a.boxes[0].float().cpu()[same], b.boxes[0].float().cpu()[same]
    logits_a = a.logits[0, :, :n_tokens].float().cpu()[same]
    logits_b = b.logits[0, :, :n_tokens].float().cpu()[same]
    scale = 1 + logits_b.abs().amax(-1, keepdim=True)
    return {
        "same_slot": float(same.float().mean()),
        "same_cells": len(set(cells_a.tolist()) & set(cells_b.tolist())) / len(cells_a),
        "boxes_max_abs": float((boxes_a - boxes_b).abs().max()) if len(boxes_a) else float("nan"),
        "logits_max_rel": (float(((logits_a - logits_b).abs() / scale).max())
                           if len(logits_a) else float("nan")),
        "non_finite": int((~torch.isfinite(a.logits[0, :, :n_tokens].float())).sum()),
    }


def describe_detector(d: dict) -> str:
    return (f"boxes {d['boxes_max_abs']:.1e}, logits {d['logits_max_rel']:.1e} rel; "
            f"{d['same_slot']:.1%} queries same slot, {d['same_cells']:.1%} same cells"
            + (f"; {d['non_finite']} non-finite logits" if d["non_finite"] else ""))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per mask IoU of two (N, H, W) bool stacks (1 where both are empty)."""
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of x0, y0, x1, y1 boxes."""
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], 1), np.prod(b[:, 2:] - b[:, :2], 1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def found_share(a, b) -> tuple[int, int]:
    """How many of Detections `a` have a match in `b` (greedy, best score first: same phrase,
    box IoU >= 0.9, each of b used once), and len(a)."""
    if len(a) == 0 or len(b) == 0:
        return 0, len(a)
    iou = box_iou(a.boxes, b.boxes)
    iou[a.phrase_ids[:, None] != b.phrase_ids[None, :]] = 0.0
    free, found = np.ones(len(b), dtype=bool), 0
    for row in iou:
        candidates = np.flatnonzero((row >= 0.9) & free)
        if len(candidates):
            free[candidates[np.argmax(row[candidates])]] = False
            found += 1
    return found, len(a)


def compare_detections(detector: Detector, ref_raw: RawPrediction, raw: RawPrediction,
                       threshold: float) -> dict:
    """Detections of two runs at `threshold`: how many each keeps, and how many of the clear
    ones (score above threshold + AUTOCAST_MARGIN) the other run finds above threshold -
    AUTOCAST_MARGIN, both ways."""
    def select(prediction, at):
        return detector.select(prediction, min(1.0, max(0.0, at)), TEXT_THRESHOLD)

    high, low = threshold + AUTOCAST_MARGIN, threshold - AUTOCAST_MARGIN
    ref_found, ref_clear = found_share(select(ref_raw, high), select(raw, low))
    found, clear = found_share(select(raw, high), select(ref_raw, low))
    return {"kept": (len(select(ref_raw, threshold)), len(select(raw, threshold))),
            "reference_clear_found": (ref_found, ref_clear), "clear_found": (found, clear),
            "share": min(ref_found / ref_clear if ref_clear else 1.0,
                         found / clear if clear else 1.0)}


def raw_prediction(ctx: Context, output) -> RawPrediction:
    """A detect() output as `Detector.select` takes it (CAPTION is already normalised)."""
    ids = ctx.detector.caption_tokens(CAPTION)
    height, width = ctx.image.shape[:2]
    return RawPrediction([(ids, output.logits[0].float().cpu(), output.boxes[0].float().cpu())],
                         (width, height))


def sam_outputs(segmenter: BoxSegmenter, image: np.ndarray, boxes: np.ndarray):
    embedding = segmenter.embed(image)
    masks, scores = segmenter.segment(boxes)
    return embedding.features, masks, scores


def fresh_run(ctx: Context, segmenter: BoxSegmenter):
    """A first GroundedSAM.run (nothing cached): BOXES detections, box threshold 0."""
    return GroundedSAM(ctx.detector, segmenter, look_ahead=LookAhead.off()).run(
        ctx.image, CAPTION, box_threshold=0.0, text_threshold=TEXT_THRESHOLD,
        max_detections=BOXES)


# ----------------------------------------------------------------------------- sections


def section_env(ctx: Context, report: Report, deadline: float) -> None:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "transformers": version("transformers"), "segment_anything": version("segment-anything"),
        "timm": version("timm"), "kernels": version("kernels"),  # transformers' hub kernels
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
               "torch threads",
        "tf32_default": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                         "cudnn": torch.backends.cudnn.allow_tf32},
        "sdpa_enabled": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                         "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                         "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                         "math": torch.backends.cuda.math_sdp_enabled()},
    }
    report.add("env", "torch / CUDA / cuDNN",
               f"torch {env['torch']}, CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}")
    report.add("env", "libraries", f"python {env['python']}, transformers {env['transformers']}, "
               f"segment-anything {env['segment_anything']}, timm {env['timm']}, "
               f"kernels {env['kernels']} (transformers' hub kernels)")
    report.add("env", "CPU", env["cpu"])
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        free, total = torch.cuda.mem_get_info(ctx.device)
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "total_bytes": total, "free_bytes_after_loading": free,
                      "allocated_bytes_after_loading": torch.cuda.memory_allocated(ctx.device)}
        report.add("env", "GPU", f"{props.name} (sm_{props.major}{props.minor}), "
                   f"{total / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free after loading "
                   f"({torch.cuda.memory_allocated(ctx.device) / 2**30:.1f} GiB allocated)")
    else:
        report.skip("env", "GPU", "no CUDA device (cpu run)")
    report.add("env", "TF32 default (matmul / cudnn)",
               f"{env['tf32_default']['matmul']} / {env['tf32_default']['cudnn']}")
    report.add("env", "SDPA backends enabled", ", ".join(
        f"{name} {on}" for name, on in env["sdpa_enabled"].items()))
    report.add("env", "models", f"detector {'tiny' if ctx.args.tiny else 'SwinT-OGC'}, SAM "
               f"{'tiny' if ctx.args.tiny else ctx.args.sam_variant}, image "
               f"{ctx.image.shape[0]}x{ctx.image.shape[1]}, detector input "
               f"{tuple(ctx.pixels.shape[2:])}, built in {report.data['build_seconds']:.0f} s")
    report.data["env"] = env


def section_parity(ctx: Context, report: Report, deadline: float) -> None:
    """CPU fp32 (reference) vs the device, TF32 off then on."""
    detector, n_tokens = ctx.detector, ctx.n_tokens()
    cpu = torch.device("cpu")
    cpu_detector = Detector(copy.deepcopy(detector.model).to(cpu), detector.tokenizer, cpu,
                            image_size=detector.image_size, max_size=detector.max_size)
    cpu_segmenter = BoxSegmenter(copy.deepcopy(ctx.sam).to(cpu))
    start = time.perf_counter()
    reference = cpu_detector.detect(ctx.pixels.cpu(), CAPTION)
    ref_features, ref_masks, ref_scores = sam_outputs(cpu_segmenter, ctx.image, ctx.boxes)
    report.data["parity"] = {"cpu_seconds": time.perf_counter() - start}
    del cpu_detector, cpu_segmenter
    segmenter = BoxSegmenter(ctx.sam)
    for mode in ("fp32", "tf32"):
        strict = mode == "fp32"
        label = "TF32 off" if strict else "TF32 on"
        with guarded(report, "parity", f"detector CPU vs {ctx.device.type} fp32, {label}"):
            with precision(ctx.device, mode):
                output = detector.detect(ctx.pixels, CAPTION)
            d = compare_detector(output, reference, n_tokens)
            report.data["parity"][f"detector_{mode}"] = d
            ok = (d["boxes_max_abs"] <= PARITY_BOX_ATOL and d["logits_max_rel"] <= PARITY_LOGIT_RTOL
                  and d["same_cells"] >= 0.99 and d["same_slot"] >= 0.95 and not d["non_finite"])
            target = (f"boxes <= {PARITY_BOX_ATOL:.0e}, logits <= {PARITY_LOGIT_RTOL:.0e} rel, "
                      ">= 99% same cells, >= 95% same slot")
            if strict:
                report.check("parity", f"detector CPU vs {ctx.device.type}, {label}",
                             describe_detector(d), target, ok)
            else:
                report.add("parity", f"detector CPU vs {ctx.device.type}, {label}",
                           describe_detector(d), f"(reported) {target}")
        with guarded(report, "parity", f"SAM CPU vs {ctx.device.type} fp32, {label}"):
            with precision(ctx.device, mode):
                features, masks, scores = sam_outputs(segmenter, ctx.image, ctx.boxes)
            embed = relative_difference(features, ref_features)
            ious = mask_ious(masks, ref_masks)
            score_diff = float(np.abs(scores - ref_scores).max())
            report.data["parity"][f"sam_{mode}"] = {"embedding_max_rel": embed,
                                                    "mask_iou": ious.tolist(),
                                                    "iou_score_max_abs": score_diff}
            value = (f"embedding {embed:.1e} rel, mask IoU min {ious.min():.4f} (mean "
                     f"{ious.mean():.4f}), IoU scores {score_diff:.1e}")
            target = f"embedding <= {PARITY_EMBED_RTOL:.0e} rel, mask IoU >= {PARITY_MASK_IOU}"
            if strict:
                report.check("parity", f"SAM CPU vs {ctx.device.type}, {label}", value, target,
                             embed <= PARITY_EMBED_RTOL and ious.min() >= PARITY_MASK_IOU)
            else:
                report.add("parity", f"SAM CPU vs {ctx.device.type}, {label}", value,
                           f"(reported) {target}")


def section_autocast(ctx: Context, report: Report, deadline: float) -> None:
    """bf16 / fp16 autocast vs fp32 on the device."""
    detector, n_tokens = ctx.detector, ctx.n_tokens()
    segmenter = BoxSegmenter(ctx.sam)
    with precision(ctx.device, "fp32"):
        reference = detector.detect(ctx.pixels, CAPTION)
        ref_features, ref_masks, _ = sam_outputs(segmenter, ctx.image, ctx.boxes)
    ref_raw = raw_prediction(ctx, reference)
    ranked = detector.select(ref_raw, 0.0, TEXT_THRESHOLD).scores
    top20 = float(ranked[min(19, len(ranked) - 1)]) if len(ranked) else 0.5
    report.data["autocast"] = {"top20_threshold": top20}
    for name in DTYPES:
        with guarded(report, "autocast", f"detector {name}"):
            with precision(ctx.device, name):
                output = detector.detect(ctx.pixels, CAPTION)
            d = compare_detector(output, reference, n_tokens)
            raw = raw_prediction(ctx, output)
            matches = {label: compare_detections(detector, ref_raw, raw, threshold)
                       for label, threshold in (("0.35", 0.35), ("top20", top20))}
            report.data["autocast"][f"detector_{name}"] = {**d, "matches": matches}
            report.check("autocast", f"detector {name} vs fp32: queries", describe_detector(d),
                         f"finite, >= {AUTOCAST_CELLS:.0%} same cells",
                         not d["non_finite"] and d["same_cells"] >= AUTOCAST_CELLS)
            for label, m in matches.items():
                threshold = "0.35" if label == "0.35" else f"{top20:.3f} (fp32's 20th best)"
                (ref_found, ref_clear), (found, clear) = m["reference_clear_found"], \
                    m["clear_found"]
                report.check(
                    "autocast", f"detector {name} vs fp32: detections at {threshold}",
                    f"kept {m['kept'][0]} (fp32) / {m['kept'][1]} ({name}); clear ones (score "
                    f"> threshold + {AUTOCAST_MARGIN}) found by the other (score > threshold - "
                    f"{AUTOCAST_MARGIN}, same phrase, IoU >= 0.9): fp32's {ref_found}/{ref_clear},"
                    f" {name}'s {found}/{clear}",
                    f">= {AUTOCAST_MATCH:.0%} found both ways", m["share"] >= AUTOCAST_MATCH)
        with guarded(report, "autocast", f"SAM {name}"):
            low_segmenter = BoxSegmenter(ctx.sam)
            with precision(ctx.device, name):
                features, masks, _ = sam_outputs(low_segmenter, ctx.image, ctx.boxes)
            embed = relative_difference(features, ref_features)
            ious = mask_ious(masks, ref_masks)
            finite = bool(torch.isfinite(features.float()).all())
            report.data["autocast"][f"sam_{name}"] = {
                "embedding_max_rel": embed, "mask_iou": ious.tolist(), "finite": finite,
                "embedding_dtype": str(features.dtype)}
            report.check("autocast", f"SAM {name} vs fp32",
                         f"embedding {embed:.1e} rel ({features.dtype}), mask IoU mean "
                         f"{ious.mean():.4f} (min {ious.min():.4f})",
                         f"finite, mask IoU mean >= {AUTOCAST_MASK_IOU}",
                         finite and ious.mean() >= AUTOCAST_MASK_IOU)


def count_syncs(fn: Callable[[], object], device: torch.device) -> tuple[int, Counter]:
    """Synchronising CUDA operations `fn` makes, and where (innermost frame outside torch, and
    the innermost frame of this repository when that is another)."""
    sites: Counter = Counter()
    count = 0

    def record(message, category, filename, lineno, file=None, line=None):
        nonlocal count
        if "synchroniz" not in str(message):
            return
        count += 1
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")
                  and f.name != "count_syncs"]
        if not frames:
            sites[f"{filename}:{lineno}"] += 1
            return
        inner = frames[-1]
        ours = [f for f in frames if f.filename.startswith(str(ROOT))
                and not f.filename.endswith("gpu_check.py")]
        site = short_frame(inner)
        if ours and ours[-1] is not inner:
            site += f" (from {short_frame(ours[-1])})"
        sites[site] += 1

    synchronize(device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return count, sites


def short_frame(frame: traceback.FrameSummary) -> str:
    path = frame.filename
    if path.startswith(str(ROOT)):
        path = os.path.relpath(path, ROOT)
    elif "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    return f"{path}:{frame.lineno} {frame.name}"


def section_sync(ctx: Context, report: Report, deadline: float) -> None:
    if not ctx.cuda:
        report.skip("sync", "set_sync_debug_mode", "needs CUDA")
        return
    detector, sam, device = ctx.detector, ctx.sam, ctx.device
    segmenter = BoxSegmenter(sam)
    tokens = detector.tokenizer([CAPTION], padding="longest", return_tensors="pt")
    input_ids = tokens["input_ids"].to(device)
    token_mask = tokens["attention_mask"].to(device).bool()
    text_masks = sub_sentence_masks(input_ids, token_mask, detector.special_token_ids)
    predictor = segmenter.predictor
    segmenter.embed(ctx.image)
    resized = predictor.transform.apply_image(ctx.image)
    encoder_input = sam.preprocess(torch.as_tensor(resized, device=device).permute(2, 0, 1)[None]
                                   .contiguous().float())
    height, width = ctx.image.shape[:2]
    prompts = predictor.transform.apply_boxes_torch(torch.as_tensor(ctx.boxes, device=device),
                                                    (height, width))
    features = predictor.features

    @torch.inference_mode()
    def detector_forward():
        encoded = detector.model.encode_image(ctx.pixels)
        return detector.model.ground(encoded, input_ids, token_mask, text_masks=text_masks)

    @torch.inference_mode()
    def sam_encoder():
        return sam.image_encoder(encoder_input)

    @torch.inference_mode()
    def sam_decoder():
        sparse, dense = sam.prompt_encoder(points=None, boxes=prompts, masks=None)
        low_res, _ = sam.mask_decoder(image_embeddings=features,
                                      image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=False)
        return sam.postprocess_masks(low_res, predictor.input_size, (height, width)) > 0

    bare = [("detector encode_image + ground", detector_forward),
            ("SAM image encoder", sam_encoder),
            ("SAM prompt encoder + mask decoder + upscale", sam_decoder)]
    wrappers = [("Detector.detect (tokenizes, inputs to the GPU)",
                 lambda: detector.detect(ctx.pixels, CAPTION)),
                ("Detector.infer (+ preprocessing, outputs to the CPU)",
                 lambda: detector.infer(ctx.image, CAPTION)),
                ("BoxSegmenter.embed", lambda: segmenter.embed(ctx.image)),
                (f"BoxSegmenter.segment, {BOXES} boxes", lambda: segmenter.segment(ctx.boxes)),
                (f"GroundedSAM.run, first run, {BOXES} boxes",
                 lambda: fresh_run(ctx, BoxSegmenter(sam)))]
    report.data["sync"] = {}
    bare_names = {name for name, _ in bare}
    for name, fn in bare + wrappers:
        with guarded(report, "sync", name):
            fn()  # warm-up: lazy initialisation does not count
            count, sites = count_syncs(fn, device)
            report.data["sync"][name] = {"count": count, "sites": dict(sites)}
            listed = "; ".join(f"{site} x{n}" for site, n in sites.most_common(4))
            more = f"; +{len(sites) - 4} more sites" if len(sites) > 4 else ""
            value = f"{count} syncs" + (f": {listed}{more}" if count else "")
            if name in bare_names:
                report.check("sync", f"forward: {name}", value, "0 syncs", count == 0)
            else:
                report.add("sync", f"wrapper: {name}", value, "(reported: inputs in, results out)")


def section_sdpa(ctx: Context, report: Report, deadline: float) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    encoder = ctx.sam.image_encoder
    width = encoder.patch_embed.proj.out_channels
    heads = encoder.blocks[0].attn.num_heads
    tokens = (encoder.img_size // encoder.patch_embed.proj.kernel_size[0]) ** 2
    report.data["sdpa"] = {"probe_shape": [1, heads, tokens, width // heads]}
    backends = {"flash": SDPBackend.FLASH_ATTENTION,
                "mem-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cuDNN": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if ctx.cuda:
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for bias in (False, True):
                check = (f"kernels for SAM global attention {tokens} tokens, {heads} heads x "
                         f"{width // heads}, {dtype_name}, "
                         + ("float bias" if bias else "no mask"))
                with guarded(report, "sdpa", check):
                    results = sdpa_probe(ctx.device, dtype, bias, (1, heads, tokens,
                                                                  width // heads), backends,
                                         sdpa_kernel, deadline)
                    report.data["sdpa"][check] = results
                    report.add("sdpa", check, "; ".join(
                        f"{name} {result}" for name, result in results.items()))
    else:
        report.skip("sdpa", "SDPA kernel probe (flash / mem-efficient / cuDNN)", "needs CUDA")
    with guarded(report, "sdpa", "plain segment_anything: SDPA calls"):
        segmenter = BoxSegmenter(ctx.sam)
        ops = sdpa_ops(lambda: sam_outputs(segmenter, ctx.image, ctx.boxes))
        report.add("sdpa", "plain segment_anything: SDPA kernels used (embed + segment)",
                   describe_ops(ops))
    fast, why = ctx.fast_sams()
    if not fast:
        report.add("sdpa", "accelerate_sam (segmentation/sam_attention.py)", why)
        return
    plain_segmenter = BoxSegmenter(ctx.sam)
    segmenters = {label: BoxSegmenter(model) for label, model in fast.items()}
    with precision(ctx.device, "fp32"):
        features, masks, _ = sam_outputs(plain_segmenter, ctx.image, ctx.boxes)
    for name in ("fp32", "bf16"):
        for label, segmenter in segmenters.items():
            check = f"{label} {name} vs plain fp32"
            with guarded(report, "sdpa", check):
                with precision(ctx.device, name):
                    fast_features, fast_masks, _ = sam_outputs(segmenter, ctx.image, ctx.boxes)
                    ops = sdpa_ops(lambda s=segmenter: sam_outputs(s, ctx.image, ctx.boxes))
                embed = relative_difference(fast_features, features)
                ious = mask_ious(fast_masks, masks)
                fused = any(kind in op for op in ops for kind in ("flash", "efficient", "cudnn"))
                report.data["sdpa"][f"{label} {name}"] = {
                    "embedding_max_rel": embed, "mask_iou": ious.tolist(), "ops": ops}
                value = (f"embedding {embed:.1e} rel, mask IoU mean {ious.mean():.4f} (min "
                         f"{ious.min():.4f}); SDPA kernels: {describe_ops(ops)}")
                if name == "fp32":
                    target = (f"embedding <= {PARITY_EMBED_RTOL:.0e} rel, mask IoU >= "
                              f"{PARITY_MASK_IOU}, a fused kernel")
                    ok = embed <= PARITY_EMBED_RTOL and ious.min() >= PARITY_MASK_IOU
                else:
                    target = f"mask IoU mean >= {AUTOCAST_MASK_IOU}, a fused kernel"
                    ok = ious.mean() >= AUTOCAST_MASK_IOU
                report.check("sdpa", check, value, target, ok and (fused or not ctx.cuda))
        with guarded(report, "sdpa", f"SAM embedding time {name}"):
            times = {}
            with precision(ctx.device, name):
                for label, segmenter in {"plain": plain_segmenter, **segmenters}.items():
                    times[label] = median_ms(lambda s=segmenter: s.embed(ctx.image),
                                             ctx.device, ctx.args.runs, deadline)
            report.data["sdpa"][f"embed_ms_{name}"] = {k: v[1] for k, v in times.items()}
            plain_ms = times["plain"][0]
            report.add("sdpa", f"SAM embedding {name}: plain vs accelerated", ", ".join(
                f"{label} {ms:.1f} ms" + ("" if label == "plain" else f" ({plain_ms / ms:.2f}x)")
                for label, (ms, _) in times.items()))


def sdpa_probe(device, dtype, bias: bool, shape, backends, sdpa_kernel, deadline) -> dict:
    """Per backend alone: median ms of scaled_dot_product_attention, or why it cannot run."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator)
               for _ in range(3))
    mask = (torch.randn(shape[0], shape[1], shape[2], shape[2], device=device, dtype=dtype,
                        generator=generator) if bias else None)
    results = {}
    for name, backend in backends.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:  # SDPA says why a kernel cannot run in warnings, then raises
                with sdpa_kernel([backend]):
                    ms, _ = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask), device, 5, deadline)
                results[name] = f"runs {ms:.2f} ms"
            except RuntimeError as error:
                reasons = [str(w.message).strip().split("\n")[0] for w in caught]
                reasons = [r for r in reasons if r and "not used because" not in r]
                reason = reasons[0] if reasons else str(error).split("\n")[0]
                results[name] = f"no ({reason[:120]})"
    return results


def sdpa_ops(fn: Callable[[], object]) -> dict[str, int]:
    """The scaled_dot_product_attention implementations `fn` calls (profiler op names)."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    return {event.key: event.count for event in prof.key_averages()
            if "scaled_dot_product" in event.key
            and event.key != "aten::scaled_dot_product_attention"}


def describe_ops(ops: dict[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in ops.items()) or "none"


def deformable_inputs(spatial_shapes: list[tuple[int, int]], queries: int, seed: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch 1: value N(0, 1) `(1, S, heads, head_dim)`, sampling locations uniform in
    [-0.1, 1.1] (some off the map) and softmax weights; drawn on the CPU, the same on every
    device."""
    generator = torch.Generator().manual_seed(seed)
    tokens, levels = sum(h * w for h, w in spatial_shapes), len(spatial_shapes)
    value = torch.randn(1, tokens, DEFORM_HEADS, DEFORM_HEAD_DIM, generator=generator)
    locations = torch.rand(1, queries, DEFORM_HEADS, levels, DEFORM_POINTS, 2,
                           generator=generator) * 1.2 - 0.1
    weights = torch.randn(1, queries, DEFORM_HEADS, levels * DEFORM_POINTS, generator=generator)
    weights = weights.softmax(-1).view(1, queries, DEFORM_HEADS, levels, DEFORM_POINTS)
    return value.to(device), locations.to(device), weights.to(device)


def faster_or_slower(ratio: float) -> str:
    """`ratio` = grid_sample time / gathered time, in words for the gathered one."""
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def section_deform(ctx: Context, report: Report, deadline: float) -> None:
    """grid_sample vs gathered multi-scale deformable attention alone, on the device."""
    from grounding import deformable_attention as deform

    device, kind = ctx.device, ctx.device.type
    shapes = DEFORM_TINY_SHAPES if ctx.args.tiny else DEFORM_SHAPES
    tokens = sum(h * w for h, w in shapes)
    cases = {"encoder": tokens, "decoder": DEFORM_TINY_QUERIES if ctx.args.tiny
             else DEFORM_QUERIES}
    implementations = {"grid_sample": deform.grid_sample_deformable_attention,
                       "gathered": deform.gathered_deformable_attention}
    data = report.data["deform"] = {
        "spatial_shapes": shapes, "heads": DEFORM_HEADS, "head_dim": DEFORM_HEAD_DIM,
        "points": DEFORM_POINTS, "queries": cases, "dispatch": None, "ratio": {}}
    shape = (f"{len(shapes)} levels {'/'.join(f'{h}x{w}' for h, w in shapes)}, {DEFORM_HEADS} "
             f"heads x {DEFORM_HEAD_DIM}, {DEFORM_POINTS} points")
    for case, queries in cases.items():
        value, locations, weights = deformable_inputs(shapes, queries, ctx.args.seed, device)
        reference = None  # grid_sample's fp32 output
        for mode in ("fp32", "bf16"):
            check = f"{case} ({queries} queries) {mode}"
            with guarded(report, "deform", check):
                # bf16: the value as the model's value projection gives it under autocast;
                # locations and softmax weights stay fp32 there too.
                mode_value = value if mode == "fp32" else value.to(torch.bfloat16)

                def call(fn, mode=mode, inputs=(mode_value, shapes, locations, weights)):
                    with precision(device, mode), torch.inference_mode():
                        return fn(*inputs)

                outputs = {name: call(fn) for name, fn in implementations.items()}
                times = {name: median_ms(lambda fn=fn: call(fn), device, ctx.args.runs, deadline)
                         for name, fn in implementations.items()}
                difference = float((outputs["gathered"].float()
                                    - outputs["grid_sample"].float()).abs().max())
                entry = {"max_abs": difference, "dtype": str(outputs["gathered"].dtype),
                         **{f"{name}_ms": ms for name, (ms, _) in times.items()},
                         **{f"{name}_times_ms": runs for name, (_, runs) in times.items()}}
                if mode == "fp32":
                    reference = outputs["grid_sample"]
                    report.check("deform", f"{check}: gathered vs grid_sample",
                                 f"max abs {difference:.1e} (outputs up to "
                                 f"{float(reference.abs().max()):.2f}); {shape}",
                                 f"<= {DEFORM_ATOL:.0e}", difference <= DEFORM_ATOL)
                    if case == "encoder":  # which one the dispatch runs: the same output
                        used = call(deform.multi_scale_deformable_attention)
                        off = {name: float((used - out).abs().max())
                               for name, out in outputs.items()}
                        closest = min(off, key=off.get)
                        data["dispatch"] = closest if off[closest] == 0 else (
                            f"{closest}? (closest, off by {off[closest]:.1e})")
                else:
                    to_fp32 = {name: float((out.float() - reference.float()).abs().max())
                               if reference is not None else float("nan")
                               for name, out in outputs.items()}
                    entry["max_abs_vs_fp32"] = to_fp32
                    report.add("deform", f"{check} autocast, bf16 value: gathered vs grid_sample",
                               f"max abs {difference:.1e} ({entry['dtype']} outputs); vs fp32 "
                               f"grid_sample: grid_sample {to_fp32['grid_sample']:.1e}, "
                               f"gathered {to_fp32['gathered']:.1e}", "(reported)")
                grid_ms, gathered_ms = times["grid_sample"][0], times["gathered"][0]
                ratio = grid_ms / gathered_ms
                data["ratio"][check] = ratio
                data[check] = entry
                report.add("deform", f"{check}: time grid_sample / gathered",
                           f"{grid_ms:.2f} ms / {gathered_ms:.2f} ms = {ratio:.2f}x (gathered "
                           f"{faster_or_slower(ratio)}; median of {len(times['gathered'][1])})")
    ratios = data["ratio"]
    if not ratios:
        return
    # The headline: the encoder in fp32 (the bulk of the model's deformable attention time).
    headline = f"encoder ({tokens} queries) fp32"
    headline = headline if headline in ratios else next(iter(ratios))
    others = [f"{check}: {faster_or_slower(ratio)}" for check, ratio in ratios.items()
              if check != headline]
    dispatch = data["dispatch"] or "unknown (the encoder fp32 check failed)"
    summary = (f"deformable attention on {kind}: gathered is "
               f"{faster_or_slower(ratios[headline])} than grid_sample ({headline}; "
               + "".join(f"{other}; " for other in others)
               + f"dispatch uses {dispatch} on {kind})")
    print(summary, flush=True)
    report.add("deform", f"which to dispatch to on {kind}",
               summary.removeprefix(f"deformable attention on {kind}: "))


@dataclass
class Stage:
    name: str
    fn: Callable[[], object]
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    error: str = ""
    note: str = ""


def section_bench(ctx: Context, report: Report, deadline: float) -> None:
    from segment_anything import SamPredictor

    from segmentation.export import to_json_dict
    from segmentation.visualize import annotate

    device, detector, image, boxes = ctx.device, ctx.detector, ctx.image, ctx.boxes
    hf_model, processor = ctx.hf_model, ctx.processor
    height, width = image.shape[:2]
    tokenizer = detector.tokenizer
    precisions = ("fp32", "tf32", "bf16")
    segmenters = {name: BoxSegmenter(ctx.sam) for name in precisions}
    predictors = {name: SamPredictor(ctx.sam) for name in precisions}

    def under(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def call():
            with precision(device, name):
                return fn()
        return call

    def hf_detect():
        tokens = tokenizer([CAPTION], padding="longest", return_tensors="pt").to(device)
        with torch.inference_mode():
            return hf_model(pixel_values=ctx.pixels, input_ids=tokens["input_ids"],
                            attention_mask=tokens["attention_mask"],
                            token_type_ids=torch.zeros_like(tokens["input_ids"]))

    def peer_decode(predictor):
        prompts = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, device=device),
                                                        (height, width))
        with torch.inference_mode():
            masks, scores, _ = predictor.predict_torch(None, None, boxes=prompts,
                                                       multimask_output=False)
        return masks[:, 0].cpu().numpy(), scores[:, 0].float().cpu().numpy()

    def peer_text_to_masks(predictor):
        """transformers' processor, forward and post-processing (best BOXES boxes, clipped),
        then SamPredictor.set_image and predict_torch, results on the CPU."""
        inputs = processor(images=image, text=CAPTION, return_tensors="pt").to(device)
        with torch.inference_mode():
            outputs = hf_model(**inputs)
        found = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=0.0, text_threshold=TEXT_THRESHOLD,
            target_sizes=[(height, width)])[0]
        best = found["scores"].argsort(descending=True)[:BOXES]
        return peers.peer_boxes_to_masks(predictor, image, found["boxes"][best])

    def app_request(segmenter):
        result = fresh_run(ctx, segmenter)
        return annotate(image, result), to_json_dict(result)

    stages = [
        Stage("detector fp32: ours", under("fp32", lambda: detector.detect(ctx.pixels, CAPTION))),
        Stage("detector fp32: transformers eager", under("fp32", hf_detect)),
        Stage("detector TF32: ours", under("tf32", lambda: detector.detect(ctx.pixels, CAPTION))),
        Stage("detector bf16: ours", under("bf16", lambda: detector.detect(ctx.pixels, CAPTION))),
        Stage("detector bf16: transformers eager", under("bf16", hf_detect)),
    ]
    for name in precisions:
        stages += [
            Stage(f"SAM embedding {name}: ours", under(name, lambda s=segmenters[name]:
                                                         s.embed(image))),
            Stage(f"SAM embedding {name}: SamPredictor.set_image",
                  under(name, lambda p=predictors[name]: p.set_image(image))),
            # Each side's own predictor has this image set by the embedding stage before it.
            Stage(f"mask decoding {BOXES} boxes {name}: ours",
                  under(name, lambda s=segmenters[name]: s.segment(boxes))),
            Stage(f"mask decoding {BOXES} boxes {name}: SamPredictor.predict_torch",
                  under(name, lambda p=predictors[name]: peer_decode(p))),
        ]
    stages += [Stage(f"text -> masks {name}: ours", under(name, lambda s=segmenters[name]:
                                                           fresh_run(ctx, s)))
               for name in precisions]
    try:
        fast, fast_note = ctx.fast_sams()
    except Exception as error:  # noqa: BLE001
        fast, fast_note = {}, f"accelerate_sam failed: {type(error).__name__}: {error}"
    for label, model in fast.items():
        fast_segmenter = BoxSegmenter(model)
        stages += [Stage(f"SAM embedding bf16: {label}",
                         under("bf16", lambda s=fast_segmenter: s.embed(image))),
                   Stage(f"text -> masks bf16 + {label}: ours",
                         under("bf16", lambda s=fast_segmenter: fresh_run(ctx, s)))]
    stages += [
        Stage("text -> masks fp32: transformers + SamPredictor",
              under("fp32", lambda: peer_text_to_masks(predictors["fp32"]))),
        Stage("text -> masks bf16: transformers + SamPredictor",
              under("bf16", lambda: peer_text_to_masks(predictors["bf16"]))),
        Stage("app request fp32 (run + drawing + COCO JSON)",
              under("fp32", lambda: app_request(segmenters["fp32"]))),
        Stage("app request bf16 (run + drawing + COCO JSON)",
              under("bf16", lambda: app_request(segmenters["bf16"]))),
    ]
    by_name = {stage.name: stage for stage in stages}
    outputs = {}
    for stage in stages:  # warm-up; a stage that fails is reported and left out
        try:
            outputs[stage.name] = stage.fn()
        except Exception as error:  # noqa: BLE001
            stage.error = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
            report.fail("bench", stage.name, error)
    for name, result in outputs.items():
        if name.startswith("text -> masks") and name.endswith(": ours"):
            by_name[name].note = f"{len(result)} masks"
    live = [stage for stage in stages if not stage.error]
    rounds = 0
    for round_index in range(ctx.args.runs):
        for stage in live if round_index % 2 == 0 else live[::-1]:
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            stage.fn()
            synchronize(device)
            stage.seconds.append(time.perf_counter() - start)
            if ctx.cuda:
                stage.peak_bytes = max(stage.peak_bytes, torch.cuda.max_memory_allocated(device))
        rounds += 1
        if time.perf_counter() > deadline:
            break
    medians = {stage.name: statistics.median(stage.seconds) * 1e3 for stage in live}
    report.data["bench"] = {
        "rounds": rounds, "accelerate_sam": fast_note or sorted(fast),
        "stages": {stage.name: {"seconds": stage.seconds, "median_ms": medians.get(stage.name),
                                "cuda_peak_bytes": stage.peak_bytes, "error": stage.error,
                                "note": stage.note} for stage in stages}}
    print(f"\nbench: medians of {rounds} interleaved rounds after a warm-up, {ctx.device}")
    print("| stage | median ms | min ms | runs | GPU peak GB | note |\n|---|---|---|---|---|---|")
    for stage in stages:
        if stage.error:
            print(f"| {stage.name} | FAIL | | | | {stage.error[:80]} |")
            continue
        print(f"| {stage.name} | {medians[stage.name]:.1f} | {min(stage.seconds) * 1e3:.1f} | "
              f"{len(stage.seconds)} | {stage.peak_bytes / 1e9:.2f} | {stage.note} |")
    print(flush=True)

    def ms(name: str) -> float | None:
        return medians.get(name)

    def ratio_row(check: str, slow: str, fast_name: str, target: float | None) -> None:
        if ms(slow) is None or ms(fast_name) is None:
            report.skip("bench", check, "a stage failed (above)")
            return
        ratio = ms(slow) / ms(fast_name)
        value = f"{ms(slow):.1f} ms / {ms(fast_name):.1f} ms = {ratio:.2f}x"
        if target is None:
            report.add("bench", check, value)
        else:
            report.check("bench", check, value, f">= {target:g}x", ratio >= target)

    ratio_row("detector speed-up fp32 (transformers eager fp32 / ours fp32)",
              "detector fp32: transformers eager", "detector fp32: ours", DETECTOR_SPEEDUP)
    ratio_row("detector speed-up bf16 (transformers eager fp32 / ours bf16)",
              "detector fp32: transformers eager", "detector bf16: ours", DETECTOR_SPEEDUP)
    ratio_row("detector bf16 (transformers eager bf16 / ours bf16)",
              "detector bf16: transformers eager", "detector bf16: ours", None)
    if "detector fp32: ours" in outputs and "detector fp32: transformers eager" in outputs:
        report.add("bench", "detector outputs fp32, ours vs transformers",
                   peers.detector_difference(outputs["detector fp32: ours"],
                                             outputs["detector fp32: transformers eager"],
                                             ctx.n_tokens()))
    for name in precisions:
        ratio_row(f"SAM embedding {name} (set_image / ours)",
                  f"SAM embedding {name}: SamPredictor.set_image", f"SAM embedding {name}: ours",
                  None)
        ratio_row(f"mask decoding {BOXES} boxes {name} (predict_torch / ours)",
                  f"mask decoding {BOXES} boxes {name}: SamPredictor.predict_torch",
                  f"mask decoding {BOXES} boxes {name}: ours", None)
    for label in fast:
        ratio_row(f"SAM embedding bf16 (plain / {label})", "SAM embedding bf16: ours",
                  f"SAM embedding bf16: {label}", None)
    models = "tiny detector + tiny SAM" if ctx.args.tiny else f"SwinT + {ctx.args.sam_variant}"
    names = [f"text -> masks {name}: ours" for name in precisions]
    names += [f"text -> masks bf16 + {label}: ours" for label in fast]
    for name in names:
        check = f"{name.removesuffix(': ours')} ({models}, {BOXES} boxes)"
        if ms(name) is None:
            report.skip("bench", check, "the stage failed (above)")
            continue
        peak = by_name[name].peak_bytes
        report.check("bench", check, f"{ms(name):.1f} ms, {by_name[name].note}"
                     + (f", GPU peak {peak / 1e9:.2f} GB" if ctx.cuda else ""),
                     f"<= {TEXT_TO_MASKS_MS:g} ms", ms(name) <= TEXT_TO_MASKS_MS)
    if not fast:
        report.add("bench", "text -> masks with accelerate_sam", fast_note)
    for name in ("fp32", "bf16"):
        ratio_row(f"text -> masks {name} (transformers + SamPredictor / ours)",
                  f"text -> masks {name}: transformers + SamPredictor",
                  f"text -> masks {name}: ours", None)
        stage = f"app request {name} (run + drawing + COCO JSON)"
        if ms(stage) is not None:
            report.add("bench", stage, f"{ms(stage):.1f} ms")


SECTION_FUNCTIONS = {"env": section_env, "parity": section_parity, "autocast": section_autocast,
                     "sync": section_sync, "sdpa": section_sdpa, "deform": section_deform,
                     "bench": section_bench}


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda (default), or cpu to check this script (with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random detector and SAM, 256x384 image: checks the script")
    parser.add_argument("--sam-variant", default="vit_h", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--runs", type=int, default=10,
                        help="timed rounds after one warm-up (fewer when the budget runs out)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="image height and width (default 800 1200; 256 384 with --tiny)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="which sections to run (env always runs)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds for all sections together, model building not counted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="write every row, raw time and difference here")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.sections = [name for name in SECTIONS if name == "env" or name in args.sections]
    return args


def main() -> int:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch sees no CUDA device "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on the GPU "
              "machine, or check the script here with --tiny --device cpu.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    report = Report(cuda=device.type == "cuda", json_path=args.json)
    report.data["args"] = {key: str(value) for key, value in vars(args).items()}
    try:
        ctx = build_context(args, device, report)
    except Exception as error:  # noqa: BLE001
        report.fail("build", "models", error)
        ctx = None
    if ctx is not None:
        machine = (torch.cuda.get_device_name(device) if ctx.cuda
                   else f"{platform.machine()}, {torch.get_num_threads()} threads")
        report.header = (
            f"gpu_check: {'tiny' if args.tiny else 'SwinT-OGC'} Grounding DINO + SAM "
            f"{'tiny' if args.tiny else args.sam_variant}, random weights, "
            f"{ctx.image.shape[0]}x{ctx.image.shape[1]} image, {device} ({machine}), "
            f"torch {torch.__version__}, {args.runs} runs")
        print(report.header, flush=True)
        remaining = args.budget
        for index, name in enumerate(args.sections):
            shares = sum(SHARES[later] for later in args.sections[index:])
            budget = remaining * SHARES[name] / shares
            start = time.perf_counter()
            print(f"\n== {name} (budget {budget:.0f} s)", flush=True)
            try:
                SECTION_FUNCTIONS[name](ctx, report, start + budget)
            except Exception as error:  # noqa: BLE001
                report.fail(name, "section", error)
            elapsed = time.perf_counter() - start
            remaining = max(0.0, remaining - elapsed)
            report.data.setdefault("section_seconds", {})[name] = elapsed
            if ctx.cuda:
                torch.cuda.empty_cache()
            report.write_json()
    print(f"\n{report.header}\n\n{report.table()}")
    report.write_json()
    if args.json:
        print(f"\nwrote {args.json}")
    counts = Counter(row.verdict for row in report.rows)
    print(", ".join(f"{counts[v]} {v}" for v in ("PASS", "FAIL", "INFO", "SKIP")))
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
