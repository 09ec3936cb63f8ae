"""Text backbone (paper §3.1): BERT under sub-sentence masks, projected to the detector width.

The reference (`bertwarper.py:17-166` `BertModelWarper`, `groundingdino.py:113, 269-279`) runs a
bert-base-uncased BERT with the phrase-block mask and per-phrase position ids of
`grounding.text_masks`, then a Linear `feat_map` (768 -> 256). We build BERT from a config (never
`from_pretrained`: the weights come with our checkpoint) and drop its pooler, which the reference
computes but never uses (`official_format` drops its weights on load).

transformers 5 removed the `get_extended_attention_mask` helpers the reference borrowed, so the
3-D mask is made additive here: 0 where attention is allowed, the dtype's most negative value
elsewhere (the reference's `(1 - mask) * finfo.min`). BertModel 5.x passes a 4-D mask through to
the attention kernel untouched; an additive mask is correct for both its "sdpa" and "eager"
kernels (a bool mask would be silently wrong under "eager", where masks are added to the scores).
We pin "sdpa", which is what transformers' GroundingDino gets by default; it equals "eager" to
float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from grounding.config import GroundingDINOConfig


class TextBackbone(nn.Module):
    """BERT (no pooler) + Linear projection to the detector's hidden size.

    Args:
        config: `config.text` holds the `BertConfig` keyword arguments ({} = bert-base-uncased);
            the projection maps `config.text_hidden_size` to `config.hidden_dim`.
    """

    def __init__(self, config: GroundingDINOConfig) -> None:
        super().__init__()
        # transformers' @strict configs take extra keyword arguments at runtime; its types do not.
        bert_config = BertConfig(**config.text, attn_implementation="sdpa")  # type: ignore[call-arg]
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        # The official `feat_map`.
        self.projection = nn.Linear(config.text_hidden_size, config.hidden_dim)

    def forward(
        self,
        input_ids: Tensor,
        self_attention_mask: Tensor,
        position_ids: Tensor,
    ) -> Tensor:
        """Encode a batch of captions (already truncated to `max_text_len` by the caller).

        Args:
            input_ids: (B, n) long token ids.
            self_attention_mask: (B, n, n) bool, True = query token (row) may attend to key token
                (column); from `text_masks.sub_sentence_masks`. Every row must allow at least
                one column (the diagonal always is).
            position_ids: (B, n) long, per-phrase positions from `sub_sentence_masks`.

        Returns:
            (B, n, hidden_dim) text features (float32, or the autocast dtype under autocast).
        """
        dtype = self.projection.weight.dtype
        # (B, n, n) -> (B, 1, n, n), broadcast over heads; 0 = attend, finfo.min = blocked.
        additive_mask = torch.zeros(
            self_attention_mask.shape, dtype=dtype, device=self_attention_mask.device
        )
        additive_mask = additive_mask.masked_fill(~self_attention_mask, torch.finfo(dtype).min)
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=additive_mask[:, None],
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=position_ids,
        ).last_hidden_state  # (B, n, text_hidden)
        return self.projection(hidden)
