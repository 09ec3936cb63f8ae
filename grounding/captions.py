"""Detection captions for training (paper §3.5): category names as phrases, with token spans.

Open-GroundingDino's recipe for detection data (`datasets/odvg.py`): the caption of an image is its
positive category names plus randomly sampled negative names, shuffled, written
`" . ".join(names) + " ."`. A box is supervised on the tokens of its category's phrase.

Distractors (optional, not in the recipe): phrases of random vocabulary words that name nothing in
the dataset ("dog", "a lamp"), with no boxes. On a dataset of a few categories the negatives are
always the same names, so without them a model learns nothing about words it never saw and may
answer "a dog" with confident boxes; distractors teach it that an unknown name finds nothing.

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
# Distractor phrases: 1 or 2 words, "a " before a quarter of them (prompts often start so).
_ARTICLE_PROBABILITY = 0.25
_MIN_WORD_LENGTH = 3


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
        category_ids: per phrase, the dataset category id it names; distractors get -1, -2, ...
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
        distractor_words: whole-word vocabulary entries distractor phrases are drawn from
            (`distractor_vocabulary`); empty: no distractors.

    Raises:
        ValueError: a name is empty once cleaned, or the tokenizer does not tokenize the caption
            as the concatenation of its names' tokens (not a WordPiece-style tokenizer).
    """

    def __init__(
        self,
        category_names: Mapping[int, str],
        tokenizer,
        max_text_len: int = 256,
        distractor_words: Sequence[str] = (),
    ) -> None:
        self.max_text_len = max_text_len
        self.names = {int(cid): clean_category_name(name) for cid, name in category_names.items()}
        empty = [cid for cid, name in self.names.items() if not name]
        if empty:
            raise ValueError(f"categories {empty} have no name left once cleaned")
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.dot_id = tokenizer.convert_tokens_to_ids(".")
        self.name_ids = {
            cid: list(tokenizer(name, add_special_tokens=False)["input_ids"])
            for cid, name in self.names.items()
        }
        self._check_tokenization(tokenizer)
        self.distractor_words = list(distractor_words)
        self.distractor_ids = tokenizer.convert_tokens_to_ids(self.distractor_words)
        self.article_id = tokenizer.convert_tokens_to_ids("a")

    def _check_tokenization(self, tokenizer) -> None:
        ids = list(self.names)
        for start in range(0, len(ids), _CHECK_CHUNK):
            chunk = ids[start : start + _CHECK_CHUNK]
            caption = self.build(chunk, check_length=False)
            actual = list(tokenizer(caption.text)["input_ids"])
            if actual != caption.input_ids:
                raise ValueError(
                    f"the tokenizer does not split {caption.text!r} at its phrases "
                    "(expected a WordPiece tokenizer such as bert-base-uncased)"
                )

    def length(self, category_ids: Sequence[int]) -> int:
        """Tokens of the caption naming `category_ids`, [CLS] and [SEP] included."""
        return 2 + sum(len(self.name_ids[cid]) + 1 for cid in category_ids)

    def build(self, category_ids: Sequence[int], check_length: bool = True) -> Caption:
        """The caption naming `category_ids` in this order.

        Raises:
            ValueError: it would have more than `max_text_len` tokens.
        """
        if check_length and self.length(category_ids) > self.max_text_len:
            raise ValueError(
                f"the caption of {len(category_ids)} names has "
                f"{self.length(category_ids)} tokens, over {self.max_text_len}"
            )
        return self._assemble(
            [(int(cid), self.names[cid], self.name_ids[cid]) for cid in category_ids]
        )

    def _assemble(self, phrases: Sequence[tuple[int, str, list[int]]]) -> Caption:
        """The caption of (category id, text, token ids) phrases, in this order."""
        input_ids, spans = [self.cls_id], []
        for _, _, ids in phrases:
            start = len(input_ids)
            input_ids.extend(ids)
            spans.append((start, len(input_ids)))
            input_ids.append(self.dot_id)
        input_ids.append(self.sep_id)
        text = SEPARATOR.join(name for _, name, _ in phrases) + " ."
        return Caption(text, input_ids, spans, [cid for cid, _, _ in phrases])

    def _distractor(self, rng: np.random.Generator) -> tuple[str, list[int]]:
        """One distractor phrase (text, token ids): 1 or 2 random words, sometimes after "a"."""
        picks = rng.choice(len(self.distractor_words), size=int(rng.integers(1, 3)))
        words = [self.distractor_words[i] for i in picks]
        ids = [self.distractor_ids[i] for i in picks]
        if rng.random() < _ARTICLE_PROBABILITY:
            words, ids = ["a", *words], [self.article_id, *ids]
        return " ".join(words), ids

    def sample(
        self,
        positive_ids: Sequence[int],
        negatives: int,
        rng: np.random.Generator,
        distractors: int = 0,
    ) -> Caption:
        """Positives plus up to `negatives` random other categories and `distractors` distractor
        phrases (only with `distractor_words`), shuffled, fitted to length.

        Fitting, in the shuffled order: while the caption is over `max_text_len` tokens, the last
        negative or distractor is dropped; once none is left, the last positive is dropped (the
        caller must then drop that category's boxes: `Caption.category_ids` lists what remains).
        A caption always names at least one category when the dataset has any that fits.

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
        phrases = [(cid, self.names[cid], self.name_ids[cid]) for cid in positives + chosen]
        if self.distractor_words:
            phrases += [(-1 - k, *self._distractor(rng)) for k in range(max(distractors, 0))]
        phrases = [phrases[i] for i in rng.permutation(len(phrases))]
        total = 2 + sum(len(ids) + 1 for _, _, ids in phrases)
        for remove_positives in (False, True):
            for position in range(len(phrases) - 1, -1, -1):
                if total <= self.max_text_len:
                    break
                if (phrases[position][0] in positive_set) == remove_positives:
                    total -= len(phrases[position][2]) + 1
                    del phrases[position]
        return self._assemble(phrases)


def distractor_vocabulary(tokenizer, category_names: Sequence[str]) -> list[str]:
    """Whole English words of the tokenizer's vocabulary (ASCII letters, 3+ characters, no "##"
    pieces) that share no word with a category name and contain none of them ("circles" for
    "circle"): what distractor phrases are made of."""
    name_words = {word for name in category_names for word in clean_category_name(name).split()}
    return sorted(
        token
        for token in tokenizer.get_vocab()
        if token.isascii()
        and token.isalpha()
        and token.islower()
        and len(token) >= _MIN_WORD_LENGTH
        and not any(word in token for word in name_words)
    )
