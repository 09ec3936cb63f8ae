"""SAM's decomposed relative positions (MViTv2, arXiv 2112.09747 §3.1), as its image encoder's
attention adds them: `rel_pos[(qh, qw), (kh, kw)] = q . Rh[qh - kh] + q . Rw[qw - kw]`, with the
unscaled queries and the (2 * size - 1, C) tables `rel_pos_h` / `rel_pos_w` (resized linearly
for other sizes, as segment_anything's `get_rel_pos`; `pair_table` is that function for queries
and keys on one grid, with its indices made on the table's device: segment_anything's come from
the CPU, a blocking host-to-device copy, one CUDA synchronisation per table and block).

Two forms of the same terms:

- `rel_pos_tables` + `decomposed_rel_pos`: the per-pair tables ((H, H, C) and (W, W, C), from
  `pair_table`) and one product per axis, as segment_anything's `add_decomposed_rel_pos` has them
  (the SDPA path of `segmentation.sam_attention`, a global block of `segmentation.sam_block`);
- `relative_tables` + `relative_terms`: the offset tables stacked, and one product of the queries
  with all offsets read back through strided views (a windowed block of `segmentation.sam_block`,
  where the per-pair products are too small to run well).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from grounding.fused_linear import matmul_transposed


def pair_table(size: int, table: Tensor) -> Tensor:
    """segment_anything's `get_rel_pos(size, size, table)`: the embedding of each offset between
    queries and keys on one axis of `size` tokens, indexed on the table's device.

    Args:
        size: tokens along the axis (queries and keys alike).
        table: (L, C) embeddings of offsets 1 - size ... size - 1; resized linearly (along L)
            to 2 * size - 1 rows when L differs.

    Returns:
        (size, size, C): `[q, k]` is the embedding of offset q - k.
    """
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None], size=length, mode="linear")[0].t()
    positions = torch.arange(size, device=table.device)
    return table[positions[:, None] - positions[None, :] + size - 1]


def rel_pos_tables(
    rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """The per-pair embeddings of queries and keys on the same (H, W) grid.

    Args:
        rel_pos_h: (Lh, C) height embeddings; resized to 2H - 1 rows as in segment_anything.
        rel_pos_w: (Lw, C) width embeddings.
        size: (H, W).

    Returns:
        (H, H, C) and (W, W, C): `[q, k]` is the embedding of offset q - k.
    """
    height, width = size
    return pair_table(height, rel_pos_h), pair_table(width, rel_pos_w)


def decomposed_rel_pos(q: Tensor, tables: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The factors of `add_decomposed_rel_pos` for queries and keys on the same (H, W) grid.

    Args:
        q: (..., H * W, C) unscaled queries.
        tables: `rel_pos_tables(...)` for the grid.

    Returns:
        rel_h (..., H, W, H) and rel_w (..., H, W, W): the score of query (qh, qw) gets
        `rel_h[..., qh, qw, kh] + rel_w[..., qh, qw, kw]` for key (kh, kw).
    """
    rh, rw = tables
    grid_q = q.unflatten(-2, (rh.shape[0], rw.shape[0]))  # (..., H, W, C)
    rel_h = torch.einsum("...hwc,hkc->...hwk", grid_q, rh)
    rel_w = torch.einsum("...hwc,wkc->...hwk", grid_q, rw)
    return rel_h, rel_w


def relative_tables(rel_pos: tuple[Tensor, Tensor], height: int, width: int) -> Tensor:
    """A block's height and width relative-position embeddings, stacked for `relative_terms`.

    Args:
        rel_pos: the (L, C) `rel_pos_h` and `rel_pos_w` tables (resized as `pair_table` does
            when L is not 2 * size - 1).
        height, width: the window's size in tokens.

    Returns:
        (2 * height - 1 + 2 * width - 1, C) contiguous: the height embeddings of offsets (query
        row - key row) height - 1, height - 2, ..., 1 - height, then the width ones likewise.
        Query row qh meets key row kh at row height - 1 - qh + kh: one stride per query row.
    """
    parts = []
    for size, table in zip((height, width), rel_pos, strict=True):
        per_pair = pair_table(size, table)  # (size, size, C): offset query - key
        # offsets size - 1 ... 0 (last query against each key), then -1 ... 1 - size
        parts += [per_pair[-1], per_pair[0, 1:]]
    return torch.cat(parts)


def relative_terms(
    queries: Tensor, tables: Tensor, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """segment_anything's decomposed relative-position terms of whole windows, as broadcastable
    views of one (tokens x offsets) product instead of a per-offset gather.

    Args:
        queries: (m, height * width, C) unscaled, contiguous.
        tables: `relative_tables(...)` of the block.
        height, width: the window's size in tokens.

    Returns:
        rel_h (m, qh, qw, kh, 1) and rel_w (m, qh, qw, 1, kw), views for adding to scores viewed as
        (m, qh, qw, kh, kw): `queries . Rh[qh - kh]` and `queries . Rw[qw - kw]`.
    """
    count, tokens, channels = queries.shape
    length = tables.shape[0]
    # (m * tokens, length), strides (tokens * length, width * length, length, 1) as (m, qh, qw, j)
    products = matmul_transposed(queries.reshape(count * tokens, channels), tables)
    start = products.storage_offset()
    per_matrix, per_row = tokens * length, width * length
    # height row j = height - 1 - qh + kh: one element less per query row
    rel_h = products.as_strided(
        (count, height, width, height, 1),
        (per_matrix, per_row - 1, length, 1, 0),
        start + height - 1,
    )
    # width row j = 2 * height - 1 + width - 1 - qw + kw: one element less per query column
    rel_w = products.as_strided(
        (count, height, width, 1, width),
        (per_matrix, per_row, length - 1, 0, 1),
        start + 2 * height - 1 + width - 1,
    )
    return rel_h, rel_w


__all__ = [
    "decomposed_rel_pos",
    "pair_table",
    "rel_pos_tables",
    "relative_tables",
    "relative_terms",
]
