"""Sub-sentence level text features (paper §3.4): phrase-block attention masks and position ids.

The paper lets every word attend only to the words of its own phrase ("sub-sentence"), so that
unrelated category names in one caption do not influence each other. Phrases are delimited by
special tokens ([CLS], [SEP], "." and "?"). This module holds pure functions on token ids; the
tokenizer stays outside (special ids come in as arguments, with bert-base-uncased defaults).

Behaviour follows the reference `generate_masks_with_special_tokens_and_transfer_map`
(GroundingDINO `bertwarper.py:224-273`; transformers `modeling_grounding_dino.py` has a vectorised
port), with one deliberate deviation for batch invariance, documented on `sub_sentence_masks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# [CLS], [SEP], "." and "?" in the bert-base-uncased vocabulary (reference `groundingdino.py:119`).
BERT_SPECIAL_TOKEN_IDS: tuple[int, ...] = (101, 102, 1012, 1029)


def sub_sentence_masks(
    input_ids: Tensor,
    token_mask: Tensor,
    special_token_ids: Sequence[int] = BERT_SPECIAL_TOKEN_IDS,
) -> tuple[Tensor, Tensor]:
    """Phrase-block self-attention mask and per-phrase position ids for a batch of captions.

    Rules (per row, `last` = the row's last real column):
    - every token attends to itself (identity start) and has position 0 unless set below;
    - a special token at column 0 or at column `last` (normally [CLS] and [SEP]) keeps only its
      diagonal and position 0;
    - any other special token at column c closes a phrase: the tokens after the previous special
      token up to and including c (so the "." belongs to its phrase) all attend to each other and
      get positions 0, 1, ..., in order;
    - tokens after the last phrase-closing special token that are not closed by one keep identity
      and position 0, and so do padding tokens.

    Deviation from the reference: the reference treats a special token at the last column of
    the *padded batch* as [SEP]-like, so in a padded batch a shorter caption's [SEP] joins its
    last phrase. We use each row's own last real column, so every row gets exactly the masks it
    would get alone. For a batch of one and for the longest row this equals the reference. Like
    the reference (`previous_col` starts at 0), column 0 never joins a phrase, which only matters
    if a caption does not start with [CLS].

    Computed without loops or host-device syncs: a token's phrase is the number of special
    tokens before it (a cumulative sum), and its phrase is closed iff a special token lies
    between it and the row's last real column.

    Args:
        input_ids: (B, n) long token ids, padded on the right.
        token_mask: (B, n) bool, True = real token (the tokenizer's attention mask); padding
            tokens are never treated as special.
        special_token_ids: ids that delimit phrases; bert-base-uncased [CLS], [SEP], ".", "?"
            by default.

    Returns:
        attention_mask: (B, n, n) bool, True = query token (row) may attend to key token (column).
        position_ids: (B, n) long, position of each token inside its phrase (0 outside phrases).
    """
    batch_size, length = input_ids.shape
    device = input_ids.device
    token_mask = token_mask.bool()
    special = torch.zeros_like(token_mask)
    for token_id in special_token_ids:
        special = special | (input_ids == token_id)
    special = special & token_mask
    columns = torch.arange(length, device=device).expand(batch_size, length)  # (B, n)
    last_real = token_mask.sum(dim=1, keepdim=True) - 1  # (B, 1); -1 for an all-padding row

    # phrase[b, i] = number of special tokens before column i: equal for the tokens that end at
    # the same special token (which carries the same number as the tokens before it).
    special_count = special.long().cumsum(dim=1)  # (B, n), inclusive
    phrase = special_count - special.long()  # (B, n), exclusive
    # Special tokens strictly before `last`; a token's phrase is closed iff one lies in [i, last).
    # (Rows with last < 1 have no phrase at all; the clamp only keeps the gather in range.)
    before_last = special_count.gather(1, (last_real - 1).clamp(min=0))  # (B, 1)
    in_phrase = (before_last > phrase) & (columns >= 1) & (columns < last_real)  # (B, n)

    same_phrase = phrase[:, :, None] == phrase[:, None, :]  # (B, n, n)
    attention_mask = same_phrase & in_phrase[:, :, None] & in_phrase[:, None, :]
    attention_mask = attention_mask | torch.eye(length, dtype=torch.bool, device=device)

    # Column of the closest special token strictly before each token (0 if none, as the reference).
    special_columns = torch.where(special, columns, torch.zeros_like(columns))
    previous_special = special_columns.cummax(dim=1).values  # (B, n), inclusive
    previous_special = torch.cat(
        [torch.zeros_like(previous_special[:, :1]), previous_special[:, :-1]], dim=1
    )  # (B, n), exclusive
    position_ids = torch.where(in_phrase, columns - previous_special - 1, torch.zeros_like(columns))
    return attention_mask, position_ids


def phrase_token_spans(
    input_ids: Sequence[int],
    separator_ids: Sequence[int] = BERT_SPECIAL_TOKEN_IDS,
) -> list[tuple[int, int]]:
    """Token spans of the phrases of one tokenized caption.

    Args:
        input_ids: the token ids of ONE caption without padding (e.g. `[101, ..., 102]`).
        separator_ids: ids that delimit phrases and belong to none ([CLS], [SEP], ".", "?" of
            bert-base-uncased by default).

    Returns:
        `[start, end)` token index spans of each non-empty phrase, in order, without separators.
        "a cat . a remote control ." -> `[(1, 3), (4, 7)]`.
    """
    separators = set(separator_ids)
    spans = []
    start = 0
    for index, token_id in enumerate(input_ids):
        if int(token_id) in separators:
            if index > start:
                spans.append((start, index))
            start = index + 1
    if len(input_ids) > start:
        spans.append((start, len(input_ids)))
    return spans
