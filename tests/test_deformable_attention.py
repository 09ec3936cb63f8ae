"""Multi-scale deformable attention: bilinear sampling, transformers parity, padding, dtypes.

Both implementations (grid_sample, the reference's pure-PyTorch path; the embedding_bag gather,
the CPU default) are held to transformers' function and to each other.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GroundingDinoConfig
from transformers.models.grounding_dino import modeling_grounding_dino as hf

from grounding.deformable_attention import (
    MultiScaleDeformableAttention,
    gathered_deformable_attention,
    grid_sample_deformable_attention,
    multi_scale_deformable_attention,
)

IMPLEMENTATIONS = pytest.mark.parametrize(
    "implementation", [grid_sample_deformable_attention, gathered_deformable_attention],
    ids=["grid_sample", "gathered"])

SHAPES = [(6, 5), (3, 3), (2, 1)]
HIDDEN, HEADS, POINTS = 32, 4, 2


def _bilinear(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample a (C, H, W) map at normalised (x, y) the textbook way, zeros outside."""
    _, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    out = torch.zeros(image.shape[0], dtype=image.dtype)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= xi < width and 0 <= yi < height:
            out += (1 - abs(px - xi)) * (1 - abs(py - yi)) * image[:, yi, xi]
    return out


def _module(seed: int = 0) -> MultiScaleDeformableAttention:
    torch.manual_seed(seed)
    module = MultiScaleDeformableAttention(hidden_dim=HIDDEN, num_heads=HEADS,
                                           num_levels=len(SHAPES), num_points=POINTS)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(std=0.3)
    return module.eval()


def test_zero_offsets_single_level_is_bilinear_sampling():
    module = MultiScaleDeformableAttention(hidden_dim=8, num_heads=2, num_levels=1, num_points=3)
    with torch.no_grad():
        module.sampling_offsets.weight.zero_()
        module.sampling_offsets.bias.zero_()
        module.attention_weights.weight.normal_()  # any weights: they sum to one per head
    height, width = 4, 5
    value = torch.randn(1, height * width, 8)
    refs = torch.tensor([[0.5, 0.5], [0.03, 0.91], [0.99, 0.02], [0.37, 0.64]])
    out = module(torch.randn(1, len(refs), 8), refs[None, :, None], value, [(height, width)])
    projected = module.value_proj(value)[0].T.reshape(8, height, width)
    expected = torch.stack([_bilinear(projected, float(x), float(y)) for x, y in refs])
    torch.testing.assert_close(out[0], module.output_proj(expected), atol=1e-5, rtol=1e-5)


@IMPLEMENTATIONS
def test_function_matches_transformers(implementation):
    torch.manual_seed(0)
    batch, queries, head_dim = 2, 7, 8
    length = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, length, HEADS, head_dim)
    locations = torch.rand(batch, queries, HEADS, len(SHAPES), POINTS, 2) * 1.4 - 0.2
    weights = torch.rand(batch, queries, HEADS, len(SHAPES), POINTS)
    shapes = torch.tensor(SHAPES)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    expected = hf.MultiScaleDeformableAttention()(value, shapes, SHAPES, start, locations,
                                                  weights, 64)
    out = implementation(value, SHAPES, locations, weights)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_gather_equals_grid_sample_at_full_size_levels_and_far_off_the_map():
    """The encoder's level sizes at 800 x 1200, locations up to 10 maps away on every side."""
    torch.manual_seed(0)
    shapes = [(100, 150), (50, 75), (25, 38), (13, 19)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 8, 32)
    locations = torch.rand(2, 300, 8, 4, 4, 2) * 1.4 - 0.2
    locations[:, :20] = torch.rand(2, 20, 8, 4, 4, 2) * 20 - 10
    weights = torch.rand(2, 300, 8, 4, 4).softmax(-1)
    expected = grid_sample_deformable_attention(value, shapes, locations, weights)
    out = gathered_deformable_attention(value, shapes, locations, weights)
    # grid_sample goes through 2 * location - 1: ~1e-5 cells of rounding on 150-wide maps
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=1e-5)
    assert out[:, :20].abs().max() < expected.abs().max()  # far points sample (mostly) zeros


def test_cpu_uses_the_gather():
    torch.manual_seed(0)
    value = torch.randn(1, sum(h * w for h, w in SHAPES), HEADS, 8)
    locations = torch.rand(1, 5, HEADS, len(SHAPES), POINTS, 2)
    weights = torch.rand(1, 5, HEADS, len(SHAPES), POINTS)
    out = multi_scale_deformable_attention(value, SHAPES, locations, weights)
    assert torch.equal(out, gathered_deformable_attention(value, SHAPES, locations, weights))


def test_init_matches_transformers():
    config = GroundingDinoConfig(d_model=HIDDEN, num_feature_levels=len(SHAPES),
                                 encoder_attention_heads=HEADS, encoder_n_points=POINTS)
    reference = hf.GroundingDinoMultiscaleDeformableAttention(config, HEADS, POINTS)
    hf.GroundingDinoPreTrainedModel._init_weights(
        hf.GroundingDinoPreTrainedModel(config), reference)
    ours = _module()
    ours.reset_parameters()
    for name in ("sampling_offsets.weight", "sampling_offsets.bias", "attention_weights.weight",
                 "attention_weights.bias", "value_proj.bias", "output_proj.bias"):
        torch.testing.assert_close(ours.state_dict()[name], reference.state_dict()[name])


