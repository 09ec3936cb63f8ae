"""SAM image-encoder attention: segment_anything's eager `Attention` against `FastAttention` (SDPA)
and, for whole encoders, `FastBlock` (the CPU inference block).

Cases (random weights, rel-pos embeddings drawn from N(0, 1) so the bias matters, fp32):
- window: one `Attention(256, heads=8)` on the 25 windows of 14 x 14 tokens that a 64 x 64 grid
  (SAM's 1024 input) pads to, as in a windowed block.
- global: one `Attention(256, heads=8)` on 64 x 64 = 4096 tokens, as in a global block.
- encoder: `ImageEncoderViT` with embed 256, heads 8, depth 2 (block 0 windowed, block 1 global),
  on 1 x 3 x 1024 x 1024.
- vit_b_global (--vit-b): one `Attention(768, heads=12)` on 4096 tokens, ViT-B's global block.
- vit_b_encoder (--vit-b): SAM ViT-B's whole image encoder (`sam_model_registry["vit_b"]`), 12
  blocks, on 1 x 3 x 1024 x 1024.

Variants: `original` (segment_anything's forward), `sdpa` (`accelerate_sam` defaults: the
additive mask built per block of query rows, `DEFAULT_BIAS_ELEMENTS` elements per SDPA call),
`sdpa-1call` (`bias_elements=0`: the whole (B, heads, HW, HW) mask, one SDPA call), and one
`sdpa-<n>` per --bias-elements; for the encoder cases also `fastblock` (every `Block` re-classed
to `segmentation.sam_block.FastBlock`, as `accelerate_sam` does: its own explicit attention in
fp32 CPU inference, the `sdpa` path otherwise, e.g. under autocast). --bf16 adds every case under
CPU bf16 autocast.

Timing: one subprocess per case runs every variant once as a warm-up, then --runs rounds with
the variants interleaved (order reversed every other round), so a busy neighbour slows all of
them alike; median and best wall time, and CPU-seconds per wall-second (1.0 = one full core with
OMP_NUM_THREADS=1; less means the process waited for the CPU). Memory: one fresh subprocess per
(case, variant): its peak RSS (`getrusage`) during one forward minus its RSS just before (model
and input already built), i.e. what the forward itself adds. Last column: max |output -
original fp32 output| on the same input (also for the bf16 rows).

    export OMP_NUM_THREADS=1
    python scripts/benchmark_sam_attention.py  # ~3 min on one core
    # ~8 min; the original ViT-B global block adds 2.4 GB to its forward
    python scripts/benchmark_sam_attention.py --vit-b --bf16 --bias-elements 2097152
    # FastBlock against the SDPA blocks and segment_anything on the whole ViT-B encoder
    OMP_NUM_THREADS=2 python scripts/benchmark_sam_attention.py --cases vit_b_encoder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, Block
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segmentation.sam_attention import DEFAULT_BIAS_ELEMENTS, FastAttention  # noqa: E402
from segmentation.sam_block import FastBlock  # noqa: E402

CASES = ("window", "global", "encoder")
VIT_B_CASES = ("vit_b_global", "vit_b_encoder")
ENCODER_CASES = ("encoder", "vit_b_encoder")


def build_case(case: str) -> tuple[nn.Module, torch.Tensor]:
    """(module, input) for `case`, seeded."""
    torch.manual_seed(0)
    if case == "vit_b_encoder":
        module = sam_model_registry["vit_b"](checkpoint=None).image_encoder
        x = torch.randn(1, 3, 1024, 1024)
    elif case == "encoder":
        module = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=256, depth=2,
                                 num_heads=8, out_chans=256, use_rel_pos=True, window_size=14,
                                 global_attn_indexes=(1,))
        x = torch.randn(1, 3, 1024, 1024)
    else:
        dim, heads, side, windows = {"window": (256, 8, 14, 25), "global": (256, 8, 64, 1),
                                     "vit_b_global": (768, 12, 64, 1)}[case]
        module = Attention(dim, num_heads=heads, use_rel_pos=True, input_size=(side, side))
        x = torch.randn(windows, side, side, dim)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "rel_pos" in name:
                parameter.normal_()
    return module.eval(), x


def set_variant(module: nn.Module, variant: str) -> None:
    """Re-class every Attention (and Block) of `module` to the variant's forward."""
    for block in module.modules():
        if isinstance(block, Block):
            block.__class__ = FastBlock if variant == "fastblock" else Block
    for attention in module.modules():
        if isinstance(attention, Attention):
            if variant == "original":
                attention.__class__ = Attention
                continue
            attention.__class__ = FastAttention
            named = {"sdpa": None, "sdpa-1call": 0, "fastblock": None}
            attention.bias_elements = (named[variant] if variant in named
                                       else int(variant.removeprefix("sdpa-")))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def forward(module: nn.Module, x: torch.Tensor, dtype: str) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
        return module(x)


