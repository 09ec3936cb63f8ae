"""COCO-format training data: captions and spans, targets, augmentation, bad files, batches."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from grounding.captions import CaptionBuilder, clean_category_name, distractor_vocabulary
from grounding.dataset import CocoGroundingDataset, collate, load_image
from tests.coco_files import CATEGORIES, IMAGES, write_coco


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path)


def make_dataset(coco, tokenizer, **options):
    options.setdefault("train", True)
    options.setdefault("sizes", (64,))
    return CocoGroundingDataset(*coco, tokenizer, **options)


def expected_boxes(image_id: int) -> dict[int, list[list[float]]]:
    """Category id -> normalised cx, cy, w, h boxes from IMAGES."""
    width, height, boxes = IMAGES[image_id]
    expected: dict[int, list[list[float]]] = {}
    for cid, x, y, w, h in boxes:
        expected.setdefault(cid, []).append([(x + w / 2) / width, (y + h / 2) / height,
                                             w / width, h / height])
    return expected


def test_caption_holds_positives_and_negatives_with_exact_spans(coco, tokenizer):
    dataset = make_dataset(coco, tokenizer, negatives=3)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index, record in enumerate(dataset.records):
            sample = dataset[index]
            positives = set(record.category_ids.tolist())
            assert positives <= set(sample.phrase_category_ids)
            assert len(sample.phrase_category_ids) == len(positives) + 3
            names = [clean_category_name(CATEGORIES[cid]) for cid in sample.phrase_category_ids]
            assert sample.caption == " . ".join(names) + " ."
            ids = sample.input_ids.tolist()
            assert ids == tokenizer(sample.caption)["input_ids"]
            for (start, end), name in zip(sample.phrase_spans, names, strict=True):
                assert tokenizer.decode(ids[start:end]) == name
            spans = dict(zip(sample.phrase_category_ids, sample.phrase_spans, strict=True))
            target = sample.target
            assert target.positive_map.shape == (len(target), 256)
            for row, cid in enumerate(target.category_ids.tolist()):
                start, end = spans[cid]
                assert target.positive_map[row].nonzero().flatten().tolist() == list(
                    range(start, end))


def test_multi_word_and_wordpiece_names_get_their_own_tokens(tokenizer):
    builder = CaptionBuilder({1: "Hair drier", 2: "traffic light", 3: "St. Bernard"}, tokenizer)
    caption = builder.build([3, 1, 2])
    assert caption.text == "st bernard . hair drier . traffic light ."
    assert caption.input_ids == tokenizer(caption.text)["input_ids"]
    decoded = [tokenizer.decode(caption.input_ids[start:end]) for start, end in
               caption.phrase_spans]
    assert decoded == ["st bernard", "hair drier", "traffic light"]
    assert caption.phrase_spans[1][1] - caption.phrase_spans[1][0] == 3  # hair, dr, ##ier


def test_negatives_are_sampled_and_vary(coco, tokenizer):
    dataset = make_dataset(coco, tokenizer, negatives=2)
    captions = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        captions.add(dataset[0].caption)
    assert len(captions) > 1
    empty_image = dataset[3]  # no boxes: the caption is negatives only
    assert len(empty_image.target) == 0 and len(empty_image.phrase_category_ids) == 2


def test_distractors_are_unknown_words_that_no_box_points_at(coco, tokenizer):
    dataset = make_dataset(coco, tokenizer, negatives=1, distractors=3)
    name_words = {word for name in CATEGORIES.values() for word in name.lower().split()}
    seen = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        distractors = [i for i, cid in enumerate(sample.phrase_category_ids) if cid < 0]
        assert sorted(sample.phrase_category_ids[i] for i in distractors) == [-3, -2, -1]
        ids = sample.input_ids.tolist()
        assert ids == tokenizer(sample.caption)["input_ids"], "spans must be the tokenizer's"
        for index in distractors:
            start, end = sample.phrase_spans[index]
            words = tokenizer.decode(ids[start:end]).split()
            assert 1 <= len(words) <= 3 and not name_words & set(words)
            seen.add(" ".join(words))
        # Only the image's own categories carry boxes.
        assert set(sample.target.category_ids.tolist()) == set(dataset.records[0].category_ids)
    assert len(seen) >= 8, "distractors vary"
    evaluation = make_dataset(coco, tokenizer, train=False, negatives=1, distractors=3)
    assert min(evaluation[0].phrase_category_ids) > 0, "evaluation captions have none"


def test_distractor_vocabulary_avoids_the_category_words(tokenizer):
    words = distractor_vocabulary(tokenizer, ["red circle", "Traffic light"])
    assert {"dog", "car", "person"} <= set(words)
    assert not {"red", "circle", "circles", "traffic", "light", "lights"} & set(words)
    assert all(word.isalpha() and word.isascii() and len(word) >= 3 for word in words)


def test_small_max_text_len_drops_distractors_before_positives(tokenizer):
    builder = CaptionBuilder({1: "red square", 2: "blue circle"}, tokenizer, max_text_len=8,
                             distractor_words=["dog", "lamp"])
    for seed in range(5):
        caption = builder.sample([1, 2], 0, np.random.default_rng(seed), distractors=4)
        assert sorted(caption.category_ids) == [1, 2] and len(caption.input_ids) == 8


def test_small_max_text_len_drops_negatives_then_positives(coco, tokenizer):
    # Image 1 has "red square" and "blue circle": [CLS] red square . blue circle . [SEP] = 8.
    fits = make_dataset(coco, tokenizer, negatives=5, max_text_len=8)
    sample = fits[0]
    assert sorted(sample.phrase_category_ids) == [1, 2]
    assert len(sample.input_ids) == 8 and len(sample.target) == 2
    assert sample.target.positive_map.shape == (2, 8)

    tight = make_dataset(coco, tokenizer, negatives=5, max_text_len=6, flip_prob=0.0)
    for epoch in range(4):
        tight.set_epoch(epoch)
        sample = tight[0]
        assert len(sample.input_ids) <= 6
        assert len(sample.phrase_category_ids) == 1
        kept = sample.phrase_category_ids[0]
        assert kept in (1, 2)
        assert sample.target.category_ids.tolist() == [kept]
        torch.testing.assert_close(sample.target.boxes,
                                   torch.tensor(expected_boxes(1)[kept]))


def test_flip_mirrors_boxes_and_pixels(coco, tokenizer):
    plain = make_dataset(coco, tokenizer, flip_prob=0.0)
    flipped = make_dataset(coco, tokenizer, flip_prob=1.0)
    for index in range(3):
        a, b = plain[index], flipped[index]
        assert a.caption == b.caption
        expected = a.target.boxes.clone()
        expected[:, 0] = 1 - expected[:, 0]
        torch.testing.assert_close(b.target.boxes, expected)
        torch.testing.assert_close(b.pixels, a.pixels.flip(-1))


def test_resize_keeps_normalised_boxes(coco, tokenizer):
    small = make_dataset(coco, tokenizer, flip_prob=0.0, sizes=(48,))
    large = make_dataset(coco, tokenizer, flip_prob=0.0, sizes=(160,))
    a, b = small[0], large[0]
    assert a.pixels.shape == (3, 48, 72) and b.pixels.shape == (3, 160, 240)
    torch.testing.assert_close(a.target.boxes, b.target.boxes)
    for cid, box in zip(a.target.category_ids.tolist(), a.target.boxes.tolist(), strict=True):
        assert box in [pytest.approx(expected) for expected in expected_boxes(1)[cid]]
    assert a.original_size == (96, 64)


def test_multi_scale_sizes_are_drawn_from_the_list(coco, tokenizer):
    dataset = make_dataset(coco, tokenizer, sizes=(32, 48, 64))
    shorts = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        shorts.add(min(dataset[0].pixels.shape[1:]))
    assert shorts <= {32, 48, 64} and len(shorts) > 1


def test_eval_mode_is_deterministic_and_unaugmented(coco, tokenizer):
    dataset = make_dataset(coco, tokenizer, train=False, sizes=None)
    first = dataset[1]
    dataset.set_epoch(7)
    again = dataset[1]
    assert first.caption == again.caption
    torch.testing.assert_close(first.pixels, again.pixels)
    assert first.pixels.shape == (3, 1000, 800)  # short side 800 by default
    for cid, box in zip(first.target.category_ids.tolist(), first.target.boxes.tolist(),
                        strict=True):
        assert box in [pytest.approx(expected) for expected in expected_boxes(2)[cid]]


def test_same_seed_epoch_and_index_give_the_same_item(coco, tokenizer):
    one, two = make_dataset(coco, tokenizer), make_dataset(coco, tokenizer)
    one.set_epoch(3)
    two.set_epoch(3)
    for index in (2, 0, 1):  # order of access does not matter
        a, b = one[index], two[index]
        assert a.caption == b.caption
        torch.testing.assert_close(a.pixels, b.pixels)
        torch.testing.assert_close(a.target.boxes, b.target.boxes)
    other_seed = make_dataset(coco, tokenizer, seed=1)
    other_seed.set_epoch(3)
    assert any(other_seed[i].caption != one[i].caption for i in range(4))


def test_bad_images_and_annotations_are_skipped_with_a_warning(tmp_path, tokenizer, caplog):
    extra = [
        {"id": 501, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]},
        {"id": 502, "image_id": 1, "category_id": 42, "bbox": [1, 2, 30, 30]},
        {"id": 503, "image_id": 1, "category_id": 1, "bbox": [1, 2, "wide", 30]},
        {"id": 504, "image_id": 77, "category_id": 1, "bbox": [1, 2, 30, 30]},
        {"id": 505, "image_id": 1, "category_id": 3, "bbox": [1, 2, 30, 30], "iscrowd": 1},
        {"id": 506, "image_id": 1, "category_id": 3, "bbox": [1, 2, 0.5, 30]},
        {"id": 507, "image_id": 1, "category_id": 4, "bbox": [80, 40, 60, 60]},
    ]
    coco = write_coco(tmp_path, extra, corrupt_image=True)
    with caplog.at_level(logging.WARNING, logger="grounding.dataset"):
        dataset = make_dataset(coco, tokenizer, flip_prob=0.0)
    messages = caplog.text
    for annotation_id in (501, 502, 503, 504):
        assert f"annotation {annotation_id}" in messages
    assert "505" not in messages and "506" not in messages  # crowd and tiny: skipped quietly
    record = dataset.records[0]
    assert sorted(record.category_ids.tolist()) == [1, 2, 4]
    clipped = record.boxes[record.category_ids == 4][0]
    np.testing.assert_allclose(clipped, [80, 40, 96, 64])  # clipped to the 96 x 64 image

    assert len(dataset) == 5
    broken = [i for i, r in enumerate(dataset.records) if r.file_name == "broken.jpg"][0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grounding.dataset"):
        assert dataset[broken] is None
    assert "broken.jpg" in caplog.text
    samples = [dataset[i] for i in range(len(dataset))]
    batch = collate(samples)
    assert len(batch) == 4 and 99 not in batch.image_ids
    assert collate([None, None]) is None


def test_collate_pads_images_and_captions(coco, tokenizer):
    dataset = make_dataset(coco, tokenizer, train=False, sizes=(64,), negatives=2)
    samples = [dataset[0], dataset[1], dataset[2]]
    batch = collate(samples, pad_token_id=dataset.pad_token_id)
    heights = [s.pixels.shape[1] for s in samples]
    widths = [s.pixels.shape[2] for s in samples]
    assert batch.pixels.shape == (3, 3, max(heights), max(widths))
    assert batch.padding_mask is not None
    for row, sample in enumerate(samples):
        height, width = heights[row], widths[row]
        torch.testing.assert_close(batch.pixels[row, :, :height, :width], sample.pixels)
        assert not batch.padding_mask[row, :height, :width].any()
        assert batch.padding_mask[row].sum() == max(heights) * max(widths) - height * width
        length = len(sample.input_ids)
        assert batch.input_ids[row, :length].tolist() == sample.input_ids.tolist()
        assert (batch.input_ids[row, length:] == 0).all()
        assert batch.token_mask[row].tolist() == [True] * length + [False] * (
            batch.input_ids.shape[1] - length)
        assert batch.targets[row].positive_map.shape[1] == 256
    assert batch.input_ids.shape[1] == max(len(s.input_ids) for s in samples)
    assert batch.image_ids == [1, 2, 3]
    assert batch.original_sizes == [(96, 64), (64, 80), (120, 90)]
    assert batch.phrase_category_ids == [s.phrase_category_ids for s in samples]
    same_size = collate([dataset[0], dataset[0]])
    assert same_size.padding_mask is None


def test_exif_orientation_follows_the_annotation_size(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = stored.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif)
    assert load_image(path).size == (20, 40)
    assert load_image(path, expected_size=(20, 40)).size == (20, 40)
    assert load_image(path, expected_size=(40, 20)).size == (40, 20)  # annotated unrotated
    with pytest.raises(ValueError, match="annotations say"):
        load_image(path, expected_size=(30, 30))
