"""SAM's attention windows as per-head token matrices, and back (P7 Speed).

segment_anything's `Block` pads the (B, H, W, dim) grid with zeros to whole windows
(`window_partition`), runs `Attention` on each window (its `qkv` Linear over every token, padding
included) and crops the padding off again (`window_unpartition`). A padding token is a zero vector
after the first LayerNorm, so its qkv is `qkv(0)` (the bias), and only its key and value matter:
its query's output is cropped.

`split_windows` projects the real tokens only (64 x 64 = 4096 of the 70 x 70 = 4900 that SAM's
14-token windows pad to at its 1024 input), a few grid rows at a time, and copies each result
straight into q, k and v laid out as the (window, head) matrices the attention multiplies, the
padding positions set to `qkv(0)`. `merge_windows` writes the per-head outputs back into the
(B, H, W, dim) grid in one copy, without the padding, so `proj` also runs on real tokens only. A
global-attention block is one window covering the grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

# Grid rows per qkv projection in `split_windows`: 16 x 64 tokens of ViT-B give a 9.4 MB result.
STEP_ROWS = 16


@dataclass(frozen=True)
class WindowLayout:
    """How a (batch, height, width) grid splits into windows of (window_height, window_width)."""

    batch: int
    height: int
    width: int
    heads: int
    window_height: int
    window_width: int

    @property
    def rows(self) -> int:
        """Windows down the padded grid."""
        return -(-self.height // self.window_height)

    @property
    def columns(self) -> int:
        """Windows across the padded grid."""
        return -(-self.width // self.window_width)

    @property
    def matrices(self) -> int:
        """(window, head) pairs: the attention's batch."""
        return self.batch * self.rows * self.columns * self.heads


def window_layout(batch: int, height: int, width: int, heads: int, window: int) -> WindowLayout:
    """The layout of segment_anything's `Block`: windows of `window` tokens, or one window over the
    whole grid when `window` is 0 (a global-attention block)."""
    if window <= 0:
        return WindowLayout(batch, height, width, heads, height, width)
    return WindowLayout(batch, height, width, heads, window, window)


def _spans(size: int, window: int) -> list[tuple[slice, slice, int]]:
    """(grid slice, window slice, tokens per window) for the full windows along one axis and the
    last, partly filled one."""
    full, rest = divmod(size, window)
    spans = []
    if full:
        spans.append((slice(0, full * window), slice(0, full), window))
    if rest:
        spans.append((slice(full * window, size), slice(full, full + 1), rest))
    return spans


def split_windows(
    x: Tensor,
    project: Callable[[Tensor], Tensor],
    padding: Tensor,
    layout: WindowLayout,
    *,
    step_rows: int = STEP_ROWS,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v per (window, head) of the real tokens' projections, padding set to `padding`.

    The projection runs on at most `step_rows` grid rows at a time (never across a window row),
    each result copied straight into the three outputs: no projection of the whole grid (38 MB
    for ViT-B) is ever allocated, and each output is a third of the (3, ...) buffer it would
    otherwise be, small enough for the allocator to reuse memory instead of mapping fresh pages.

    Args:
        x: (B, H, W, dim) tokens.
        project: maps (B, r, W, dim) tokens to their (B, r, W, 3 * dim) qkv, channels ordered
            (q/k/v, head, channel) as segment_anything's `Attention` reads them (norm1 + qkv).
        padding: (3 * dim,) the qkv of a padding token: `qkv(0)`.
        layout: the windows (`window_layout`).
        step_rows: grid rows per projection call.

    Returns:
        q, k, v: each (matrices, window_height * window_width, channels) contiguous; matrix
        index ((b * rows + row) * columns + column) * heads + head, tokens row-major in the
        window, as `window_partition` followed by `Attention`'s head split.
    """
    lay = layout
    channels = padding.shape[0] // (3 * lay.heads)
    shape = (lay.batch, lay.rows, lay.columns, lay.heads, lay.window_height, lay.window_width)
    outputs = [x.new_empty(*shape, channels) for _ in range(3)]
    # each as (B, heads, rows, window_height, columns, window_width, C)
    grids = [output.permute(0, 3, 1, 4, 2, 5, 6) for output in outputs]
    for row in range(lay.rows):
        first, end = row * lay.window_height, min((row + 1) * lay.window_height, lay.height)
        for top in range(first, end, step_rows):
            bottom = min(top + step_rows, end)
            qkv = project(x[:, top:bottom])  # (B, r, W, 3 * dim)
            # -> (3, B, heads, r, W, C)
            source = qkv.view(lay.batch, bottom - top, lay.width, 3, lay.heads, channels)
            source = source.permute(3, 0, 4, 1, 2, 5)
            for part, grid in zip(source, grids, strict=True):
                target = grid[:, :, row, top - first : bottom - first]  # (B, heads, r, cols, w, C)
                for grid_w, windows_w, tokens_w in _spans(lay.width, lay.window_width):
                    # (B, heads, r, n_w * tokens_w, C) -> (B, heads, r, n_w, tokens_w, C)
                    piece = part[:, :, :, grid_w].unflatten(3, (-1, tokens_w))
                    target[:, :, :, windows_w, :tokens_w].copy_(piece)
    pad_h = lay.rows * lay.window_height - lay.height
    pad_w = lay.columns * lay.window_width - lay.width
    for output, fill in zip(outputs, padding.view(3, 1, 1, lay.heads, 1, 1, channels), strict=True):
        if pad_h:  # the bottom rows of the last window row: (B, columns, heads, pad_h, w, C)
            output[:, -1, :, :, lay.window_height - pad_h :] = fill
        if pad_w:  # the right columns of the last window column: (B, rows, heads, h, pad_w, C)
            output[:, :, -1, :, :, lay.window_width - pad_w :] = fill
    tokens = lay.window_height * lay.window_width
    q, k, v = (output.view(lay.matrices, tokens, channels) for output in outputs)
    return q, k, v


def merge_windows(windows: Tensor, layout: WindowLayout) -> Tensor:
    """The inverse of `split_windows` for one of q/k/v (the attention output), padding dropped.

    Args:
        windows: (matrices, window_height * window_width, channels).
        layout: the windows it was split with.

    Returns:
        (B, H, W, heads * channels) contiguous, channels ordered (head, channel) as
        `Attention`'s output before `proj`.
    """
    lay = layout
    channels = windows.shape[-1]
    shape = (lay.batch, lay.rows, lay.columns, lay.heads, lay.window_height, lay.window_width, -1)
    # -> (B, rows, window_height, columns, window_width, heads, C)
    source = windows.view(shape).permute(0, 1, 4, 2, 5, 3, 6)
    out = windows.new_empty(lay.batch, lay.height, lay.width, lay.heads, channels)
    for grid_h, windows_h, tokens_h in _spans(lay.height, lay.window_height):
        for grid_w, windows_w, tokens_w in _spans(lay.width, lay.window_width):
            piece = source[:, windows_h, :tokens_h, windows_w, :tokens_w]
            out[:, grid_h, grid_w] = piece.flatten(1, 2).flatten(2, 3)
    return out.view(lay.batch, lay.height, lay.width, lay.heads * channels)


__all__ = ["STEP_ROWS", "WindowLayout", "merge_windows", "split_windows", "window_layout"]
