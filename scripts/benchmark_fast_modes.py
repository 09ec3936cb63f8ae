"""fp32 against `--quantize int8` and `--compile` on full-size models, printed as a table.

    OMP_NUM_THREADS=1 python scripts/benchmark_fast_modes.py --model sam --threads 1
    OMP_NUM_THREADS=1 python scripts/benchmark_fast_modes.py --model detector --threads 1

Random weights (no downloads; the speed does not depend on them, the int8 error somewhat does:
trained weights have other ranges), the modes of `segmentation.fast_modes`:

- `--model sam`: SAM ViT-B's image encoder (as `build_sam` returns it, `accelerate_sam`
  applied) on one 1024 x 1024 input (the part that runs once per
  image; the mask decoder is small). Modes fp32, int8, compile, int8 + compile. Delta: the image
  embedding (1, 256, 64, 64) against fp32's.
- `--model detector`: Grounding DINO SwinT-OGC at `--size` (800 x 1200: an 800 x 1200 photo after
  the reference resize) with "a cat . a remote control .". Modes fp32, int8 (`--compile` leaves
  the detector eager). Deltas: the image tokens after Swin and the projections, and, for the
  queries that both runs selected from the same image token, their boxes (cx, cy, w, h,
  normalised) and logits (random weights give logits of several units, so token probabilities,
  mostly near 0 or 1, would exaggerate the change); "same queries" is the share of selected
  tokens the two runs have in common (top-k selection turns tiny differences into other queries).

Columns: the wall seconds of the first call (with compilation, for compile), then the median
wall and CPU seconds (this process's) of `--runs` more calls: with one thread, the CPU seconds
are the compute time even when other jobs hold the cores (the wall seconds then are not); the
deltas are max |int8 - fp32| (and the relative L2 norm for tensors).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from segmentation.fast_modes import INT8_PARTS, compile_models, quantize_int8  # noqa: E402
from segmentation.sam_attention import accelerate_sam  # noqa: E402

TIME_COLUMNS = ("first call s", "then s", "then CPU s")


def relative(delta: torch.Tensor, reference: torch.Tensor) -> str:
    """ "max |d| (relative L2)"."""
    ratio = float(delta.norm() / reference.norm())
    return f"{float(delta.abs().max()):.4f} ({ratio:.2%})"


def time_calls(fn: Callable[[], object], runs: int) -> tuple[object, list[str]]:
    """(first result, [wall seconds of the first call, median wall and CPU seconds of `runs`
    more calls], formatted)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    medians = [statistics.median(values) if values else float("nan") for values in (wall, cpu)]
    timings = [f"{seconds:.2f}" for seconds in (first, *medians)]
    print(f"  first {timings[0]} s, then {timings[1]} s, CPU {timings[2]} s", file=sys.stderr)
    return result, timings


def benchmark_sam(modes: list[str], runs: int) -> list[tuple[str, ...]]:
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    # as build_sam returns it: SDPA attention, fused Linear layers
    sam = accelerate_sam(sam_model_registry["vit_b"](checkpoint=None).eval())
    pixels = torch.randn(1, 3, 1024, 1024)
    rows, reference = [], None
    for mode in modes:
        print(f"{mode}:", file=sys.stderr, flush=True)
        model = sam if mode == "fp32" else copy.deepcopy(sam)
        if "int8" in mode:
            for name in INT8_PARTS["sam"]:
                quantize_int8(getattr(model, name))
        if "compile" in mode and not compile_models(model):
            rows.append((mode, "-", "-", "-", "no compiler"))
            continue
        with torch.inference_mode():
            embedding, timings = time_calls(lambda m=model: m.image_encoder(pixels), runs)
        assert isinstance(embedding, torch.Tensor)
        if reference is None:
            reference = embedding
        delta = "-" if mode == "fp32" else relative(embedding - reference, reference)
        rows.append((mode, *timings, delta))
    return rows


def benchmark_detector(size: tuple[int, int], runs: int) -> list[tuple[str, ...]]:
    from grounding.config import PRESETS
    from grounding.model import build_model
    from grounding.text_masks import BERT_SPECIAL_TOKEN_IDS, sub_sentence_masks

    torch.manual_seed(0)
    model = build_model(PRESETS["swint_ogc"]()).eval()
    pixels = torch.randn(1, 3, *size)
    # "a cat . a remote control ." in bert-base-uncased ids
    input_ids = torch.tensor([[101, 1037, 4937, 1012, 1037, 6556, 2491, 1012, 102]])
    token_mask = torch.ones_like(input_ids, dtype=torch.bool)
    masks = sub_sentence_masks(input_ids, token_mask, BERT_SPECIAL_TOKEN_IDS)

    def forward(net):
        features = net.encode_image(pixels)
        output = net.ground(features, input_ids, token_mask, text_masks=masks)
        return features.tokens, output

    rows, reference = [], None
    for mode in ("fp32", "int8"):
        print(f"{mode}:", file=sys.stderr, flush=True)
        net = model if mode == "fp32" else copy.deepcopy(model)
        if mode == "int8":
            for name in INT8_PARTS["detector"]:
                quantize_int8(getattr(net, name))
        with torch.inference_mode():
            (tokens, output), timings = time_calls(lambda n=net: forward(n), runs)
        if reference is None:
            reference = (tokens, output)
            rows.append((mode, *timings, "-", "-", "-", "-"))
        else:
            ref_tokens, ref_output = reference
            ref_index = {int(i): q for q, i in enumerate(ref_output.query_indices[0])}
            pairs = [
                (ref_index[int(i)], q)
                for q, i in enumerate(output.query_indices[0])
                if int(i) in ref_index
            ]
            a, b = (torch.tensor(side) for side in zip(*pairs, strict=True))
            finite = torch.isfinite(ref_output.logits[0, a])
            ref_logits = ref_output.logits[0, a][finite]
            logits = output.logits[0, b][finite] - ref_logits
            boxes = ref_output.boxes[0, a] - output.boxes[0, b]
            rows.append(
                (
                    mode,
                    *timings,
                    relative(tokens - ref_tokens, ref_tokens),
                    f"{len(pairs) / output.query_indices.shape[1]:.0%}",
                    f"{float(boxes.abs().max()):.4f}",
                    relative(logits, ref_logits),
                )
            )
    return rows


def markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("sam", "detector"), required=True)
    parser.add_argument("--size", default="800x1200", help="detector input HxW (800x1200)")
    parser.add_argument("--runs", type=int, default=1, help="timed calls after the first (1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    parser.add_argument(
        "--modes",
        default="fp32,int8,compile,int8+compile",
        help="for --model sam, comma-separated (default: all four)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"{args.model}, CPU ({torch.backends.cpu.get_cpu_capability()}), {args.threads} "
        f"thread(s), torch {torch.__version__}, random weights\n"
    )
    if args.model == "sam":
        modes = ["fp32", *(mode for mode in args.modes.split(",") if mode != "fp32")]
        header = ("mode", *TIME_COLUMNS, "embedding max |d| (rel. L2)")
        print(markdown(header, benchmark_sam(modes, args.runs)))
    else:
        height, width = (int(v) for v in args.size.split("x"))
        header = (
            "mode",
            *TIME_COLUMNS,
            "image tokens max |d| (rel. L2)",
            "same queries",
            "their boxes max |d|",
            "their logits max |d| (rel. L2)",
        )
        print(markdown(header, benchmark_detector((height, width), args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
