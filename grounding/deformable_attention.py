"""Multi-scale deformable attention (Deformable DETR), in pure PyTorch.

Each query looks at `num_points` locations on each of `num_levels` feature maps, per head, around
its reference point; the sampled values (bilinear, zero outside the map) are averaged with
softmax weights predicted from the query. Two pure-PyTorch implementations, no compiled extension:

- `grid_sample_deformable_attention`: `F.grid_sample` per level, then the weighted sum; the
  reference's own pure-PyTorch path (`multi_scale_deformable_attn_pytorch`) and transformers'.
  Used on CUDA (not yet measured against the other there).
- `gathered_deformable_attention`: the bilinear corner weights times the attention weights,
  summed over one gather of all levels, points and corners by `F.embedding_bag` (one weighted
  bag of 4 * levels * points value rows per query and head). On the CPU it is about 4.5x faster
  than the grid_sample path for the encoder's 20k queries at 800 x 1200 (0.13 s vs 0.58 s per
  layer, 2 threads), because nothing (B * heads, head_dim, Q, levels * points) is materialised.

Both sample at `location * size - 0.5` with zeros outside the map, as the reference CUDA kernel;
they differ by float rounding only (grid_sample goes through `2 * location - 1` first).
`multi_scale_deformable_attention` picks the gather on the CPU and grid_sample elsewhere.

Parameter names and initialisation follow the reference `MSDeformAttn` (`sampling_offsets`,
`attention_weights`, `value_proj`, `output_proj`), so checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grounding.devices import host_tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (as the reference CUDA kernel), else unchanged."""
    return torch.promote_types(dtype, torch.float32)


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """`gathered_deformable_attention` on the CPU, `grid_sample_deformable_attention` elsewhere."""
    if value.device.type == "cpu":
        return gathered_deformable_attention(
            value, spatial_shapes, sampling_locations, attention_weights
        )
    return grid_sample_deformable_attention(
        value, spatial_shapes, sampling_locations, attention_weights
    )


