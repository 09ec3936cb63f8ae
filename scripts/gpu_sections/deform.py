"""The deform section: the grid_sample and gathered multi-scale deformable attentions alone on
random inputs, their output difference and times, and which one the dispatch picks."""

from __future__ import annotations

import torch

from gpu_sections.context import Context, median_ms, precision
from gpu_sections.report import Report, guarded

DEFORM_ATOL = 1e-4  # fp32 outputs of the two deformable attentions (about 1e-5 on a CPU)
# Deformable attention inputs: SwinT's four levels for an 800 x 1200 image (strides 8 to 64),
# heads, head width, points, decoder queries; with --tiny much smaller levels and queries.
DEFORM_SHAPES = [(100, 150), (50, 75), (25, 38), (13, 19)]
DEFORM_TINY_SHAPES = [(16, 24), (8, 12), (4, 6), (2, 3)]
DEFORM_HEADS, DEFORM_HEAD_DIM, DEFORM_POINTS = 8, 32, 4
DEFORM_QUERIES, DEFORM_TINY_QUERIES = 900, 100


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
