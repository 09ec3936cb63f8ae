"""SAM's image-encoder block for CPU inference: explicit attention over real tokens (P7 Speed).

segment_anything's `Block` (ViTDet, arXiv 2203.16527 §3; MViTv2's decomposed relative positions,
arXiv 2112.09747 §3.1) is norm1 -> window partition -> `Attention` (qkv, per-head
`softmax(q k^T * scale + rel_pos) v`, proj) -> unpartition -> residual -> norm2 -> MLP -> residual.
`FastBlock.forward` computes the same on a CPU in float32 without autograd, in another order:

- norm1 + qkv on the real tokens only, a few grid rows at a time, copied straight into the window
  layout (`segmentation.sam_windows`); proj after the unpartition, so also on real tokens only
  (padding is 16 % of a windowed block's tokens at SAM's 1024 input);
- the attention as explicit products per block of (window, head) matrices: the scores of a block
  of queries (at most `SCORE_ELEMENTS`, 4 MiB, so they stay in cache), the two relative-position
  terms added in place by broadcasting, softmax in place, times v into the queries' own rows. A
  windowed block's relative-position terms come per block from one small product with the
  offset tables (`segmentation.sam_rel_pos`, read through strided views: no gather), a global
  block's per head; its products go through oneDNN (`grounding.fused_linear.matmul_transposed`);
- norm2 + MLP + residual over `MLP_TOKENS` tokens at a time, the residual sums in place.

No temporary is larger than ~25 MB, so the allocator reuses memory instead of mapping (and
faulting in) fresh pages for every block: 430 k -> 116 k page faults per ViT-B forward.

This replaces SDPA on the CPU: PyTorch's CPU flash kernel takes the relative positions only as a
materialised float mask, whose writing and reading cost about as much as the softmax
(`segmentation.sam_attention` keeps that path for autograd, other devices, other dtypes and
`torch.compile`, where `FastBlock` defers to `Block.forward`). SAM ViT-B's image encoder on 2 CPU
threads: 5.9 s against 7.1 s with the SDPA blocks and 10.7 s in segment_anything, the forward
adding 249 MB to the process against 323 MB and 2.5 GB (scripts/benchmark_sam_attention.py
--cases vit_b_encoder; scripts/benchmark_peers.py, README); outputs within float rounding of
segment_anything's (tests/test_sam_block.py).
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Block
from torch import Tensor, nn

from grounding.fused_linear import fused_linear, matmul_transposed
from segmentation.sam_rel_pos import (
    decomposed_rel_pos,
    rel_pos_tables,
    relative_tables,
    relative_terms,
)
from segmentation.sam_windows import WindowLayout, merge_windows, split_windows, window_layout

# Score elements per product: 4 MiB of float32, in the 32 MiB L3 with room for q, k and v. A global
# block at SAM's 1024 input (4096 tokens) takes 4 image rows of queries per product, a windowed
# one 27 (window, head) matrices of 196 x 196.
SCORE_ELEMENTS = 2**20
# Tokens per MLP chunk (`mlp_residual`).
MLP_TOKENS = 2048


def fast_path_applies(x: Tensor) -> bool:
    """Whether `FastBlock` runs its own forward for input `x`: float32 on the CPU, no autograd,
    no autocast, not under `torch.compile`."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class FastBlock(Block):
    """segment_anything's `Block` with the CPU inference forward of the module docstring; same
    parameters, submodules and state-dict keys. Built by `accelerate_sam` (re-classing a `Block`).
    """

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, dim) -> (B, H, W, dim), as `Block.forward`."""
        attention = self.attn
        if not fast_path_applies(x):
            return super().forward(x)
        batch, height, width, dim = x.shape
        layout = window_layout(batch, height, width, attention.num_heads, self.window_size)
        padding = attention.qkv(x.new_zeros(1, dim))[0]  # a zero token's qkv: the bias
        q, k, v = split_windows(  # (matrices, tokens, C) each
            x, lambda tokens: fused_linear(self.norm1(tokens), attention.qkv), padding, layout
        )
        tables = (attention.rel_pos_h, attention.rel_pos_w) if attention.use_rel_pos else None
        out = window_attention(q, k, v, tables, layout, scale=attention.scale)
        # the residual sums in place on fresh outputs (a + b == b + a in floating point)
        x = fused_linear(merge_windows(out, layout), attention.proj).add_(x)
        return mlp_residual(x, self.norm2, self.mlp)


def mlp_residual(x: Tensor, norm: nn.Module, mlp: nn.Module) -> Tensor:
    """`x + mlp(norm(x))` over `MLP_TOKENS` tokens at a time: the hidden activations of a chunk
    (24 MiB for ViT-B) fit the 32 MiB L3 the second Linear reads them from, and no allocation is
    large enough to be a fresh mapping of its own (ViT-B's MLP: 0.19 -> 0.18 s on 2 threads).

    Args:
        x: (..., dim).

    Returns:
        (..., dim), new.
    """
    tokens = x.reshape(-1, x.shape[-1])  # (N, dim), a view
    out = torch.empty_like(tokens)
    for first in range(0, tokens.shape[0], MLP_TOKENS):
        chunk = tokens[first : first + MLP_TOKENS]
        torch.add(mlp(norm(chunk)), chunk, out=out[first : first + MLP_TOKENS])
    return out.view(x.shape)


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_pos: tuple[Tensor, Tensor] | None,
    layout: WindowLayout,
    *,
    scale: float,
    score_elements: int | None = None,
) -> Tensor:
    """`softmax(q k^T * scale + rel_pos) v` per (window, head) matrix, as segment_anything's
    `Attention` with `add_decomposed_rel_pos`.

    Args:
        q, k, v: (matrices, window_height * window_width, C) contiguous (`split_windows`); q
            unscaled. q is overwritten: it holds the output on return (each step's output
            rows replace the queries the step has used, so no output buffer is allocated).
        rel_pos: the block's (L, C) height and width relative-position tables (`rel_pos_h`,
            `rel_pos_w`), or None for attention without relative positions.
        layout: the windows.
        scale: the factor on q k^T (not on the relative-position terms).
        score_elements: at most this many scores per product (but at least one matrix row);
            None for `SCORE_ELEMENTS`.

    Returns:
        (matrices, window_height * window_width, C): q's storage.
    """
    score_elements = score_elements or SCORE_ELEMENTS
    tokens = q.shape[1]
    if tokens * tokens <= score_elements:  # windowed blocks: several whole matrices per product
        return _whole_matrices(q, k, v, rel_pos, layout, scale, score_elements // tokens**2)
    # global blocks: a block of query rows of one matrix per product
    rows = max(1, score_elements // (layout.window_width * tokens))
    return _query_rows(q, k, v, rel_pos, layout, scale, rows)


def _whole_matrices(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_pos: tuple[Tensor, Tensor] | None,
    layout: WindowLayout,
    scale: float,
    step: int,
) -> Tensor:
    """`window_attention` over `step` whole matrices per product; the relative-position terms
    of each step from one small product (`relative_terms`), still in cache when added."""
    height, width = layout.window_height, layout.window_width
    out = q  # each step's output rows replace the queries it has used
    tables = None if rel_pos is None else relative_tables(rel_pos, height, width)
    for first in range(0, q.shape[0], step):
        last = min(first + step, q.shape[0])
        queries = q[first:last]
        terms = None
        if tables is not None:  # from the unscaled queries
            terms = relative_terms(queries, tables, height, width)
        scores = torch.matmul(queries.mul_(scale), k[first:last].transpose(1, 2))
        if terms is not None:
            grid = scores.view(last - first, height, width, height, width)  # (m, qh, qw, kh, kw)
            grid.add_(terms[0]).add_(terms[1])
        probabilities = torch.softmax(scores, -1, out=scores)  # in place: exact, alias-safe
        torch.matmul(probabilities, v[first:last], out=out[first:last])
    return out


def _query_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_pos: tuple[Tensor, Tensor] | None,
    layout: WindowLayout,
    scale: float,
    rows: int,
) -> Tensor:
    """`window_attention` over `rows` image rows of queries of one matrix per product, through
    oneDNN (`matmul_transposed`); the matrix's relative-position terms and transposed values
    made just before its products, so they are still in cache (1 MiB each for ViT-B)."""
    height, width = layout.window_height, layout.window_width
    matrices = q.shape[0]
    tables = None if rel_pos is None else rel_pos_tables(*rel_pos, (height, width))
    out = q  # each step's output rows replace the queries it has used
    for matrix in range(matrices):
        values_t = v[matrix].t().contiguous()  # (C, tokens): oneDNN's weight layout
        rel_h = rel_w = None
        if tables is not None:  # one matrix's terms (1 MiB each for ViT-B), from unscaled q
            rel_h, rel_w = decomposed_rel_pos(q[matrix], tables)  # (qh, qw, kh), (qh, qw, kw)
        queries_all = q[matrix].mul_(scale)
        for top in range(0, height, rows):
            bottom = min(top + rows, height)
            queries = slice(top * width, bottom * width)
            scores = matmul_transposed(queries_all[queries], k[matrix])  # (r * W, tokens)
            if rel_h is not None and rel_w is not None:
                terms = scores.view(bottom - top, width, height, width)  # (r, qw, kh, kw)
                terms.add_(rel_h[top:bottom, :, :, None]).add_(rel_w[top:bottom, :, None, :])
            probabilities = torch.softmax(scores, -1, out=scores)
            out[matrix, queries] = matmul_transposed(probabilities, values_t)
    return out


__all__ = [
    "MLP_TOKENS",
    "SCORE_ELEMENTS",
    "FastBlock",
    "fast_path_applies",
    "mlp_residual",
    "window_attention",
]
