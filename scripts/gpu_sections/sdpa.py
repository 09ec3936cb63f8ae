"""The sdpa section: which scaled_dot_product_attention kernels run on SAM's global-attention
shape, and `accelerate_sam` against plain segment_anything (outputs, kernels, embedding time)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from gpu_sections.compare import mask_ious, relative_difference, sam_outputs
from gpu_sections.context import (
    AUTOCAST_MASK_IOU,
    PARITY_EMBED_RTOL,
    PARITY_MASK_IOU,
    Context,
    median_ms,
    precision,
)
from gpu_sections.report import Report, guarded
from segmentation.sam import BoxSegmenter


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
    fast = ctx.fast_sams()
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
