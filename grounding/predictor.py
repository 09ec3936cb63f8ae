"""The user-facing detector: raw forward (`detect`) and thresholded detections (`predict`).

`predict` = `select(infer(image, caption), thresholds)`: `infer` runs the model once per image and
prompt and keeps the raw outputs, so changing thresholds later needs no model call.
Prompts over `max_text_len` tokens are split at phrase boundaries into several text passes over one
image encoding, so no phrase is lost (the reference silently drops everything past token 256).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from grounding.devices import default_device
from grounding.model import GroundingDINO, GroundingOutput, ImageFeatures
from grounding.postprocess import Detections, select_detections
from grounding.text_masks import phrase_token_spans, sub_sentence_masks
from grounding.transforms import preprocess, to_pil_rgb


@dataclass
class RawPrediction:
    """One image's unthresholded outputs for one prompt, on the CPU.

    Attributes:
        chunks: per caption chunk, (token ids, logits (Q, T), boxes (Q, 4) cx, cy, w, h).
        image_size: (width, height) of the input image.
    """

    chunks: list[tuple[list[int], Tensor, Tensor]]
    image_size: tuple[int, int]


def has_words(text) -> bool:
    """Whether `text` is a string that names something (holds a letter or a digit): the one test
    of an empty prompt, for the library, the CLI and the app."""
    return isinstance(text, str) and any(character.isalnum() for character in text)


def normalize_caption(caption: str) -> str:
    """Lower case, stripped, ending in "." (as the reference); rejects prompts with no words."""
    if not isinstance(caption, str):
        raise ValueError(f"the prompt must be a string, got {type(caption).__name__}")
    caption = caption.lower().strip()
    if not has_words(caption):
        raise ValueError(
            "the prompt is empty: name at least one thing to find, "
            "for example 'a cat . a remote control .'"
        )
    return caption if caption.endswith(".") else caption + "."


# The reference's resize: short side 800, long side at most 1333.
DEFAULT_IMAGE_SIZE, DEFAULT_MAX_SIZE = 800, 1333


@dataclass(frozen=True)
class EncodedImage:
    """One image through the detector's image encoder (`Detector.encode`), reusable for any
    caption of that image.

    Attributes:
        features: the multi-scale tokens and positions (`GroundingDINO.encode_image`).
        image_size: (W, H) of the image before the resize.
    """

    features: ImageFeatures
    image_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        features = self.features
        tensors = (features.tokens, features.position, features.padding_mask)
        return sum(t.element_size() * t.nelement() for t in tensors if t is not None)


class Detector:
    """Grounding DINO with its tokenizer on one device.

    Args:
        image_size, max_size: the resize `infer` applies (short side, longest side): the
            reference's 800 / 1333 for the official models; a checkpoint's own (its processor
            config) for models trained at other sizes, such as the small shapes model.
    """

    def __init__(
        self,
        model: GroundingDINO,
        tokenizer,
        device: str | torch.device | None = None,
        *,
        image_size: int = DEFAULT_IMAGE_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.image_size, self.max_size = image_size, max_size
        self.device = torch.device(device or default_device())
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.max_text_len = model.config.max_text_len
        # Phrase separators "." and "?", and [CLS]/[SEP], as this tokenizer numbers them.
        self.separator_ids = tuple(tokenizer.convert_tokens_to_ids([".", "?"]))
        self.special_token_ids = (
            tokenizer.cls_token_id,
            tokenizer.sep_token_id,
            *self.separator_ids,
        )

    @torch.inference_mode()
    def detect(
        self, pixels: Tensor, captions: str | Sequence[str], padding_mask: Tensor | None = None
    ) -> GroundingOutput:
        """The reference model's forward.

        Args:
            pixels: (B, 3, H, W) float, resized and normalised the reference way.
            captions: B captions, tokenized exactly as given; cut to max_text_len tokens as the
                reference does.
            padding_mask: (B, H, W) bool, True on padding, or None.

        Returns:
            logits (B, Q, max_text_len), -inf beyond each caption's tokens; boxes (B, Q, 4)
            cx, cy, w, h normalised to each unpadded image.
        """
        captions = [captions] if isinstance(captions, str) else list(captions)
        if len(captions) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(captions)} captions")
        tokens = self.tokenizer(captions, padding="longest", return_tensors="pt")
        input_ids = tokens["input_ids"].to(self.device)
        token_mask = tokens["attention_mask"].to(self.device).bool()
        # Masks come from the whole caption and are cut afterwards, as in the reference.
        attention, position_ids = sub_sentence_masks(input_ids, token_mask, self.special_token_ids)
        n = self.max_text_len
        features = self.model.encode_image(
            pixels.to(self.device), None if padding_mask is None else padding_mask.to(self.device)
        )
        return self.model.ground(
            features,
            input_ids[:, :n],
            token_mask[:, :n],
            text_masks=(attention[:, :n, :n], position_ids[:, :n]),
        )

    @torch.inference_mode()
    def encode(self, image: Image.Image | np.ndarray) -> EncodedImage:
        """The image encoder's part of `infer` (resize, Swin, projections), for any caption."""
        pil = to_pil_rgb(image)
        pixels = preprocess(pil, self.image_size, self.max_size)[None].to(self.device)
        return EncodedImage(self.model.encode_image(pixels), pil.size)

    @torch.inference_mode()
    def infer(
        self,
        image: Image.Image | np.ndarray,
        caption: str,
        *,
        encoded: EncodedImage | None = None,
    ) -> RawPrediction:
        """Run the model on one image and prompt; keep the raw outputs for `select`.

        `encoded`: this image's `encode`, to skip the image encoder (a new prompt on an image
        seen before).
        """
        caption = normalize_caption(caption)
        token_ids = self.caption_tokens(caption)
        if encoded is None:
            encoded = self.encode(image)
        features = encoded.features
        chunks = []
        for ids in split_caption_tokens(token_ids, self.max_text_len, self.separator_ids):
            input_ids = torch.tensor([ids], device=self.device)
            token_mask = torch.ones_like(input_ids, dtype=torch.bool)
            text_masks = sub_sentence_masks(input_ids, token_mask, self.special_token_ids)
            output = self.model.ground(features, input_ids, token_mask, text_masks=text_masks)
            chunks.append((ids, output.logits[0].float().cpu(), output.boxes[0].float().cpu()))
        return RawPrediction(chunks=chunks, image_size=encoded.image_size)

    def caption_tokens(self, caption: str) -> list[int]:
        """The token ids of a normalised caption.

        Raises:
            ValueError: none of its words is in the tokenizer's vocabulary (all "[UNK]", for
                example a prompt in a script the vocabulary lacks): every label would be "[UNK]".
        """
        token_ids = self.tokenizer(caption)["input_ids"]
        words = [i for i in token_ids if i not in self.special_token_ids]
        if words and all(i == self.tokenizer.unk_token_id for i in words):
            raise ValueError(
                "none of the prompt's words is known to the model (its vocabulary "
                "is English): name the objects in English, e.g. 'cat . dog .'"
            )
        return token_ids

    def select(
        self,
        raw: RawPrediction,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        nms_threshold: float | None = None,
    ) -> Detections:
        """Thresholded, labelled detections from raw outputs (no model call)."""
        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        parts = [
            select_detections(
                logits,
                boxes,
                ids,
                phrase_token_spans(ids, self.special_token_ids),
                self._decode,
                raw.image_size,
                box_threshold,
                text_threshold,
                nms_threshold,
                self._continuation(ids),
            )
            for ids, logits, boxes in raw.chunks
        ]
        return Detections.concatenate(parts)

    def predict(
        self,
        image: Image.Image | np.ndarray,
        caption: str,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        nms_threshold: float | None = None,
    ) -> Detections:
        """Boxes, scores and phrases for what the caption names.

        Args:
            image: a PIL image (any mode) or an H x W x 3 uint8 RGB array.
            caption: phrases separated by "." (lower-cased and completed with "." here).

        Returns:
            Detections with boxes x0, y0, x1, y1 in the input image's pixels; possibly empty.
        """
        return self.select(self.infer(image, caption), box_threshold, text_threshold, nms_threshold)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids).replace(" ##", "").strip()

    def _continuation(self, token_ids: list[int]) -> list[bool]:
        """Per token, whether it is a WordPiece continuation ("##...") of the word before."""
        return [token.startswith("##") for token in self.tokenizer.convert_ids_to_tokens(token_ids)]


def split_caption_tokens(
    token_ids: Sequence[int], max_len: int, separator_ids: Sequence[int]
) -> list[list[int]]:
    """Split [CLS] ... [SEP] at phrase boundaries into chunks of at most `max_len` tokens.

    Each chunk is again [CLS] phrases [SEP], exactly the tokens its phrases would get alone
    (a phrase ends with one of `separator_ids`).

    Raises:
        ValueError: a single phrase does not fit in one chunk.
    """
    if len(token_ids) <= max_len:
        return [list(token_ids)]
    body = list(token_ids[1:-1])
    phrases, current = [], []
    for token in body:
        current.append(token)
        if token in separator_ids:
            phrases.append(current)
            current = []
    if current:
        phrases.append(current)
    room = max_len - 2
    chunks, current = [], []
    for phrase in phrases:
        if len(phrase) > room:
            raise ValueError(
                f"one phrase of the prompt has {len(phrase)} tokens, more than the "
                f"{room} a pass can hold; shorten it or split it with '.'"
            )
        if len(current) + len(phrase) > room:
            chunks.append(current)
            current = []
        current = current + phrase
    chunks.append(current)
    return [[token_ids[0], *chunk, token_ids[-1]] for chunk in chunks]
