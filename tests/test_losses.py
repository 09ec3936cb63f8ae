"""Set criterion: each term against a direct computation, edge cases, and overfitting one batch."""

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from grounding.config import GroundingDINOConfig, LossConfig, SwinConfig
from grounding.losses import SetCriterion, prediction_sets
from grounding.model import GroundingOutput, build_model
from grounding.targets import DetectionTarget
from grounding.text_masks import phrase_token_spans

BATCH, QUERIES, COLUMNS = 3, 6, 16
REAL_TOKENS = (9, 12, 7)  # caption length of each image; the remaining columns are -inf


def random_boxes(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 4) cxcywh boxes well inside [0, 1]."""
    return torch.cat([torch.rand(count, 2, generator=generator) * 0.5 + 0.25,
                      torch.rand(count, 2, generator=generator) * 0.3 + 0.1], dim=1)


def random_output(seed: int = 0, aux_layers: int = 2, encoder: bool = True,
                  ) -> tuple[GroundingOutput, torch.Tensor]:
    """A GroundingOutput with leaf tensors (grad enabled) and its (B, T) token mask."""
    generator = torch.Generator().manual_seed(seed)
    token_mask = torch.arange(COLUMNS)[None] < torch.tensor(REAL_TOKENS)[:, None]  # (B, T)

    def leaf_pair():
        logits = (torch.randn(BATCH, QUERIES, COLUMNS, generator=generator) * 2)
        logits = logits.masked_fill(~token_mask[:, None, :], float("-inf")).requires_grad_()
        boxes = random_boxes(BATCH * QUERIES, generator).view(BATCH, QUERIES, 4)
        return logits, boxes.requires_grad_()

    logits, boxes = leaf_pair()
    aux = [leaf_pair() for _ in range(aux_layers)]
    encoder_logits, encoder_boxes = leaf_pair() if encoder else (None, None)
    output = GroundingOutput(logits=logits, boxes=boxes,
                             aux_logits=[a[0] for a in aux] if aux_layers else None,
                             aux_boxes=[a[1] for a in aux] if aux_layers else None,
                             encoder_logits=encoder_logits, encoder_boxes=encoder_boxes)
    return output, token_mask


def random_targets(counts=(2, 0, 3), seed: int = 1) -> list[DetectionTarget]:
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for count, real in zip(counts, REAL_TOKENS, strict=True):
        positive_map = torch.zeros(count, COLUMNS, dtype=torch.bool)
        for row in range(count):
            start = int(torch.randint(1, real - 2, (1,), generator=generator))
            positive_map[row, start:start + 2] = True
        targets.append(DetectionTarget(random_boxes(count, generator), positive_map,
                                       torch.arange(count)))
    return targets


def direct_terms(logits, boxes, targets, token_mask, matches, config: LossConfig):
    """The three unweighted terms written out image by image."""
    num_boxes = max(sum(len(t) for t in targets), 1)
    class_loss = l1_loss = giou_loss = torch.zeros(())
    for image, (target, (query_indices, target_indices)) in enumerate(
            zip(targets, matches, strict=True)):
        real = int(token_mask[image].sum())
        labels = torch.zeros(QUERIES, real)
        for query, box in zip(query_indices.tolist(), target_indices.tolist(), strict=True):
            labels[query] = target.positive_map[box, :real].float()
        class_loss = class_loss + sigmoid_focal_loss(
            logits[image, :, :real].flatten(), labels.flatten(), alpha=config.focal_alpha,
            gamma=config.focal_gamma, reduction="sum")
        predicted, expected = boxes[image, query_indices], target.boxes[target_indices]
        l1_loss = l1_loss + (predicted - expected).abs().sum()
        giou = generalized_box_iou(box_convert(predicted, "cxcywh", "xyxy"),
                                   box_convert(expected, "cxcywh", "xyxy"))
        giou_loss = giou_loss + (1 - giou.diagonal()).sum()
    return {"loss_class": class_loss / num_boxes, "loss_l1": l1_loss / num_boxes,
            "loss_giou": giou_loss / num_boxes}


def test_terms_equal_direct_computation_for_every_set():
    config = LossConfig()
    criterion = SetCriterion(config)
    output, token_mask = random_output()
    targets = random_targets()
    total, components = criterion(output, targets, token_mask)
    expected_total = 0.0
    for suffix, logits, boxes in prediction_sets(output):
        matches = criterion.matcher(logits, boxes, targets)
        expected = direct_terms(logits, boxes, targets, token_mask, matches, config)
        for name, value in expected.items():
            torch.testing.assert_close(components[name + suffix], value.detach(),
                                       atol=1e-5, rtol=1e-5)
        expected_total = expected_total + (config.weight_class * expected["loss_class"]
                                           + config.weight_l1 * expected["loss_l1"]
                                           + config.weight_giou * expected["loss_giou"])
    torch.testing.assert_close(total, expected_total, atol=1e-4, rtol=1e-5)


def test_aux_and_encoder_components_follow_the_output():
    criterion = SetCriterion()
    terms = ("loss_class", "loss_l1", "loss_giou")
    output, token_mask = random_output(aux_layers=2, encoder=True)
    _, components = criterion(output, random_targets(), token_mask)
    assert set(components) == {t + s for t in terms for s in ("", "_0", "_1", "_enc")}
    output, token_mask = random_output(aux_layers=0, encoder=False)
    _, components = criterion(output, random_targets(), token_mask)
    assert set(components) == set(terms)
    output, token_mask = random_output(aux_layers=2, encoder=True)
    off = SetCriterion(LossConfig(aux_loss=False, encoder_loss=False))
    _, components = off(output, random_targets(), token_mask)
    assert set(components) == set(terms)


def test_perfect_boxes_give_zero_box_losses():
    output, token_mask = random_output(aux_layers=0, encoder=False)
    targets = random_targets()
    with torch.no_grad():  # plant each target box on a distinct query; the rest lie far off
        output.boxes.copy_(torch.tensor([0.05, 0.05, 0.02, 0.02]).expand(BATCH, QUERIES, 4))
        for image, target in enumerate(targets):
            output.boxes[image, 1:1 + len(target)] = target.boxes
    _, components = SetCriterion()(output, targets, token_mask)
    assert components["loss_l1"] == pytest.approx(0.0, abs=1e-6)
    assert components["loss_giou"] == pytest.approx(0.0, abs=1e-5)  # GIoU eps 1e-7
    assert components["loss_class"] > 0


def test_padding_logits_give_finite_loss_and_gradients():
    output, token_mask = random_output()
    total, _ = SetCriterion()(output, random_targets(), token_mask)
    total.backward()
    assert torch.isfinite(total)
    for tensor in [output.logits, *output.aux_logits, output.encoder_logits]:
        assert torch.isfinite(tensor.grad).all()
        assert (tensor.grad[~token_mask[:, None, :].expand_as(tensor)] == 0).all()
        assert (tensor.grad[token_mask[:, None, :].expand_as(tensor)] != 0).any()
    assert torch.isfinite(output.boxes.grad).all() and output.boxes.grad.abs().sum() > 0


def test_short_token_mask_is_padded_and_mismatch_is_caught():
    output, token_mask = random_output()
    targets = random_targets()
    full, _ = SetCriterion()(output, targets, token_mask)
    short, _ = SetCriterion()(output, targets, token_mask[:, :max(REAL_TOKENS)])
    torch.testing.assert_close(short, full)
    wrong = token_mask.clone()
    wrong[0, REAL_TOKENS[0]] = True  # a column whose logits are -inf
    with pytest.raises(ValueError, match="non-finite logits"):
        SetCriterion()(output, targets, wrong)


def test_images_without_targets():
    config = LossConfig()
    output, token_mask = random_output()
    targets = random_targets(counts=(0, 0, 0))
    total, components = SetCriterion(config)(output, targets, token_mask)
    total.backward()
    assert components["loss_l1"] == 0 and components["loss_giou_enc"] == 0
    # Every real entry is a negative; the normaliser is clamped to 1.
    valid = token_mask[:, None, :].expand_as(output.logits)
    negatives = sigmoid_focal_loss(output.logits[valid], torch.zeros(int(valid.sum())),
                                   reduction="sum")
    torch.testing.assert_close(components["loss_class"], negatives.detach())
    assert torch.isfinite(output.logits.grad).all() and output.logits.grad.abs().sum() > 0


def tiny_detector_config() -> GroundingDINOConfig:
    """A 2-layer-decoder model with dropout and drop path off, so training is deterministic."""
    return GroundingDINOConfig(
        backbone=SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                            drop_path_rate=0.0),
        text=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0),
        hidden_dim=32, num_queries=10, encoder_layers=1, decoder_layers=2, encoder_heads=4,
        decoder_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_text_len=32,
        fusion_drop_path=0.0)


def test_tiny_detector_overfits_one_batch(tokenizer):
    """200 AdamW steps (lr 3e-3, linear decay to 0) on 2 random 64x64 images with 2 and 1 boxes.

    The path is chaotic (the matching switches queries; sampling points of the reference init sit
    exactly on cell edges, where bilinear sampling has one-sided gradients, so float rounding picks
    a side): after 100 steps, 2 of 4 seeds were still at L1 0.15-0.24 with either deformable
    attention implementation (grid_sample or the gather); after 200 steps all 8 runs reached
    L1 <= 0.005 and 1 - GIoU <= 0.02. Asserted with margin: total below 0.3 of its step-10 value
    and below 0.02 of its start, L1 < 0.05, 1 - GIoU < 0.15.
    """
    config = tiny_detector_config()
    torch.manual_seed(0)
    model = build_model(config).train()
    encoded = tokenizer(["cat . remote control ."] * 2, return_tensors="pt", padding=True)
    input_ids, token_mask = encoded["input_ids"], encoded["attention_mask"].bool()
    spans = phrase_token_spans(input_ids[0].tolist())
    assert len(spans) == 2

    def positive_map(phrases):
        rows = torch.zeros(len(phrases), config.max_text_len, dtype=torch.bool)
        for row, phrase in enumerate(phrases):
            rows[row, slice(*spans[phrase])] = True
        return rows

    targets = [DetectionTarget(torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]),
                               positive_map([0, 1]), torch.tensor([1, 2])),
               DetectionTarget(torch.tensor([[0.5, 0.5, 0.4, 0.5]]), positive_map([1]),
                               torch.tensor([2]))]
    pixels = torch.randn(2, 3, 64, 64)
    criterion = SetCriterion()
    steps = 200
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    history = []
    for _ in range(steps):
        output = model(pixels, input_ids, token_mask, return_aux=True)
        total, components = criterion(output, targets, token_mask)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        schedule.step()
        history.append(total.item())
    assert history[-1] < 0.3 * history[10], history[::10]
    assert history[-1] < 0.02 * history[0], history[::10]
    assert components["loss_l1"] < 0.05 and components["loss_giou"] < 0.15, components
