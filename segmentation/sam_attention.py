"""SAM's image-encoder attention through `F.scaled_dot_product_attention` (P7 Speed, item 2).

segment_anything's `Attention` (`modeling/image_encoder.py`, adapted from ViTDet) computes
`softmax(q k^T * scale + rel_pos) v` with MViTv2's decomposed relative positions (arXiv 2112.09747,
§3.1: `rel_pos[(qh, qw), (kh, kw)] = q . Rh[qh, kh] + q . Rw[qw, kw]`) as separate eager ops. In a
global-attention block (64 x 64 = 4096 tokens at SAM's 1024 input) every one of them is a
(B * heads, 4096, 4096) tensor: the scores, `scores + rel_h`, `... + rel_w` and the softmax, three
of them alive at once (2.4 GB in fp32 for ViT-B's 12 heads).

`FastAttention.forward` computes the same thing with SDPA. The relative-position terms are its
additive float `attn_mask`: the small factors rel_h (B, heads, H, W, H) and rel_w (B, heads, H, W,
W) are built as in `add_decomposed_rel_pos` and broadcast into the mask for a block of query rows
at a time (`bias_elements` per call, into one reused buffer), so no (HW x HW) tensor over all heads
exists. The scores and softmax never leave the fused kernel (CPU: PyTorch's flash-attention
kernel, which takes a float mask; on CUDA a float mask rules out the flash backend, so SDPA picks
the memory-efficient or cuDNN one).

The Linear layers (qkv, proj and the MLPs' `lin1` + GELU, `lin2`) run as single oneDNN calls on the
CPU (`grounding.fused_linear`: no bias copy, the GELU as a post-op).

This SDPA path serves autograd, GPUs, autocast and `torch.compile`. CPU float32 inference takes
`segmentation.sam_block.FastBlock` instead: explicit products per block of queries, with the
relative positions added to scores still in cache rather than written out as a mask.

`accelerate_sam(sam)` re-classes every `Attention`, `MLPBlock` and `Block` of `sam.image_encoder`
in place: the same module objects, parameters, state-dict keys and submodules, so checkpoints load
the same and `SamPredictor` / `segmentation.sam.BoxSegmenter` work unchanged.
`segmentation.sam.build_sam` and `segmentation.small_sam.load_small_sam` apply it to every SAM they
load. SAM ViT-B's whole image encoder on 2 CPU threads: 11.1 s -> 7.0 s with SDPA, 6.4 s with the
fused Linear layers too, 5.4-5.9 s with `FastBlock` (`scripts/benchmark_peers.py`, README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention, Block
from torch import Tensor

from grounding.fused_linear import fused_linear, is_exact_gelu
from segmentation.sam_block import FastBlock
from segmentation.sam_rel_pos import decomposed_rel_pos, rel_pos_tables

# Mask elements per SDPA call on the CPU, 64 MiB in fp32: 4 to 8 image rows of queries per call in
# SAM's 64 x 64 global blocks (8 to 16 heads), one call for its windowed blocks. On one core, 4 to
# 16 rows per call were equally fast; 1 row up to 1.25x slower (bf16), and the whole mask in one
# call up to 1.4x slower and 0.3 to 0.9 GB more (scripts/benchmark_sam_attention.py). Other
# devices get one call per attention: a GPU kernel needs many query blocks per call to fill its
# SMs, and the whole mask fits (ViT-H: 16 x 4096^2 bf16 = 0.5 GiB); not measured, no GPU here.
DEFAULT_BIAS_ELEMENTS = 2**24


class FastAttention(Attention):
    """segment_anything's `Attention` with its forward through SDPA; same parameters and keys.

    Built by `accelerate_sam` (re-classing an `Attention`) or directly with `Attention`'s
    constructor arguments. `bias_elements` bounds the additive mask per SDPA call (see the module
    docstring); it changes memory and speed, never the result beyond float rounding.
    """

    bias_elements: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, dim) tokens -> (B, H, W, dim), as `Attention.forward`."""
        batch, height, width, _ = x.shape
        # (B, H*W, 3, heads, C) -> (3, B, heads, H*W, C); SDPA wants 4-D (a 3-D input takes its
        # unfused math path on the CPU).
        qkv = fused_linear(x, self.qkv).reshape(batch, height * width, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rel_pos:
            out = rel_pos_attention(
                q,
                k,
                v,
                self.rel_pos_h,
                self.rel_pos_w,
                (height, width),
                scale=self.scale,
                bias_elements=self.bias_elements,
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        # (B, heads, H*W, C) -> (B, H, W, heads, C) -> (B, H, W, heads * C)
        out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return fused_linear(out.reshape(batch, height, width, -1), self.proj)


class FastMLPBlock(MLPBlock):
    """segment_anything's `MLPBlock` with each Linear (and the exact GELU after the first) as one
    oneDNN call on the CPU (`grounding.fused_linear`); same parameters and keys."""

    def forward(self, x: Tensor) -> Tensor:
        if not is_exact_gelu(self.act):
            return super().forward(x)
        return fused_linear(fused_linear(x, self.lin1, "gelu"), self.lin2)


def rel_pos_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    size: tuple[int, int],
    *,
    scale: float,
    bias_elements: int | None = None,
) -> Tensor:
    """`softmax(q k^T * scale + rel_pos) v` through SDPA, the mask built per block of query rows.

    Args:
        q, k, v: (B, heads, H * W, C) in row-major (h, w) token order.
        rel_pos_h, rel_pos_w: the (L, C) tables (`segmentation.sam_rel_pos.rel_pos_tables`).
        size: (H, W).
        scale: the factor on q k^T (not on the relative-position terms, as in segment_anything).
        bias_elements: at most this many mask elements per SDPA call, but at least one image row
            of queries per call; 0 or less for one call (the whole (B, heads, HW, HW) mask);
            None for `DEFAULT_BIAS_ELEMENTS` on the CPU and one call elsewhere.

    Returns:
        (B, heads, H * W, C), in q's dtype.
    """
    batch, heads, tokens, _ = q.shape
    height, width = size
    if bias_elements is None:
        bias_elements = DEFAULT_BIAS_ELEMENTS if q.device.type == "cpu" else 0
    rel_h, rel_w = decomposed_rel_pos(q, rel_pos_tables(rel_pos_h, rel_pos_w, size))
    # The mask must have q's dtype (autocast may give the einsums another). einsum returns permuted
    # strides, and the broadcast sum below would inherit them and cost a copy in `flatten`.
    rel_h, rel_w = rel_h.to(q.dtype).contiguous(), rel_w.to(q.dtype).contiguous()
    per_row = batch * heads * width * tokens  # mask elements for one image row of queries
    rows = height if bias_elements <= 0 else max(1, min(height, bias_elements // per_row))
    # Without autograd every block's mask is written into one buffer: a fresh allocation per block
    # costs page faults (~20 % of the call on the CPU); `out=` does not support autograd.
    reuse = rows < height and not (rel_h.requires_grad or rel_w.requires_grad)
    storage = q.new_empty(rows * per_row) if reuse else None
    chunks = []
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        # (B, heads, r, W, H, 1) + (B, heads, r, W, 1, W) -> (B, heads, r, W, H, W)
        terms = rel_h[:, :, top:bottom, :, :, None], rel_w[:, :, top:bottom, :, None, :]
        if storage is None:
            bias = torch.add(*terms)
        else:
            shape = (batch, heads, bottom - top, width, height, width)
            bias = torch.add(*terms, out=storage[: (bottom - top) * per_row].view(shape))
        bias = bias.flatten(4).flatten(2, 3)  # (B, heads, r * W, H * W)
        queries = q[:, :, top * width : bottom * width]  # (B, heads, r * W, C)
        chunks.append(F.scaled_dot_product_attention(queries, k, v, attn_mask=bias, scale=scale))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


def accelerate_sam(sam: Sam, *, bias_elements: int | None = None) -> Sam:
    """Route every attention of `sam.image_encoder` through SDPA and its MLPs' Linear layers
    through `fused_linear`, and its blocks' CPU inference through `FastBlock`, in place; returns
    `sam`.

    The `Attention`, `MLPBlock` and `Block` modules are re-classed to `FastAttention`,
    `FastMLPBlock` and `segmentation.sam_block.FastBlock` (subclasses adding only `forward`), so
    the module tree, the parameter objects and the state-dict keys stay exactly as they were.
    Idempotent; a second call only updates `bias_elements`.

    Args:
        sam: a segment_anything `Sam` (or anything with an `image_encoder` of `Attention`s).
        bias_elements: see `rel_pos_attention`.
    """
    count = 0
    for module in sam.image_encoder.modules():
        if isinstance(module, Attention):
            module.__class__ = FastAttention
            module.bias_elements = bias_elements
            count += 1
        elif type(module) is MLPBlock:
            module.__class__ = FastMLPBlock
        elif type(module) is Block:
            module.__class__ = FastBlock
    if not count:
        raise ValueError("sam.image_encoder has no segment_anything Attention module")
    return sam


def restore_sam(sam: Sam) -> Sam:
    """Undo `accelerate_sam`: the fast modules of `sam.image_encoder` become segment_anything's."""
    for module in sam.image_encoder.modules():
        if isinstance(module, FastAttention):
            module.__class__ = Attention
            module.__dict__.pop("bias_elements", None)
        elif isinstance(module, FastMLPBlock):
            module.__class__ = MLPBlock
        elif isinstance(module, FastBlock):
            module.__class__ = Block
    return sam


__all__ = [
    "DEFAULT_BIAS_ELEMENTS",
    "FastAttention",
    "FastMLPBlock",
    "accelerate_sam",
    "rel_pos_attention",
    "restore_sam",
]
