"""Hungarian matcher: optimal against brute force, batch equals single, empty and planted cases."""

import itertools

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from grounding.config import LossConfig
from grounding.matcher import HungarianMatcher
from grounding.targets import DetectionTarget


def random_case(seed: int, num_queries: int = 5, num_boxes: int = 3, num_columns: int = 12,
                num_real: int = 9) -> tuple[torch.Tensor, torch.Tensor, DetectionTarget]:
    """(Q, T) logits with -inf past `num_real` tokens, (Q, 4) boxes and n random targets."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_queries, num_columns, generator=generator) * 3
    logits[:, num_real:] = float("-inf")
    boxes = torch.cat([torch.rand(num_queries, 2, generator=generator) * 0.6 + 0.2,
                       torch.rand(num_queries, 2, generator=generator) * 0.3 + 0.05], dim=1)
    target_boxes = torch.cat([torch.rand(num_boxes, 2, generator=generator) * 0.6 + 0.2,
                              torch.rand(num_boxes, 2, generator=generator) * 0.3 + 0.05], dim=1)
    positive_map = torch.zeros(num_boxes, num_columns, dtype=torch.bool)
    for index in range(num_boxes):
        start = int(torch.randint(1, num_real - 2, (1,), generator=generator))
        length = int(torch.randint(1, 3, (1,), generator=generator))
        positive_map[index, start:start + length] = True
    return logits, boxes, DetectionTarget(target_boxes, positive_map,
                                          torch.arange(num_boxes))


def direct_cost(logits, boxes, target, config: LossConfig) -> torch.Tensor:
    """The matching cost written out pair by pair, (Q, n)."""
    alpha, gamma = config.focal_alpha, config.focal_gamma
    cost = torch.zeros(logits.shape[0], len(target))
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    target_xyxy = box_convert(target.boxes, "cxcywh", "xyxy")
    for query in range(logits.shape[0]):
        for box in range(len(target)):
            class_cost = 0.0
            for token in target.positive_map[box].nonzero().flatten().tolist():
                p = torch.sigmoid(logits[query, token])
                class_cost += (alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)
                               - (1 - alpha) * p**gamma * -torch.log(1 - p + 1e-8))
            l1 = (boxes[query] - target.boxes[box]).abs().sum()
            giou = generalized_box_iou(xyxy[query:query + 1], target_xyxy[box:box + 1])[0, 0]
            cost[query, box] = (config.cost_class * class_cost + config.cost_l1 * l1
                                - config.cost_giou * giou)
    return cost


def assignment_cost(cost: torch.Tensor, query_indices, target_indices) -> float:
    return float(cost[query_indices, target_indices].sum())


def test_cost_matrix_equals_pairwise_formula():
    config = LossConfig()
    logits, boxes, target = random_case(0)
    cost = HungarianMatcher(config).cost_matrix(logits, boxes, target)
    torch.testing.assert_close(cost, direct_cost(logits, boxes, target, config),
                               atol=1e-4, rtol=1e-5)


def test_class_cost_sums_over_phrase_tokens():
    config = LossConfig(cost_l1=0.0, cost_giou=0.0)
    logits, boxes, target = random_case(1)
    target.positive_map[0] = False
    target.positive_map[0, 2:5] = True
    matcher = HungarianMatcher(config)
    cost = matcher.cost_matrix(logits, boxes, target)[:, 0]
    per_token = [matcher.cost_matrix(logits, boxes, DetectionTarget(
        target.boxes[:1], torch.nn.functional.one_hot(torch.tensor([token]), 12).bool(),
        target.category_ids[:1]))[:, 0] for token in (2, 3, 4)]
    torch.testing.assert_close(cost, sum(per_token), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("num_queries", "num_boxes"), [(5, 3), (4, 4), (3, 5)])
def test_matches_brute_force_optimum(seed, num_queries, num_boxes):
    logits, boxes, target = random_case(seed, num_queries, num_boxes)
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(logits, boxes, target)
    [(query_indices, target_indices)] = matcher(logits[None], boxes[None], [target])
    pairs = min(num_queries, num_boxes)
    assert len(query_indices) == len(target_indices) == pairs
    assert len(set(query_indices.tolist())) == len(set(target_indices.tolist())) == pairs
    if num_queries >= num_boxes:
        best = min(sum(float(cost[query, box]) for box, query in enumerate(queries))
                   for queries in itertools.permutations(range(num_queries), num_boxes))
    else:
        best = min(sum(float(cost[query, box]) for query, box in enumerate(chosen))
                   for chosen in itertools.permutations(range(num_boxes), num_queries))
    assert assignment_cost(cost, query_indices, target_indices) == pytest.approx(best, abs=1e-4)


def test_batch_equals_each_image_alone():
    cases = [random_case(seed, num_boxes=n) for seed, n in [(10, 3), (11, 0), (12, 1), (13, 4)]]
    logits = torch.stack([case[0] for case in cases])
    boxes = torch.stack([case[1] for case in cases])
    targets = [case[2] for case in cases]
    batch = HungarianMatcher()(logits, boxes, targets)
    for index, (image_logits, image_boxes, target) in enumerate(cases):
        [(query_indices, target_indices)] = HungarianMatcher()(image_logits[None],
                                                               image_boxes[None], [target])
        assert torch.equal(batch[index][0], query_indices)
        assert torch.equal(batch[index][1], target_indices)


def test_empty_targets_give_empty_indices():
    logits, boxes, _ = random_case(2)
    empty = DetectionTarget(torch.zeros(0, 4), torch.zeros(0, 12, dtype=torch.bool),
                            torch.zeros(0, dtype=torch.int64))
    matches = HungarianMatcher()(logits[None].repeat(2, 1, 1), boxes[None].repeat(2, 1, 1),
                                 [empty, empty])
    for query_indices, target_indices in matches:
        assert query_indices.shape == target_indices.shape == (0,)
        assert query_indices.dtype == target_indices.dtype == torch.int64


def test_planted_query_wins():
    logits, boxes, target = random_case(3, num_queries=8, num_boxes=2)
    # Query 6 sits exactly on box 1 and is confident on its phrase; query 2 likewise on box 0.
    for query, box in [(6, 1), (2, 0)]:
        boxes[query] = target.boxes[box]
        logits[query, :9] = -8.0
        logits[query, target.positive_map[box]] = 8.0
    [(query_indices, target_indices)] = HungarianMatcher()(logits[None], boxes[None], [target])
    assert dict(zip(target_indices.tolist(), query_indices.tolist(), strict=True)) == {0: 2, 1: 6}


def test_non_finite_costs_still_match():
    logits, boxes, target = random_case(4)
    # A positive map on an -inf column (probability 0) stays finite through the log epsilon.
    target.positive_map[0, 11] = True
    assert torch.isfinite(HungarianMatcher().cost_matrix(logits, boxes, target)).all()
    logits[0, :] = float("nan")
    cost = HungarianMatcher().cost_matrix(logits, boxes, target)
    assert torch.isfinite(cost).all() and (cost[0] == 1e8).all()
    [(query_indices, _)] = HungarianMatcher()(logits[None], boxes[None], [target])
    assert 0 not in query_indices.tolist()