@pytest.mark.parametrize("coords", [2, 4])
def test_module_matches_transformers(coords):
    config = GroundingDinoConfig(d_model=HIDDEN, num_feature_levels=len(SHAPES),
                                 encoder_attention_heads=HEADS, encoder_n_points=POINTS)
    reference = hf.GroundingDinoMultiscaleDeformableAttention(config, HEADS, POINTS).eval()
    ours = _module()
    reference.load_state_dict(ours.state_dict(), strict=True)
    batch, queries = 2, 7
    length = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(batch, queries, HIDDEN), torch.randn(batch, length, HIDDEN)
    padding = torch.rand(batch, length) < 0.2
    refs = torch.rand(batch, queries, len(SHAPES), coords)
    shapes = torch.tensor(SHAPES)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    expected, _ = reference(query, attention_mask=~padding, encoder_hidden_states=value,
                            reference_points=refs, spatial_shapes=shapes,
                            spatial_shapes_list=SHAPES, level_start_index=start)
    out = ours(query, refs, value, SHAPES, padding)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def _pad_levels(value: torch.Tensor, shapes, padded_shapes):
    """Embed each (H, W) level of (B, S, C) into a bigger map, bottom / right; return the mask."""
    batch, _, channels = value.shape
    maps, masks = [], []
    for level, ((h, w), (ph, pw)) in enumerate(zip(shapes, padded_shapes, strict=True)):
        start = sum(a * b for a, b in shapes[:level])
        grid = value.new_zeros(batch, ph, pw, channels)
        grid[:, :h, :w] = value[:, start:start + h * w].view(batch, h, w, channels)
        mask = torch.ones(batch, ph, pw, dtype=torch.bool)
        mask[:, :h, :w] = False
        maps.append(grid.flatten(1, 2))
        masks.append(mask.flatten(1))
    return torch.cat(maps, 1), torch.cat(masks, 1)


@pytest.mark.parametrize("coords", [2, 4])
def test_padding_invariance(coords):
    module = _module()
    padded_shapes = [(9, 7), (5, 4), (3, 2)]
    batch, queries = 2, 11
    length = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(batch, queries, HIDDEN), torch.randn(batch, length, HIDDEN)
    refs = torch.rand(batch, queries, len(SHAPES), coords) * 1.2 - 0.1
    ratios = torch.tensor([[w / pw, h / ph] for (h, w), (ph, pw) in zip(SHAPES, padded_shapes,
                                                                         strict=True)])
    scale = ratios if coords == 2 else torch.cat([ratios, ratios], -1)
    padded_value, padding = _pad_levels(value, SHAPES, padded_shapes)
    padded_value = padded_value + 100 * padding[..., None]  # padded content must not leak
    out = module(query, refs, value, SHAPES)
    padded_out = module(query, refs * scale, padded_value, padded_shapes, padding)
    torch.testing.assert_close(padded_out, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_float32(dtype):
    module = _module()
    length = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, 5, HIDDEN), torch.randn(2, length, HIDDEN)
    refs = torch.rand(2, 5, len(SHAPES), 4)
    expected = module(query, refs, value, SHAPES)
    out = module.to(dtype)(query.to(dtype), refs.to(dtype), value.to(dtype), SHAPES)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.15, rtol=0.05)


def test_autocast_bfloat16():
    module = _module()
    length = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, 5, HIDDEN), torch.randn(2, length, HIDDEN)
    padding = torch.zeros(2, length, dtype=torch.bool)
    refs = torch.rand(2, 5, len(SHAPES), 2)
    expected = module(query, refs, value, SHAPES, padding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(query, refs, value, SHAPES, padding)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.15, rtol=0.05)


@IMPLEMENTATIONS
def test_gradients(implementation):
    torch.manual_seed(0)
    value = torch.randn(2, 9 + 4, 2, 3, dtype=torch.float64, requires_grad=True)
    # inside, near and beyond the borders (gradcheck's steps never cross a cell edge here)
    locations = (torch.rand(2, 3, 2, 2, 2, 2, dtype=torch.float64) * 1.6 - 0.3).requires_grad_()
    weights = torch.rand(2, 3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: implementation(v, [(3, 3), (2, 2)], loc, w),
        (value, locations, weights))
    module = _module()
    length = sum(h * w for h, w in SHAPES)
    module(torch.randn(2, 5, HIDDEN), torch.rand(2, 5, len(SHAPES), 2),
           torch.randn(2, length, HIDDEN), SHAPES).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_gradients_at_cell_edges_and_map_borders_equal_grid_samples():
    """Points exactly on cell edges (as the reference init's integer offsets put them) and on
    the padding bounds -1 and W: the one-sided gradients grid_sample takes there."""
    torch.manual_seed(0)
    shapes = [(4, 4), (2, 2)]
    value = torch.randn(1, 16 + 4, 2, 3, dtype=torch.float64)
    cells = torch.tensor([-1.0, 0.0, 1.0, 2.5, 3.0, 4.0, -1.5, 5.0], dtype=torch.float64)
    # (x, y) cell coordinates -> normalised on the 4 x 4 level (loc = (cell + 0.5) / 4)
    grid = torch.cartesian_prod(cells, cells)  # (64, 2)
    locations = ((grid + 0.5) / 4).view(1, 64, 1, 1, 1, 2).expand(1, 64, 2, 2, 1, 2).clone()
    weights = torch.rand(1, 64, 2, 2, 1, dtype=torch.float64)
    gradients = []
    for implementation in (grid_sample_deformable_attention, gathered_deformable_attention):
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        out = implementation(inputs[0], shapes, inputs[1], inputs[2])
        out.mul(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        gradients.append([t.grad for t in inputs])
    for expected, actual in zip(*gradients, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)
