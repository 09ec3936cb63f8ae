"""Raw outputs -> detections: thresholds, one phrase per box, pixel boxes.

Reference `predict` (study §4): a query is kept when its max token probability over all columns
is > box_threshold, and that max is its score. Its label differs on purpose: the reference decodes
every token above text_threshold, which merges phrases ("cat remote control") and can show "[SEP]".
Here the label comes from ONE phrase, the one holding the query's best real token (separators and
[CLS]/[SEP] never count as its best token), built from that phrase's tokens above text_threshold,
or the whole phrase when none is. So a label is never empty, never merges phrases, and never shows
a special token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from grounding.box_ops import box_cxcywh_to_xyxy


@dataclass
class Detections:
    """Detections in one image.

    Attributes:
        boxes: (N, 4) float32, x0, y0, x1, y1 in the input image's pixels, clipped to the image.
        scores: (N,) float32, the box score (max token probability), descending.
        phrases: N labels, each drawn from one phrase of the prompt.
        phrase_ids: (N,) int64, index of that phrase in `prompt_phrases`.
        prompt_phrases: the prompt's phrases, in order (for legends and colours).
    """

    boxes: np.ndarray
    scores: np.ndarray
    phrases: list[str]
    phrase_ids: np.ndarray
    prompt_phrases: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.phrases)

    @classmethod
    def empty(cls, prompt_phrases: Sequence[str] = ()) -> Detections:
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            [],
            np.zeros(0, np.int64),
            list(prompt_phrases),
        )

    @classmethod
    def concatenate(cls, parts: Sequence[Detections]) -> Detections:
        """Join detections of one image (for example from several caption chunks), by score."""
        phrases: list[str] = []
        ids, offset = [], 0
        for part in parts:
            phrases.extend(part.phrases)
            ids.append(part.phrase_ids + offset)
            offset += len(part.prompt_phrases)
        prompt = [p for part in parts for p in part.prompt_phrases]
        if not phrases:
            return cls.empty(prompt)
        scores = np.concatenate([p.scores for p in parts])
        order = np.argsort(-scores, kind="stable")
        return cls(
            np.concatenate([p.boxes for p in parts])[order],
            scores[order],
            [phrases[i] for i in order],
            np.concatenate(ids)[order],
            prompt,
        )


def select_detections(
    logits: Tensor,
    boxes: Tensor,
    token_ids: Sequence[int],
    phrase_spans: Sequence[tuple[int, int]],
    decode: Callable[[list[int]], str],
    image_size: tuple[int, int],
    box_threshold: float,
    text_threshold: float,
    nms_threshold: float | None = None,
    continuation: Sequence[bool] | None = None,
) -> Detections:
    """Threshold one image's queries and label them.

    Args:
        logits: (Q, T) pre-sigmoid token scores, -inf beyond the caption (T >= len(token_ids)).
        boxes: (Q, 4) cx, cy, w, h normalised to the image.
        token_ids: the caption's token ids, [CLS] ... [SEP].
        phrase_spans: [start, end) token index spans of the phrases (no separators), in order.
        decode: token ids -> text (the tokenizer's `decode`).
        image_size: (width, height) of the input image in pixels.
        box_threshold: keep a query when its max token probability is > this.
        text_threshold: label tokens must have probability > this.
        nms_threshold: if set, per-phrase non-maximum suppression at this IoU (off by default,
            as in the reference).
        continuation: per token, whether it continues the previous token's word (WordPiece
            "##" pieces). A word enters a label whole when any of its pieces passes
            text_threshold, so labels never show half words such as "##s".
    """
    phrases = [decode(list(token_ids[start:end])) for start, end in phrase_spans]
    if not phrase_spans:
        return Detections.empty(phrases)
    probs = logits.float().sigmoid()  # (Q, T)
    scores, _ = probs.max(dim=1)
    keep = torch.nonzero(scores > box_threshold).flatten()
    if keep.numel() == 0:
        return Detections.empty(phrases)
    token_to_phrase = torch.full((probs.shape[1],), -1, dtype=torch.long)
    for index, (start, end) in enumerate(phrase_spans):
        token_to_phrase[start:end] = index
    real = torch.nonzero(token_to_phrase >= 0).flatten()
    kept_probs = probs[keep].cpu()
    best_real = real[kept_probs[:, real].argmax(dim=1)]
    phrase_ids = token_to_phrase[best_real]

    width, height = image_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    pixel_boxes = box_cxcywh_to_xyxy(boxes[keep].float().cpu()) * scale
    pixel_boxes[:, 0::2] = pixel_boxes[:, 0::2].clamp(0, width)
    pixel_boxes[:, 1::2] = pixel_boxes[:, 1::2].clamp(0, height)
    kept_scores = scores[keep].cpu()
    if nms_threshold is not None:
        from torchvision.ops import batched_nms

        survivors = batched_nms(pixel_boxes, kept_scores, phrase_ids, nms_threshold)
        kept_probs, pixel_boxes = kept_probs[survivors], pixel_boxes[survivors]
        kept_scores, phrase_ids = kept_scores[survivors], phrase_ids[survivors]
    order = torch.argsort(kept_scores, descending=True, stable=True)

    words = [_words(start, end, continuation) for start, end in phrase_spans]
    labels = []
    for row in order.tolist():
        phrase = int(phrase_ids[row])
        chosen = [
            token_ids[t]
            for word in words[phrase]
            if any(kept_probs[row, t] > text_threshold for t in word)
            for t in word
        ]
        labels.append(decode(chosen) if chosen else phrases[phrase])
    return Detections(
        boxes=pixel_boxes[order].numpy().astype(np.float32),
        scores=kept_scores[order].numpy().astype(np.float32),
        phrases=labels,
        phrase_ids=phrase_ids[order].numpy().astype(np.int64),
        prompt_phrases=phrases,
    )


def _words(start: int, end: int, continuation: Sequence[bool] | None) -> list[list[int]]:
    """Token indices of [start, end) grouped into words (a "##" piece joins the word before)."""
    words: list[list[int]] = []
    for index in range(start, end):
        if words and continuation is not None and continuation[index]:
            words[-1].append(index)
        else:
            words.append([index])
    return words
