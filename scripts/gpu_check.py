"""Every GPU check of issue "P7 Speed" (item 4) in one run, ending in one table.

Sections (`--sections`, default all; each is guarded: a failure is a FAIL row with the error and
the run goes on; each has a share of `--budget` seconds, so the run stays within it):

- env: torch / CUDA / cuDNN versions, the GPU, its memory, TF32 and SDPA switches.
- parity: our detector (`Detector.detect`) and SAM (`BoxSegmenter.embed` + `segment`, 5 boxes;
  SAM as `build_sam` returns it, `accelerate_sam`: the CPU blocks there, SDPA on CUDA) in fp32
  on the CPU vs the same weights on CUDA, TF32 off (targets: boxes 1e-3, logits 1e-3
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
  encode_image + ground, SAM's image encoder as `build_sam` returns it (`accelerate_sam`), SAM
  prompt encoder + mask decoder, inputs already on the GPU: target 0 synchronisations; the mode's
  own one-time notice is not counted), segment_anything's own image encoder (reported: its
  `get_rel_pos` indexes with a CPU `arange`, 2 syncs a block) and the wrappers (`detect`,
  `infer`, `embed`, `segment`, a first `GroundedSAM.run`: counted, the first call sites listed).
- sdpa: which scaled_dot_product_attention kernels (flash, memory-efficient, cuDNN, math) run on
  SAM's global-attention shape, fp32 and bf16, with and without a float bias (SAM's relative
  positions); and `accelerate_sam(sam)` (SAM's ViT attention through SDPA; also with the whole
  mask in one call per block) against plain segment_anything: outputs, kernels used (profiler),
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
  (eager, fp32 and bf16 autocast), SAM embedding `BoxSegmenter.embed` (ours: SAM as `build_sam`
  returns it) vs `SamPredictor.set_image` (segment_anything's own SAM), 5-box mask decoding vs
  `predict_torch`, "text -> masks" (a first `GroundedSAM.run` on an uncached image, box
  threshold 0, max_detections=5: SwinT + --sam-variant) in fp32, TF32, bf16 autocast (and fp32
  and bf16 with accelerate_sam's whole mask in one SDPA call per block) vs the same chain from
  transformers + SamPredictor, and the app's request (run + drawing + COCO JSON). Targets:
  text -> masks <= 30 ms; detector >= 5x transformers eager fp32. Precisions: "fp32" is TF32
  off for matmuls and convolutions alike, "TF32" on for both (PyTorch's default lies between:
  TF32 convolutions, fp32 matmuls), "bf16" / "fp16" autocast.

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

The device tool's machine lacks some of the packages (segment_anything, supervision, ...):
`python scripts/gpu_wheels.py` downloads them here as wheels into .whl/ and prints the one
command that installs them there, runs this script with --budget 360 and then tests/test_gpu.py
(`run` with carry [".whl"], timeout_s 600).

Paste into the README (or notes) the header line and the final Markdown table, with the command
line; the JSON keeps every raw time. Check of this script on a CPU (tiny models, under a minute):

    OMP_NUM_THREADS=1 python scripts/gpu_check.py --tiny --device cpu --runs 2
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpu_sections.autocast import section_autocast  # noqa: E402
from gpu_sections.bench import section_bench  # noqa: E402
from gpu_sections.context import build_context  # noqa: E402
from gpu_sections.deform import section_deform  # noqa: E402
from gpu_sections.env import section_env  # noqa: E402
from gpu_sections.parity import section_parity  # noqa: E402
from gpu_sections.report import Report  # noqa: E402
from gpu_sections.sdpa import section_sdpa  # noqa: E402
from gpu_sections.sync import section_sync  # noqa: E402

SECTIONS = ("env", "parity", "autocast", "sync", "sdpa", "deform", "bench")
# Shares of --budget; a section's unused time goes to the ones after it.
SHARES = {"env": 0.02, "parity": 0.2, "autocast": 0.12, "sync": 0.06, "sdpa": 0.15, "deform": 0.03,
          "bench": 0.42}


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
