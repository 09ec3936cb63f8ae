"""Key names of transformers' `GroundingDinoForObjectDetection`, renamed to ours.

The format: a directory with `config.json` and `model.safetensors`, as
`IDEA-Research/grounding-dino-tiny` publishes and `transformers_format.save_pretrained` writes.
`transformers_rules` takes the current (transformers 5) names. Files saved by transformers 4.x name
the Swin backbone the old way (`conv_encoder.model.encoder...attention.self.query`) and persist a
few buffers; `modernise_transformers_keys` first brings them to the current names, as
transformers' own conversion mapping does.

Where the names differ from ours: transformers splits the packed query/key/value projections of
`nn.MultiheadAttention` and timm's Swin (packed back by `#q/#k/#v`, see `key_mapping`), renames
most layers (`fc1` / `linear1`, `self_attn_layer_norm` / `norm2` ...), counts the Swin patch
embedding as stage 0 and, like the reference, keeps patch merging at the end of a stage (timm: at
the start of the next). Its box-head aliases `bbox_embed.{i}` and `model.decoder.bbox_embed.{i}`
all map to our one shared `bbox_embed`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from grounding.config import GroundingDINOConfig
from grounding.key_mapping import Rule

_SWIN = r"model\.backbone\.conv_encoder\.model\."
_SWIN_BLOCK = _SWIN + r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_OUR_SWIN_BLOCK = r"backbone.swin.layers.\1.blocks.\2."
_ENCODER_LAYER = r"model\.encoder\.layers\.(\d+)\."
_DECODER_LAYER = r"model\.decoder\.layers\.(\d+)\."


def transformers_rules(config: GroundingDINOConfig) -> list[Rule]:
    """Rules from transformers `GroundingDinoForObjectDetection` keys (current names) to ours.

    Args:
        config: our model's config; `config.backbone.out_indices` picks the stage norms.
    """
    return [
        (r"(?:model\.decoder\.)?bbox_embed\.\d+\.(layers\.\d+\.(?:weight|bias))", r"bbox_embed.\1"),
        *_image_backbone_rules(config),
        (r"model\.input_proj_vision\.(.*)", r"input_proj.\1"),
        (r"model\.level_embed", "level_embed"),
        # Text backbone (the port, 4.40 and later, never persisted BERT's position_ids).
        (r"model\.text_backbone\.(.*)", r"text_backbone.bert.\1"),
        (r"model\.text_projection\.(weight|bias)", r"text_backbone.projection.\1"),
        *_FEATURE_ENHANCER_RULES,
        *_DECODER_RULES,
        # Query selection.
        (r"model\.enc_output\.(weight|bias)", r"query_selection.enc_output.\1"),
        (r"model\.enc_output_norm\.(weight|bias)", r"query_selection.enc_output_norm.\1"),
        (
            r"model\.encoder_output_bbox_embed\.(layers\.\d+\.(?:weight|bias))",
            r"query_selection.enc_out_bbox_embed.\1",
        ),
        (r"model\.query_position_embeddings\.weight", "query_selection.tgt_embed.weight"),
    ]


def _image_backbone_rules(config: GroundingDINOConfig) -> list[Rule]:
    """transformers' `SwinBackbone` -> timm's Swin plus our stage norms.

    `hidden_states_norms.stage{i+1}` norms our stage i. `swin.layernorm` (SwinModel's final norm)
    is never applied by `SwinBackbone` and has no reference counterpart: dropped.
    """
    return [
        (
            _SWIN + r"swin\.embeddings\.patch_embeddings\.projection\.(weight|bias)",
            r"backbone.swin.patch_embed.proj.\1",
        ),
        (_SWIN + r"swin\.embeddings\.norm\.(weight|bias)", r"backbone.swin.patch_embed.norm.\1"),
        (
            _SWIN_BLOCK + r"attention\.([qkv])_proj\.(weight|bias)",
            _OUR_SWIN_BLOCK + r"attn.qkv.\4#\3",
        ),
        (_SWIN_BLOCK + r"attention\.o_proj\.(weight|bias)", _OUR_SWIN_BLOCK + r"attn.proj.\3"),
        (
            _SWIN_BLOCK + r"attention\.relative_position_bias\.relative_position_bias_table",
            _OUR_SWIN_BLOCK + "attn.relative_position_bias_table",
        ),
        (_SWIN_BLOCK + r"layernorm_before\.(weight|bias)", _OUR_SWIN_BLOCK + r"norm1.\3"),
        (_SWIN_BLOCK + r"layernorm_after\.(weight|bias)", _OUR_SWIN_BLOCK + r"norm2.\3"),
        (_SWIN_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)", _OUR_SWIN_BLOCK + r"mlp.\3.\4"),
        (_SWIN + r"swin\.encoder\.layers\.(\d+)\.downsample\.(.*)", _shift_downsample),
        (_SWIN + r"swin\.layernorm\.(weight|bias)", None),
        *[
            (
                _SWIN + rf"hidden_states_norms\.stage{stage + 1}\.(weight|bias)",
                rf"backbone.norms.{j}.\1",
            )
            for j, stage in enumerate(config.backbone.out_indices)
        ],
    ]


def _shift_downsample(match: re.Match) -> str:
    """Patch merging `(stage, rest)` at the end of a stage -> timm's at the start of the next."""
    return f"backbone.swin.layers.{int(match.group(1)) + 1}.downsample.{match.group(2)}"


def _split_qkv(attention: str, ours: str) -> list[Rule]:
    """transformers' query/key/value projections of `attention` (a pattern whose group 1 is the
    layer index) -> the thirds of the packed `in_proj` of our `nn.MultiheadAttention` `ours`."""
    return [
        (attention + rf"\.{part}\.(weight|bias)", ours + rf".in_proj_\2#{tag}")
        for part, tag in (("query", "q"), ("key", "k"), ("value", "v"))
    ]


_FEATURE_ENHANCER_RULES: list[Rule] = [
    (
        _ENCODER_LAYER + r"deformable_layer\.self_attn\.(.+)",
        r"feature_enhancer.layers.\1.self_attn.\2",
    ),
    (
        _ENCODER_LAYER + r"deformable_layer\.self_attn_layer_norm\.(.+)",
        r"feature_enhancer.layers.\1.norm1.\2",
    ),
    (_ENCODER_LAYER + r"deformable_layer\.fc1\.(.+)", r"feature_enhancer.layers.\1.linear1.\2"),
    (_ENCODER_LAYER + r"deformable_layer\.fc2\.(.+)", r"feature_enhancer.layers.\1.linear2.\2"),
    (
        _ENCODER_LAYER + r"deformable_layer\.final_layer_norm\.(.+)",
        r"feature_enhancer.layers.\1.norm2.\2",
    ),
    *_split_qkv(
        _ENCODER_LAYER + r"text_enhancer_layer\.self_attn",
        r"feature_enhancer.text_layers.\1.self_attn",
    ),
    (
        _ENCODER_LAYER + r"text_enhancer_layer\.self_attn\.out_proj\.(.+)",
        r"feature_enhancer.text_layers.\1.self_attn.out_proj.\2",
    ),
    (
        _ENCODER_LAYER + r"text_enhancer_layer\.fc1\.(.+)",
        r"feature_enhancer.text_layers.\1.linear1.\2",
    ),
    (
        _ENCODER_LAYER + r"text_enhancer_layer\.fc2\.(.+)",
        r"feature_enhancer.text_layers.\1.linear2.\2",
    ),
    # transformers' layer_norm_before follows the attention (= norm1), _after the FFN (= norm2).
    (
        _ENCODER_LAYER + r"text_enhancer_layer\.layer_norm_before\.(.+)",
        r"feature_enhancer.text_layers.\1.norm1.\2",
    ),
    (
        _ENCODER_LAYER + r"text_enhancer_layer\.layer_norm_after\.(.+)",
        r"feature_enhancer.text_layers.\1.norm2.\2",
    ),
    (_ENCODER_LAYER + r"fusion_layer\.vision_param", r"feature_enhancer.fusion_layers.\1.gamma_v"),
    (_ENCODER_LAYER + r"fusion_layer\.text_param", r"feature_enhancer.fusion_layers.\1.gamma_l"),
    (
        _ENCODER_LAYER + r"fusion_layer\.layer_norm_vision\.(.+)",
        r"feature_enhancer.fusion_layers.\1.layer_norm_v.\2",
    ),
    (
        _ENCODER_LAYER + r"fusion_layer\.layer_norm_text\.(.+)",
        r"feature_enhancer.fusion_layers.\1.layer_norm_l.\2",
    ),
    (
        _ENCODER_LAYER + r"fusion_layer\.attn\.vision_proj\.(.+)",
        r"feature_enhancer.fusion_layers.\1.attn.v_proj.\2",
    ),
    (
        _ENCODER_LAYER + r"fusion_layer\.attn\.text_proj\.(.+)",
        r"feature_enhancer.fusion_layers.\1.attn.l_proj.\2",
    ),
    (
        _ENCODER_LAYER + r"fusion_layer\.attn\.values_vision_proj\.(.+)",
        r"feature_enhancer.fusion_layers.\1.attn.values_v_proj.\2",
    ),
    (
        _ENCODER_LAYER + r"fusion_layer\.attn\.values_text_proj\.(.+)",
        r"feature_enhancer.fusion_layers.\1.attn.values_l_proj.\2",
    ),
    (
        _ENCODER_LAYER + r"fusion_layer\.attn\.out_vision_proj\.(.+)",
        r"feature_enhancer.fusion_layers.\1.attn.out_v_proj.\2",
    ),
    (
        _ENCODER_LAYER + r"fusion_layer\.attn\.out_text_proj\.(.+)",
        r"feature_enhancer.fusion_layers.\1.attn.out_l_proj.\2",
    ),
]

# The decoder's `bbox_embed.{i}` is the shared box head of `transformers_rules`.
_DECODER_RULES: list[Rule] = [
    *_split_qkv(_DECODER_LAYER + r"self_attn", r"decoder.layers.\1.self_attn"),
    (
        _DECODER_LAYER + r"self_attn\.out_proj\.(weight|bias)",
        r"decoder.layers.\1.self_attn.out_proj.\2",
    ),
    *_split_qkv(_DECODER_LAYER + r"encoder_attn_text", r"decoder.layers.\1.ca_text"),
    (
        _DECODER_LAYER + r"encoder_attn_text\.out_proj\.(weight|bias)",
        r"decoder.layers.\1.ca_text.out_proj.\2",
    ),
    (_DECODER_LAYER + r"self_attn_layer_norm\.(weight|bias)", r"decoder.layers.\1.norm2.\2"),
    (
        _DECODER_LAYER + r"encoder_attn_text_layer_norm\.(weight|bias)",
        r"decoder.layers.\1.catext_norm.\2",
    ),
    (
        _DECODER_LAYER + r"encoder_attn\.(\w+\.(?:weight|bias))",
        r"decoder.layers.\1.cross_attn.\2",
    ),
    (_DECODER_LAYER + r"encoder_attn_layer_norm\.(weight|bias)", r"decoder.layers.\1.norm1.\2"),
    (_DECODER_LAYER + r"fc([12])\.(weight|bias)", r"decoder.layers.\1.linear\2.\3"),
    (_DECODER_LAYER + r"final_layer_norm\.(weight|bias)", r"decoder.layers.\1.norm3.\2"),
    (r"model\.decoder\.layer_norm\.(weight|bias)", r"decoder.norm.\1"),
    (
        r"model\.decoder\.reference_points_head\.(layers\.\d+\.(?:weight|bias))",
        r"decoder.ref_point_head.\1",
    ),
]

# transformers 4.x names of the Swin backbone -> the names transformers 5 uses.
_LEGACY_SWIN_RULES: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"conv_encoder\.model\.(embeddings|encoder)\.", r"conv_encoder.model.swin.\1."),
    (
        r"attention\.self\.relative_position_bias_table",
        "attention.relative_position_bias.relative_position_bias_table",
    ),
    (r"attention\.self\.(query|key|value)\.", lambda m: f"attention.{m.group(1)[0]}_proj."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
    (r"(blocks\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
    (r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]
# Buffers that older files persisted and that are recomputed from the config.
_LEGACY_DROPPED = re.compile(r".*(relative_position_index|embeddings\.position_ids)")


def modernise_transformers_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict under the current names: the buffers that transformers 4.x
    persisted are dropped and its Swin backbone names are renamed (current names pass unchanged).
    """
    return {
        _modernise_key(key): value
        for key, value in state_dict.items()
        if not _LEGACY_DROPPED.fullmatch(key)
    }


def _modernise_key(key: str) -> str:
    if not key.startswith("model.backbone."):
        return key
    for pattern, replacement in _LEGACY_SWIN_RULES:
        key = re.sub(pattern, replacement, key)
    return key
