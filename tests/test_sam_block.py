"""SAM's CPU inference block (segmentation.sam_block, segmentation.sam_windows) equals
segment_anything's `Block`.

Tolerance (fp32): block outputs within 1e-5 absolute of segment_anything's (they are O(1); the
explicit products sum in another order than its matmuls, measured differences ~1e-6). The window
split and merge are copies: exact.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    Block,
    get_rel_pos,
    window_partition,
    window_unpartition,
)

import grounding.fused_linear as fused_linear_module
from segmentation.sam_attention import accelerate_sam, restore_sam
from segmentation.sam_block import FastBlock, fast_path_applies, window_attention
from segmentation.sam_rel_pos import pair_table, relative_tables, relative_terms
from segmentation.sam_windows import merge_windows, split_windows, window_layout

ATOL = 1e-5

# (grid height, grid width, window): windows with padding on both axes, whole windows, a
# non-square grid with padding on one axis, and global attention (window 0)
GRIDS = [(10, 10, 4), (8, 8, 4), (9, 12, 4), (6, 7, 0)]


def random_block(
    dim: int, heads: int, window: int, grid: tuple[int, int], use_rel_pos: bool = True
) -> Block:
    """segment_anything's Block with every parameter random (rel_pos starts at zero)."""
    torch.manual_seed(0)
    block = Block(dim, heads, use_rel_pos=use_rel_pos, window_size=window, input_size=grid)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        if use_rel_pos:
            block.attn.rel_pos_h.normal_()
            block.attn.rel_pos_w.normal_()
    return block.eval()


@pytest.mark.parametrize("step_rows", [1, 3, 16])
@pytest.mark.parametrize(("height", "width", "window"), GRIDS)
def test_split_windows_equals_partition_then_head_split_with_zero_tokens_padding(
    height, width, window, step_rows
):
    torch.manual_seed(0)
    batch, heads, channels = 2, 3, 4
    linear = torch.nn.Linear(heads * channels, 3 * heads * channels)
    x = torch.randn(batch, height, width, heads * channels)
    with torch.no_grad():
        # segment_anything: zero padding and window partition first, then qkv on every token
        windows = window_partition(x, window)[0] if window else x
        count, rows, columns, _ = windows.shape
        expected = linear(windows).reshape(count, rows * columns, 3, heads, channels)
        expected = expected.permute(2, 0, 3, 1, 4).reshape(3, count * heads, rows * columns, -1)
        layout = window_layout(batch, height, width, heads, window)
        padding = linear(x.new_zeros(1, x.shape[-1]))[0]
        actual = split_windows(x, linear, padding, layout, step_rows=step_rows)
    assert layout.matrices == count * heads
    # the copies are exact; the Linear on other row counts may round differently
    torch.testing.assert_close(torch.stack(actual), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("height", "width", "window"), GRIDS)
def test_merge_windows_equals_head_merge_then_unpartition(height, width, window):
    torch.manual_seed(0)
    batch, heads, channels = 2, 3, 4
    layout = window_layout(batch, height, width, heads, window)
    tokens = layout.window_height * layout.window_width
    windows = torch.randn(layout.matrices, tokens, channels)
    # segment_anything: (B * nw * heads, N, C) -> (B * nw, h, w, heads * C) -> unpartition
    count = layout.matrices // heads
    grid = windows.view(count, heads, layout.window_height, layout.window_width, channels)
    grid = grid.permute(0, 2, 3, 1, 4).reshape(count, layout.window_height, layout.window_width, -1)
    if window:
        padded = (layout.rows * window, layout.columns * window)
        expected = window_unpartition(grid, window, padded, (height, width))
    else:
        expected = grid
    torch.testing.assert_close(merge_windows(windows, layout), expected, atol=0, rtol=0)


@pytest.mark.parametrize("use_rel_pos", [True, False])
@pytest.mark.parametrize(("height", "width", "window"), GRIDS)
def test_fast_block_equals_segment_anything_block(height, width, window, use_rel_pos):
    reference = random_block(24, 3, window, (height, width), use_rel_pos)
    fast = copy.deepcopy(reference)
    fast.__class__ = FastBlock
    x = torch.randn(2, height, width, 24)
    with torch.no_grad():
        expected, actual = reference(x), fast(x)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("score_elements", [1, 100, 10**9])
