"""Key names of the official IDEA-Research GroundingDINO `.pth` checkpoints, renamed to ours.

The format: `torch.load(path)["model"]`, the state dict of the reference `GroundingDINO` module
(IDEA-Research/GroundingDINO, `groundingdino/models/GroundingDINO/groundingdino.py`).
`groundingdino_swint_ogc.pth` carries a DDP `module.` prefix, `groundingdino_swinb_cogcoor.pth`
does not; `checkpoint.read_official_state_dict` strips it before these rules apply. The key lists
of both files are in `tests/data/gdino_{swint_ogc,swinb}_keys.txt`.

Our modules keep the reference's names where that is not misleading, so most rules only move a
prefix (`transformer.encoder.` -> `feature_enhancer.`). The exceptions, as in timm's
`checkpoint_filter_fn` for Swin:
- patch merging: the reference keeps it at the end of stage i (`layers.{i}.downsample`), timm at
  the start of stage i+1 (`layers.{i+1}.downsample`);
- the shared decoder box head is stored twice, as `bbox_embed.{i}` and
  `transformer.decoder.bbox_embed.{i}`; all names map to our one `bbox_embed` (`rename_state_dict`
  checks that the aliases hold equal tensors);
- dropped: BERT's unused pooler, its `position_ids` buffer (persisted by the transformers versions
  the files were saved with) and Swin's `relative_position_index` buffers (the Swin paper's index,
  a function of the window size only, which timm recomputes and does not persist).
"""

from __future__ import annotations

import re

from grounding.config import GroundingDINOConfig
from grounding.key_mapping import Rule


def official_rules(config: GroundingDINOConfig) -> list[Rule]:
    """Rules from official checkpoint keys (without `module.`) to the keys of our `GroundingDINO`.

    Args:
        config: our model's config; `config.backbone.out_indices` picks the stage norms.
    """
    return [
        # The shared box head, under both of its official names (checked equal when aliased).
        (
            r"(?:transformer\.decoder\.)?bbox_embed\.\d+\.(layers\.\d+\.(?:weight|bias))",
            r"bbox_embed.\1",
        ),
        # Image backbone (`backbone.0.`, an mmdet-style Swin) -> timm's Swin plus our stage norms.
        (r"backbone\.0\.patch_embed\.(.*)", r"backbone.swin.patch_embed.\1"),
        (r"backbone\.0\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index", None),
        (r"backbone\.0\.layers\.(\d+)\.blocks\.(.*)", r"backbone.swin.layers.\1.blocks.\2"),
        (r"backbone\.0\.layers\.(\d+)\.downsample\.(.*)", _shift_downsample),
        *[
            (rf"backbone\.0\.norm{stage}\.(weight|bias)", rf"backbone.norms.{j}.\1")
            for j, stage in enumerate(config.backbone.out_indices)
        ],
        (r"input_proj\.(.*)", r"input_proj.\1"),
        (r"transformer\.level_embed", "level_embed"),
        # Text backbone. The reference builds BertModel with its pooler but never uses its output.
        (r"bert\.pooler\..*", None),
        (r"bert\.embeddings\.position_ids", None),
        (r"bert\.(.*)", r"text_backbone.bert.\1"),
        (r"feat_map\.(weight|bias)", r"text_backbone.projection.\1"),
        # Feature enhancer: `layers`, `text_layers`, `fusion_layers` keep the official names.
        (r"transformer\.encoder\.(.*)", r"feature_enhancer.\1"),
        # Decoder (its `bbox_embed.{i}` is the shared box head above).
        (
            r"transformer\.decoder\.((?:layers\.\d+|norm|ref_point_head)\..+)",
            r"decoder.\1",
        ),
        # Query selection.
        (
            r"transformer\.((?:enc_output|enc_output_norm)\.(?:weight|bias))",
            r"query_selection.\1",
        ),
        (
            r"transformer\.(enc_out_bbox_embed\.layers\.\d+\.(?:weight|bias))",
            r"query_selection.\1",
        ),
        (r"transformer\.tgt_embed\.weight", "query_selection.tgt_embed.weight"),
    ]


def _shift_downsample(match: re.Match) -> str:
    """Patch merging `(stage, rest)` at the end of a stage -> timm's at the start of the next."""
    return f"backbone.swin.layers.{int(match.group(1)) + 1}.downsample.{match.group(2)}"
