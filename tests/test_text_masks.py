"""Sub-sentence masks and phrase spans (grounding/text_masks.py)."""

import pytest
import torch
from transformers.models.grounding_dino.modeling_grounding_dino import (
    generate_masks_with_special_tokens_and_transfer_map,
)

from grounding.text_masks import BERT_SPECIAL_TOKEN_IDS, phrase_token_spans, sub_sentence_masks

CAPTIONS = [
    "a cat . a remote control .",
    "is it a dog? a cat.",
    "a cat . a remote",
    "two dogs . . grass ? a very long phrase with many words .",
]


def _blocks(mask: torch.Tensor) -> list[set[int]]:
    """The distinct rows of a (n, n) mask as sets of columns."""
    blocks = []
    for row in mask:
        block = set(torch.nonzero(row).flatten().tolist())
        if block not in blocks:
            blocks.append(block)
    return blocks


def _single(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.tensor([ids])
    mask, positions = sub_sentence_masks(input_ids, torch.ones_like(input_ids, dtype=torch.bool))
    return mask[0], positions[0]


def _reference_loop(ids: list[int], length: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference walk over special tokens (bertwarper.py:224-273) for one row of `length`
    columns, with `last` as the [SEP]-like column (the reference: length - 1; ours: last real)."""
    mask = torch.eye(length, dtype=torch.bool)
    positions = torch.zeros(length, dtype=torch.long)
    previous = 0
    for column, token in enumerate(ids):
        if token not in BERT_SPECIAL_TOKEN_IDS:
            continue
        if column in (0, last):
            mask[column, column] = True
            positions[column] = 0
        else:
            mask[previous + 1:column + 1, previous + 1:column + 1] = True
            positions[previous + 1:column + 1] = torch.arange(column - previous)
        previous = column
    return mask, positions


def test_hand_checked_caption(tokenizer):
    ids = tokenizer("a cat . a remote control .")["input_ids"]
    assert ids == [101, 1037, 4937, 1012, 1037, 6556, 2491, 1012, 102]
    mask, positions = _single(ids)
    assert mask.dtype == torch.bool and mask.shape == (9, 9)
    assert positions.dtype == torch.long
    assert positions.tolist() == [0, 0, 1, 2, 0, 1, 2, 3, 0]
    assert _blocks(mask) == [{0}, {1, 2, 3}, {4, 5, 6, 7}, {8}]


def test_question_mark_separates(tokenizer):
    ids = tokenizer("is it a dog? a cat.")["input_ids"]
    assert ids == [101, 2003, 2009, 1037, 3899, 1029, 1037, 4937, 1012, 102]
    mask, positions = _single(ids)
    assert positions.tolist() == [0, 0, 1, 2, 3, 4, 0, 1, 2, 0]
    assert _blocks(mask) == [{0}, {1, 2, 3, 4, 5}, {6, 7, 8}, {9}]


def test_caption_without_final_period(tokenizer):
    ids = tokenizer("a cat . a remote")["input_ids"]
    assert ids == [101, 1037, 4937, 1012, 1037, 6556, 102]
    mask, positions = _single(ids)
    # The unterminated last phrase stays identity-only, as in the reference.
    assert positions.tolist() == [0, 0, 1, 2, 0, 0, 0]
    assert _blocks(mask) == [{0}, {1, 2, 3}, {4}, {5}, {6}]


def test_padded_batch_rows_equal_each_caption_alone(tokenizer):
    captions = ["a cat .", "a remote control . a cat .", "is it a dog? a cat"]
    batch = tokenizer(captions, padding="longest", return_tensors="pt")
    token_mask = batch["attention_mask"].bool()
    mask, positions = sub_sentence_masks(batch["input_ids"], token_mask)
    length = batch["input_ids"].shape[1]
    for row, caption in enumerate(captions):
        ids = tokenizer(caption)["input_ids"]
        alone_mask, alone_positions = _single(ids)
        real = len(ids)
        assert torch.equal(mask[row, :real, :real], alone_mask)
        assert torch.equal(positions[row, :real], alone_positions)
        # Padding: identity rows, position 0, and no real token attends to it.
        assert torch.equal(mask[row, real:], torch.eye(length, dtype=torch.bool)[real:])
        assert not mask[row, :real, real:].any()
        assert not positions[row, real:].any()


@pytest.mark.parametrize("caption", CAPTIONS)
def test_equals_transformers_on_single_caption(tokenizer, caption):
    input_ids = torch.tensor([tokenizer(caption)["input_ids"]])
    ours = sub_sentence_masks(input_ids, torch.ones_like(input_ids, dtype=torch.bool))
    theirs = generate_masks_with_special_tokens_and_transfer_map(
        input_ids, torch.tensor(BERT_SPECIAL_TOKEN_IDS))
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])


def test_equals_transformers_on_longest_row(tokenizer):
    batch = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    ours = sub_sentence_masks(batch["input_ids"], batch["attention_mask"].bool())
    theirs = generate_masks_with_special_tokens_and_transfer_map(
        batch["input_ids"], torch.tensor(BERT_SPECIAL_TOKEN_IDS))
    longest = int(batch["attention_mask"].sum(1).argmax())
    assert torch.equal(ours[0][longest], theirs[0][longest])
    assert torch.equal(ours[1][longest], theirs[1][longest])
    # The documented deviation: a shorter caption's [SEP] stays alone with us, not in theirs.
    shortest = int(batch["attention_mask"].sum(1).argmin())
    sep = int(batch["attention_mask"][shortest].sum()) - 1
    assert ours[0][shortest, sep].sum() == 1
    assert theirs[0][shortest, sep].sum() > 1


def test_equals_reference_loop_on_random_rows():
    generator = torch.Generator().manual_seed(0)
    alphabet = torch.tensor([*BERT_SPECIAL_TOKEN_IDS, 2000, 2001, 2002, 2003])
    batch_size, length = 64, 12
    input_ids = alphabet[torch.randint(len(alphabet), (batch_size, length), generator=generator)]
    lengths = torch.randint(0, length + 1, (batch_size,), generator=generator)
    token_mask = torch.arange(length)[None] < lengths[:, None]
    input_ids = input_ids.masked_fill(~token_mask, 0)
    input_ids[: batch_size // 2, 0] = 101
    mask, positions = sub_sentence_masks(input_ids, token_mask)
    for row in range(batch_size):
        real = int(lengths[row])
        expected_mask, expected_positions = _reference_loop(
            input_ids[row, :real].tolist(), length, real - 1)
        assert torch.equal(mask[row], expected_mask), row
        assert torch.equal(positions[row], expected_positions), row


def test_custom_special_ids_and_meta_device():
    # Ids of another vocabulary; the meta device proves there is no data-dependent host access.
    input_ids = torch.tensor([[7, 1, 1, 8, 1, 8, 9]])
    token_mask = torch.ones_like(input_ids, dtype=torch.bool)
    mask, positions = sub_sentence_masks(input_ids, token_mask, special_token_ids=(7, 8, 9))
    assert positions.tolist() == [[0, 0, 1, 2, 0, 1, 0]]
    assert _blocks(mask[0]) == [{0}, {1, 2, 3}, {4, 5}, {6}]
    meta_mask, meta_positions = sub_sentence_masks(input_ids.to("meta"), token_mask.to("meta"))
    assert meta_mask.shape == (1, 7, 7) and meta_positions.shape == (1, 7)


def test_phrase_token_spans(tokenizer):
    assert phrase_token_spans([101, 1037, 4937, 1012, 1037, 6556, 2491, 1012, 102]) == [
        (1, 3), (4, 7)]
    assert phrase_token_spans(tokenizer("is it a dog? a cat.")["input_ids"]) == [(1, 5), (6, 8)]
    assert phrase_token_spans(tokenizer("a cat . a remote")["input_ids"]) == [(1, 3), (4, 6)]
    # Empty phrases (". .") are skipped; a caption cut before [SEP] keeps its last phrase.
    assert phrase_token_spans([101, 1037, 1012, 1012, 4937, 1012, 102]) == [(1, 2), (4, 5)]
    assert phrase_token_spans([101, 1037, 4937, 1012, 1037, 6556]) == [(1, 3), (4, 6)]
    assert phrase_token_spans(torch.tensor([101, 5, 6, 102]), separator_ids=(101, 102)) == [
        (1, 3)]
