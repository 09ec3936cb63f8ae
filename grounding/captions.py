"""Detection captions for training (paper §3.5): category names as phrases, with token spans.

Open-GroundingDino's recipe for detection data (`datasets/odvg.py`): the caption of an image is its
positive category names plus randomly sampled negative names, shuffled, written
`" . ".join(names) + " ."`. A box is supervised on the tokens of its category's phrase.

The caption's token ids are assembled from each name's tokens, tokenized once when the builder is
made: for BERT's WordPiece tokenizer (whitespace and punctuation split words before WordPiece
runs) that concatenation *is* the caption's tokenization, which the builder checks at construction
for every name, so spans are exact without a tokenizer call per sample.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SEPARATOR = " . "
# Checked against the tokenizer together (one call per this many names).
_CHECK_CHUNK = 16


def clean_category_name(name: str) -> str:
    """A category name as a caption phrase: lower case, single spaces, no phrase separators.

    "." and "?" would split the name into two phrases (they delimit phrases for the model), so
    they become spaces: "St. Bernard" -> "st bernard".
    """
    return " ".join(re.sub(r"[.?]", " ", name.lower()).split())


def category_prompt(names: Sequence[str]) -> str:
    """The caption naming every category: "a . b c ." (names cleaned, in the given order)."""
    return SEPARATOR.join(clean_category_name(name) for name in names) + " ."


@dataclass
class Caption:
    """A caption and where its phrases sit among its tokens.

    Attributes:
        text: `" . ".join(names) + " ."`.
        input_ids: the token ids of `text`, [CLS] ... [SEP], exactly as the tokenizer gives them.
        phrase_spans: per phrase, in caption order, the [start, end) token indices of its name
            (no separator).
        category_ids: per phrase, the dataset category id it names.
    """

    text: str
    input_ids: list[int]
    phrase_spans: list[tuple[int, int]]
    category_ids: list[int]


class CaptionBuilder:
    """Builds captions from category ids, within `max_text_len` tokens.

    Args:
        category_names: dataset category id -> name (cleaned here with `clean_category_name`).
        tokenizer: a BERT-style tokenizer (`__call__`, `cls_token_id`, `sep_token_id`,
            `convert_tokens_to_ids`).
        max_text_len: the most tokens a caption may have, [CLS] and [SEP] included.

    Raises:
        ValueError: a name is empty once cleaned, or the tokenizer does not tokenize the caption
            as the concatenation of its names' tokens (not a WordPiece-style tokenizer).
    """

    def __init__(self, category_names: Mapping[int, str], tokenizer, max_text_len: int = 256,
                 ) -> None:
        self.max_text_len = max_text_len
        self.names = {int(cid): clean_category_name(name) for cid, name in category_names.items()}
        empty = [cid for cid, name in self.names.items() if not name]
        if empty:
            raise ValueError(f"categories {empty} have no name left once cleaned")
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.dot_id = tokenizer.convert_tokens_to_ids(".")
        self.name_ids = {cid: list(tokenizer(name, add_special_tokens=False)["input_ids"])
                         for cid, name in self.names.items()}
        self._check_tokenization(tokenizer)

    def _check_tokenization(self, tokenizer) -> None:
        ids = list(self.names)
        for start in range(0, len(ids), _CHECK_CHUNK):
            chunk = ids[start:start + _CHECK_CHUNK]
            caption = self.build(chunk, check_length=False)
            actual = list(tokenizer(caption.text)["input_ids"])
            if actual != caption.input_ids:
                raise ValueError(f"the tokenizer does not split {caption.text!r} at its phrases "
                                 "(expected a WordPiece tokenizer such as bert-base-uncased)")

    def length(self, category_ids: Sequence[int]) -> int:
        """Tokens of the caption naming `category_ids`, [CLS] and [SEP] included."""
        return 2 + sum(len(self.name_ids[cid]) + 1 for cid in category_ids)

    def build(self, category_ids: Sequence[int], check_length: bool = True) -> Caption:
        """The caption naming `category_ids` in this order.

        Raises:
            ValueError: it would have more than `max_text_len` tokens.
        """
        if check_length and self.length(category_ids) > self.max_text_len:
            raise ValueError(f"the caption of {len(category_ids)} names has "
                             f"{self.length(category_ids)} tokens, over {self.max_text_len}")
        input_ids, spans = [self.cls_id], []
        for cid in category_ids:
            start = len(input_ids)
            input_ids.extend(self.name_ids[cid])
            spans.append((start, len(input_ids)))
            input_ids.append(self.dot_id)
        input_ids.append(self.sep_id)
        text = SEPARATOR.join(self.names[cid] for cid in category_ids) + " ."
        return Caption(text, input_ids, spans, [int(cid) for cid in category_ids])

    def sample(self, positive_ids: Sequence[int], negatives: int, rng: np.random.Generator,
               ) -> Caption:
        """Positives plus up to `negatives` random other categories, shuffled, fitted to length.

        Fitting, in the shuffled order: while the caption is over `max_text_len` tokens, the last
        negative is dropped; once no negative is left, the last positive is dropped (the caller
        must then drop that category's boxes: `Caption.category_ids` lists what remains). A
        caption always names at least one category when the dataset has any that fits.

        Args:
            positive_ids: the categories present in the image (duplicates ignored).
            negatives: how many absent categories to sample (fewer when fewer exist).
            rng: the sample's random generator (all randomness comes from it).
        """
        positives = list(dict.fromkeys(int(cid) for cid in positive_ids))
        positive_set = set(positives)
        absent = [cid for cid in self.names if cid not in positive_set]
        count = min(max(negatives, 0 if positives else 1), len(absent))
        chosen = [absent[i] for i in rng.choice(len(absent), size=count, replace=False)]
        order = [(positives + chosen)[i] for i in rng.permutation(len(positives) + len(chosen))]
        total = self.length(order)
        for remove_positives in (False, True):
            for position in range(len(order) - 1, -1, -1):
                if total <= self.max_text_len:
                    break
                if (order[position] in positive_set) == remove_positives:
                    total -= len(self.name_ids[order[position]]) + 1
                    del order[position]
        return self.build(order)