@pytest.mark.parametrize("window", [4, 0])
def test_window_attention_does_not_depend_on_the_product_blocks(score_elements, window):
    """One query row or one matrix per product up to everything at once: same output."""
    torch.manual_seed(0)
    layout = window_layout(2, 9, 11, 2, window)
    tokens = layout.window_height * layout.window_width
    q, k, v = torch.randn(3, layout.matrices, tokens, 8).unbind(0)
    rel_pos_h = torch.randn(2 * layout.window_height - 1, 8)
    rel_pos_w = torch.randn(2 * layout.window_width - 1, 8)
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=decomposed_bias(q, rel_pos_h, rel_pos_w, layout),
            scale=0.3,
        )
        actual = window_attention(
            q.clone(),
            k,
            v,
            (rel_pos_h, rel_pos_w),
            layout,
            scale=0.3,
            score_elements=score_elements,
        )
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


# (window height, window width, table rows): tables of 2 * size - 1 rows, and longer ones that
# get_rel_pos resizes
@pytest.mark.parametrize(("height", "width", "length"), [(3, 5, None), (4, 4, 11), (1, 6, 3)])
def test_relative_terms_equal_segment_anything_decomposed_terms(height, width, length):
    torch.manual_seed(0)
    channels = 8
    rel_pos_h = torch.randn(length or 2 * height - 1, channels)
    rel_pos_w = torch.randn(length or 2 * width - 1, channels)
    q = torch.randn(5, height * width, channels)
    grid = q.view(5, height, width, channels)
    # add_decomposed_rel_pos's two terms
    expected_h = torch.einsum("mhwc,hkc->mhwk", grid, get_rel_pos(height, height, rel_pos_h))
    expected_w = torch.einsum("mhwc,wkc->mhwk", grid, get_rel_pos(width, width, rel_pos_w))
    tables = relative_tables((rel_pos_h, rel_pos_w), height, width)
    rel_h, rel_w = relative_terms(q, tables, height, width)
    torch.testing.assert_close(rel_h[..., 0], expected_h, atol=ATOL, rtol=0)
    torch.testing.assert_close(rel_w[..., 0, :], expected_w, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("size", "length"), [(5, None), (4, 11), (14, 27), (14, 9), (1, 3)])
def test_pair_table_is_segment_anything_get_rel_pos(size, length):
    """Bit for bit, also where the table is resized (up, down, to one row)."""
    table = torch.randn(length or 2 * size - 1, 8, generator=torch.Generator().manual_seed(size))
    assert torch.equal(pair_table(size, table), get_rel_pos(size, size, table))


def decomposed_bias(q, rel_pos_h, rel_pos_w, layout):
    """segment_anything's relative-position terms as one (matrices, N, N) tensor."""
    height, width = layout.window_height, layout.window_width
    grid = q.view(-1, height, width, q.shape[-1])
    rel_h = torch.einsum("mhwc,hkc->mhwk", grid, get_rel_pos(height, height, rel_pos_h))
    rel_w = torch.einsum("mhwc,wkc->mhwk", grid, get_rel_pos(width, width, rel_pos_w))
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(q.shape[0], height * width, height * width)


def test_the_global_block_without_onednn_takes_torch_mm_with_the_same_result(monkeypatch):
    reference = random_block(24, 3, 0, (9, 9))
    fast = copy.deepcopy(reference)
    fast.__class__ = FastBlock
    monkeypatch.setattr(fused_linear_module, "_onednn_works", lambda: False)
    x = torch.randn(1, 9, 9, 24)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), atol=ATOL, rtol=0)


def test_fast_block_under_autograd_is_segment_anything_forward_with_its_gradients():
    reference = random_block(24, 3, 4, (10, 10))
    fast = copy.deepcopy(reference)
    fast.__class__ = FastBlock
    x = torch.randn(2, 10, 10, 24)
    assert fast_path_applies(x) is False  # autograd is on
    outputs = [block(x) for block in (reference, fast)]
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=0)
    for output in outputs:
        output.square().sum().backward()
    for (name, expected), actual in zip(
        reference.named_parameters(), fast.parameters(), strict=True
    ):
        torch.testing.assert_close(actual.grad, expected.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_fast_path_applies_only_to_float32_cpu_inference():
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        assert fast_path_applies(x)
        assert not fast_path_applies(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fast_path_applies(x)
    assert not fast_path_applies(x)


def test_accelerate_sam_reclasses_blocks_and_restore_sam_undoes_it():
    from segmentation.tiny_models import tiny_sam

    sam = tiny_sam(image_size=256)
    accelerate_sam(sam)
    blocks = list(sam.image_encoder.blocks)
    assert blocks and all(type(block) is FastBlock for block in blocks)
    restore_sam(sam)
    assert all(type(block) is Block for block in blocks)