def memory_child(case: str, variant: str, dtype: str) -> dict:
    """Peak RSS added by one forward of `variant`, and its output's distance to the original."""
    module, x = build_case(case)
    set_variant(module, variant)
    before = rss_bytes()
    output = forward(module, x, dtype)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    set_variant(module, "original")
    reference = forward(module, x, "fp32")
    return {"peak_mb": max(peak, 0) / 2**20,
            "max_abs_diff": (output.float() - reference).abs().max().item(),
            "output_abs_max": reference.abs().max().item()}


def timing_child(case: str, variants: list[str], dtype: str, runs: int) -> dict:
    """Wall seconds and CPU-seconds per wall-second of every variant, rounds interleaved."""
    module, x = build_case(case)
    times: dict[str, list[tuple[float, float]]] = {variant: [] for variant in variants}
    for round_index in range(runs + 1):  # round 0 is the warm-up
        order = variants if round_index % 2 else variants[::-1]
        for variant in order:
            set_variant(module, variant)
            start, cpu_start = time.perf_counter(), time.process_time()
            forward(module, x, dtype)
            seconds = time.perf_counter() - start
            if round_index:
                times[variant].append((seconds, (time.process_time() - cpu_start) / seconds))
    return {variant: {"median_s": statistics.median(s for s, _ in pairs),
                      "best_s": min(s for s, _ in pairs),
                      "cpu_per_wall": statistics.median(c for _, c in pairs)}
            for variant, pairs in times.items()}


def run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict], say: Callable[[str], None] = print) -> None:
    say("| case | dtype | variant | median ms | best ms | vs original | cpu/wall | "
        "forward peak MB | max abs diff |")
    say("|---|---|---|---:|---:|---:|---:|---:|---:|")
    base = {(r["case"], r["dtype"]): r for r in rows if r["variant"] == "original"}
    for r in rows:
        ref = base.get((r["case"], r["dtype"]))
        ratio = f"{ref['median_s'] / r['median_s']:.2f}x" if ref else "-"
        say(f"| {r['case']} | {r['dtype']} | {r['variant']} | {r['median_s'] * 1e3:.1f} | "
            f"{r['best_s'] * 1e3:.1f} | {ratio} | {r['cpu_per_wall']:.2f} | "
            f"{r['peak_mb']:.0f} | {r['max_abs_diff']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed forwards per row")
    parser.add_argument("--vit-b", action="store_true",
                        help="add ViT-B's global block (2.4 GB) and whole encoder")
    parser.add_argument("--cases", nargs="+", choices=CASES + VIT_B_CASES,
                        help="only these cases (default: all, ViT-B ones with --vit-b)")
    parser.add_argument("--bf16", action="store_true", help="add every case under bf16 autocast")
    parser.add_argument("--bias-elements", type=int, nargs="*", default=[],
                        help="extra sdpa variants with these mask elements per SDPA call")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, case, dtype, *rest = args.child
        if kind == "memory":
            print(json.dumps(memory_child(case, rest[0], dtype)))
        else:
            print(json.dumps(timing_child(case, rest[1:], dtype, int(rest[0]))))
        return
    cases = args.cases or CASES + (VIT_B_CASES if args.vit_b else ())
    attention_variants = ["original", "sdpa", "sdpa-1call",
                          *(f"sdpa-{n}" for n in args.bias_elements)]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"torch threads {torch.get_num_threads()}, runs {args.runs}, "
          f"DEFAULT_BIAS_ELEMENTS={DEFAULT_BIAS_ELEMENTS}")
    rows = []
    for dtype in ("fp32", "bf16") if args.bf16 else ("fp32",):
        for case in cases:
            variants = attention_variants + (["fastblock"] if case in ENCODER_CASES else [])
            timings = run_child("timing", case, dtype, str(args.runs), *variants)
            for variant in variants:
                memory = run_child("memory", case, dtype, variant)
                rows.append({"case": case, "dtype": dtype, "variant": variant,
                             **timings[variant], **memory})
            print(f"  {case} {dtype}: done", file=sys.stderr, flush=True)
    table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
