"""Box conversions, the reference's inverse sigmoid, and GIoU."""

import math

import pytest
import torch

from grounding.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
)


def test_box_conversions_round_trip():
    generator = torch.Generator().manual_seed(0)
    boxes = torch.rand(3, 5, 4, generator=generator)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    corners = box_cxcywh_to_xyxy(boxes)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(corners)), corners)


def test_box_cxcywh_to_xyxy_values():
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(boxes), torch.tensor([[0.4, 0.1, 0.6, 0.7]]))


def test_box_conversions_keep_dtype():
    boxes = torch.rand(4, 4, dtype=torch.bfloat16)
    assert box_cxcywh_to_xyxy(boxes).dtype == torch.bfloat16
    assert box_xyxy_to_cxcywh(boxes).dtype == torch.bfloat16


def test_inverse_sigmoid_is_finite_at_the_ends_with_eps_1e_3():
    values = inverse_sigmoid(torch.tensor([0.0, 1.0, -0.5, 1.5]))
    bound = math.log(1 / 1e-3)
    torch.testing.assert_close(values, torch.tensor([-bound, bound, -bound, bound]))


def test_inverse_sigmoid_inverts_sigmoid_inside_the_eps_range():
    logits = torch.linspace(-6, 6, 25)
    torch.testing.assert_close(inverse_sigmoid(logits.sigmoid()), logits, atol=1e-4, rtol=1e-4)


def test_inverse_sigmoid_matches_transformers_logit_inside_the_eps_range():
    x = torch.rand(100) * 0.99 + 0.005
    torch.testing.assert_close(inverse_sigmoid(x), torch.special.logit(x, eps=1e-5))


def test_generalized_box_iou():
    boxes1 = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    boxes2 = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [0.5, 0.0, 1.5, 1.0]])
    giou = generalized_box_iou(boxes1, boxes2)
    assert giou.shape == (2, 3)
    # identical: 1; disjoint with a gap of 1: IoU 0 - (3 - 2) / 3; half overlap: 1/3.
    expected = torch.tensor([1.0, -1 / 3, 1 / 3])
    torch.testing.assert_close(giou[0], expected)
    torch.testing.assert_close(giou[1], expected)


@pytest.mark.parametrize("shape", [(0, 4), (7, 4)])
def test_generalized_box_iou_of_a_box_with_itself(shape):
    boxes = box_cxcywh_to_xyxy(torch.rand(*shape) * 0.5 + 0.1)
    torch.testing.assert_close(generalized_box_iou(boxes, boxes).diagonal(),
                               torch.ones(shape[0]))