def grid_sample_deformable_attention(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Weighted sum of bilinearly sampled values over levels and points, by `F.grid_sample`.

    Sampling runs in float32 for float16 / bfloat16 inputs (the reference CUDA kernel casts half
    inputs to float32 too); the result is returned in the dtype of `value`.

    Args:
        value: `(B, S, heads, head_dim)`, the flattened levels concatenated in order,
            `S = sum(H_l * W_l)`.
        spatial_shapes: `(H_l, W_l)` of every level, in the order of `value`.
        sampling_locations: `(B, Q, heads, levels, points, 2)` normalised `(x, y)`; `(0, 0)` is
            the top-left corner of the map and `(1, 1)` the bottom-right one. Locations outside
            the map sample zeros.
        attention_weights: `(B, Q, heads, levels, points)`, normally softmax-normalised over
            `levels * points`.

    Returns:
        `(B, Q, heads * head_dim)`, heads concatenated.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    dtype = _compute_dtype(value.dtype)
    value_levels = value.to(dtype).split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations.to(dtype) - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (B, H*W, heads, head_dim) -> (B, heads, head_dim, H*W) -> (B*heads, head_dim, H, W)
        value_l = (
            value_levels[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        )
        # (B, Q, heads, points, 2) -> (B, heads, Q, points, 2) -> (B*heads, Q, points, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (B*heads, head_dim, Q, points)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # (B*heads, head_dim, Q, levels, points) -> (B*heads, head_dim, Q, levels*points)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    # (B, Q, heads, levels, points) -> (B, heads, Q, levels, points) -> (B*heads, 1, Q, L*P)
    weights = (
        attention_weights.to(dtype)
        .transpose(1, 2)
        .reshape(batch * heads, 1, queries, levels * points)
    )
    # (B*heads, head_dim, Q) -> (B, heads*head_dim, Q)
    output = (stacked * weights).sum(-1).view(batch, heads * head_dim, queries)
    return output.transpose(1, 2).to(value.dtype)  # (B, Q, heads*head_dim)


def gathered_deformable_attention(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """`grid_sample_deformable_attention` as one weighted gather (`F.embedding_bag`).

    Same arguments, dtypes and result up to float rounding. Each level is zero-padded by one cell
    at the top / left and two at the bottom / right, and every sampling location is clamped into
    [-1, size] cells: a location off the map then lands on padding with its full weight (the
    clamped fraction is 0), so every one of the four corners is a real table row and needs no
    validity test. Differentiable in all three tensors (embedding_bag's backward).
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    dtype = _compute_dtype(value.dtype)
    device = value.device
    padded_sizes = [(height + 3) * (width + 3) for height, width in spatial_shapes]
    rows = sum(padded_sizes)  # rows of one (batch, head)'s table
    table = value.new_zeros(batch, heads, rows, head_dim, dtype=dtype)
    starts = [sum(padded_sizes[:level]) for level in range(levels)]
    levels_value = value.split([h * w for h, w in spatial_shapes], dim=1)
    for level_value, start, (height, width) in zip(
        levels_value, starts, spatial_shapes, strict=True
    ):
        # (B, heads, (H+3)*(W+3), head_dim) -> (B, heads, H+3, W+3, head_dim), inner cells
        inner = table[:, :, start : start + (height + 3) * (width + 3)]
        inner = inner.view(batch, heads, height + 3, width + 3, head_dim)[:, :, 1:-2, 1:-2]
        # (B, H*W, heads, head_dim) -> (B, heads, H, W, head_dim)
        inner.copy_(level_value.view(batch, height, width, heads, head_dim).permute(0, 3, 1, 2, 4))
    table = table.view(-1, head_dim)  # (B * heads * rows, head_dim)
    padded_widths = [width + 3 for _, width in spatial_shapes]
    index_dtype = torch.int32 if table.shape[0] < 2**31 else torch.int64

    # (levels, 1, 2) as (W_l, H_l), against locations (B, Q, heads, levels, points, 2)
    size = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=dtype, device=device)[:, None]
    cells = sampling_locations.to(dtype) * size - 0.5
    # clamp, not maximum / minimum: at a bound those split the gradient in half, clamp passes it
    # whole (grid_sample's gradient there: a location at -1 still moves corner 0's weight)
    cells = cells.clamp(min=cells.new_tensor(-1.0), max=size)
    low = cells.floor()
    fraction = cells - low  # (B, Q, heads, levels, points, 2), (x, y)
    low = low.to(index_dtype) + 1  # in padded cells
    widths = torch.tensor(padded_widths, dtype=index_dtype, device=device)
    level_starts = torch.tensor(starts, dtype=index_dtype, device=device)
    head_starts = torch.arange(batch * heads, dtype=index_dtype, device=device) * rows
    # top-left corner's row: (B, Q, heads, levels, points)
    top_left = (
        low[..., 1] * widths[:, None]
        + low[..., 0]
        + level_starts[:, None]
        + head_starts.view(batch, 1, heads, 1, 1)
    )
    below = top_left + widths[:, None]
    # The corners on a dimension of their own before (levels, points), so that every bag of
    # 4 * levels * points entries is contiguous; stacking there is cheaper than broadcasting
    # into a trailing dimension of 4 (0.08 s vs 0.13 s per encoder layer, 2 threads).
    # (B, Q, heads, 4, levels, points): corners (y0, x0), (y0, x1), (y1, x0), (y1, x1)
    index = torch.stack([top_left, top_left + 1, below, below + 1], dim=3)
    x1_fraction, y1_fraction = fraction[..., 0], fraction[..., 1]
    y1_weights = attention_weights.to(dtype) * y1_fraction
    y0_weights = attention_weights.to(dtype) - y1_weights
    y0_x1, y1_x1 = y0_weights * x1_fraction, y1_weights * x1_fraction
    weights = torch.stack([y0_weights - y0_x1, y0_x1, y1_weights - y1_x1, y1_x1], dim=3)
    bags = batch * queries * heads
    output = F.embedding_bag(
        index.reshape(bags, -1), table, per_sample_weights=weights.reshape(bags, -1), mode="sum"
    )
    # (B * Q * heads, head_dim) -> (B, Q, heads * head_dim)
    return output.view(batch, queries, heads * head_dim).to(value.dtype)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention of queries over a multi-level feature map (reference `MSDeformAttn`).

    Args:
        hidden_dim: width of queries, values and output.
        num_heads: attention heads; `hidden_dim` must be divisible by it.
        num_levels: feature levels in `value`.
        num_points: sampling points per head and level.
    """

    def __init__(
        self, *, hidden_dim: int, num_heads: int, num_levels: int, num_points: int
    ) -> None:
        super().__init__()
        if hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        slots = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(hidden_dim, slots * 2)
        self.attention_weights = nn.Linear(hidden_dim, slots)
        self.value_proj = nn.Linear(hidden_dim, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: offsets start on a ring of directions, one per head, at
        distances 1..num_points; uniform attention; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        step = 2.0 * math.pi / self.num_heads
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * step
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)  # (heads, 2)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        # (heads, 2) -> (heads, levels, points, 2)
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(
            1, self.num_levels, self.num_points, 1
        )
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: list[tuple[int, int]],
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from every query to its sampling locations.

        Args:
            query: `(B, Q, C)`, position embedding already added.
            reference_points: `(B, Q, levels, 2)` normalised `(x, y)` points, or
                `(B, Q, levels, 4)` normalised `(cx, cy, w, h)` boxes, in units of the (possibly
                padded) map of each level, i.e. already multiplied by the valid ratios.
            value: `(B, S, C)` flattened levels, `S = sum(H_l * W_l)`.
            spatial_shapes: `(H_l, W_l)` per level.
            value_padding_mask: `(B, S)` bool, True on padded positions (their values are zeroed),
                or None.

        Returns:
            `(B, Q, C)`.

        Point references move by `offset / (W_l, H_l)`; box references by
        `offset / num_points * (w, h) / 2`.
        """
        batch, queries, _ = query.shape
        length = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, length, heads, self.hidden_dim // heads)
        dtype = _compute_dtype(query.dtype)
        offsets = (
            self.sampling_offsets(query).to(dtype).view(batch, queries, heads, levels, points, 2)
        )
        # softmax over the levels*points slots of each head
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        reference_points = reference_points.to(dtype)
        if reference_points.shape[-1] == 2:
            # (levels, 2) as (W_l, H_l): offsets are in cells of each level
            normaliser = host_tensor([[w, h] for h, w in spatial_shapes], dtype, query.device)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normaliser[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                "reference_points must end in 2 (points) or 4 (boxes), got "
                f"{reference_points.shape[-1]}"
            )
        output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(output)
