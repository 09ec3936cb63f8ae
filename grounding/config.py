"""Hyper-parameters of Grounding DINO (paper §3; reference `GroundingDINO_SwinT_OGC.py`).

Only knobs that change the architecture live here. Sizes the reference derives from others (the text
enhancer's and the fusion block's widths and heads) are properties, so a config cannot contradict
the checkpoint layout. Defaults reproduce Swin-T OGC.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SwinConfig:
    """The Swin image backbone (timm), and which stages feed the detector."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    # 0-based stage indices whose outputs (after our own LayerNorm) feed the detector.
    out_indices: tuple[int, ...] = (1, 2, 3)
    layer_norm_eps: float = 1e-5
    # Stochastic depth of the last block, linear from 0 (training only).
    drop_path_rate: float = 0.2

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.stage_channels[i] for i in self.out_indices)


@dataclass(frozen=True)
class GroundingDINOConfig:
    """The whole detector.

    `text` holds `transformers.BertConfig` keyword arguments ({} = bert-base-uncased).
    """

    backbone: SwinConfig = field(default_factory=SwinConfig)
    text: dict[str, Any] = field(default_factory=dict)
    hidden_dim: int = 256
    num_queries: int = 900
    num_feature_levels: int = 4
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_heads: int = 8
    decoder_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    encoder_points: int = 4
    decoder_points: int = 4
    max_text_len: int = 256
    # The official config sets pe_temperatureH/W = 20 for the image levels (not DETR's 10000).
    position_temperature: float = 20.0
    layer_norm_eps: float = 1e-5
    # The official `fusion_droppath` (training only).
    fusion_drop_path: float = 0.1
    # Classification logits divided by sqrt(hidden_dim) plus a learnable bias starting at the focal
    # prior (MM-Grounding-DINO's ContrastiveEmbed): for models trained from scratch. The official
    # checkpoints have no such parameters, and transformers' format cannot hold them.
    contrastive_bias: bool = False

    @property
    def text_hidden_size(self) -> int:
        return int(self.text.get("hidden_size", 768))

    @property
    def text_enhancer_heads(self) -> int:
        return self.encoder_heads // 2

    @property
    def text_enhancer_ffn_dim(self) -> int:
        return self.encoder_ffn_dim // 2

    @property
    def fusion_heads(self) -> int:
        return self.encoder_heads // 2

    @property
    def fusion_dim(self) -> int:
        return self.encoder_ffn_dim // 2


def swint_ogc() -> GroundingDINOConfig:
    """Swin-T backbone, the `groundingdino_swint_ogc.pth` checkpoint."""
    return GroundingDINOConfig()


def swinb_cogcoor() -> GroundingDINOConfig:
    """Swin-B (window 12), the `groundingdino_swinb_cogcoor.pth` checkpoint."""
    return GroundingDINOConfig(
        backbone=SwinConfig(
            embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12
        )
    )


OFFICIAL_REPO = "ShilongLiu/GroundingDINO"


@dataclass(frozen=True)
class DetectorPreset:
    """One official Grounding DINO model: everything the loader, the Hub lookup, the CLI and the
    app need to know about it (as segment_anything's `sam_model_registry` for SAM).

    Attributes:
        name: the preset's name ("swint_ogc"), `load_detector(config=...)`'s.
        config: builds its architecture.
        official_file: the `.pth` in `hub_repo`.
        hub_repo: the Hugging Face Hub repository that holds `official_file`.
        display_name: for banners and logs ("SwinT-OGC").
        aliases: other names the CLI and the app accept (`--detector swint`), lower case.
    """

    name: str
    config: Callable[[], GroundingDINOConfig]
    official_file: str
    display_name: str
    aliases: tuple[str, ...] = ()
    hub_repo: str = OFFICIAL_REPO


# The one table of detector presets; everything else derives from it.
DETECTOR_PRESETS: dict[str, DetectorPreset] = {
    preset.name: preset
    for preset in (
        DetectorPreset(
            "swint_ogc", swint_ogc, "groundingdino_swint_ogc.pth", "SwinT-OGC", ("swint",)
        ),
        DetectorPreset(
            "swinb_cogcoor",
            swinb_cogcoor,
            "groundingdino_swinb_cogcoor.pth",
            "SwinB-COGCOOR",
            ("swinb",),
        ),
    )
}
PRESETS: dict[str, Callable[[], GroundingDINOConfig]] = {
    name: preset.config for name, preset in DETECTOR_PRESETS.items()
}


def detector_preset(name: str) -> DetectorPreset | None:
    """The preset `name` names: its name or an alias, in any case ("SwinT"); else None."""
    key = name.strip().lower()
    for preset in DETECTOR_PRESETS.values():
        if key == preset.name or key in preset.aliases:
            return preset
    return None


def tiny_config(vocab_size: int) -> GroundingDINOConfig:
    """A 1.5 M-parameter detector (1 M of it BERT's word embeddings) for smoke runs and tests."""
    return GroundingDINOConfig(
        backbone=SwinConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)),
        text=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=vocab_size,
        ),
        hidden_dim=32,
        num_queries=50,
        encoder_layers=1,
        decoder_layers=2,
        encoder_heads=4,
        decoder_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    )


def shapes_config(vocab_size: int) -> GroundingDINOConfig:
    """A 4 M-parameter detector (2 M of it BERT's word embeddings) to train from scratch on the
    synthetic shapes (`grounding.shapes_data`) on a CPU: small widths and depths, 50 queries, no
    stochastic depth, and the scaled, biased contrastive head (`contrastive_bias`), which made a
    from-scratch probe learn the phrase alignment about 4x faster."""
    return GroundingDINOConfig(
        backbone=SwinConfig(
            embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0
        ),
        text=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            vocab_size=vocab_size,
        ),
        hidden_dim=64,
        num_queries=50,
        encoder_layers=2,
        decoder_layers=3,
        encoder_heads=4,
        decoder_heads=4,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        fusion_drop_path=0.0,
        contrastive_bias=True,
    )


def from_transformers_config(config: dict[str, Any]) -> GroundingDINOConfig:
    """Our config from a transformers `GroundingDinoConfig` (its `config.json` as a dict).

    Raises:
        ValueError: for settings this implementation does not support (they would silently
            change the architecture otherwise).
    """
    unsupported = {
        "two_stage": True,
        "embedding_init_target": True,
        "decoder_bbox_embed_share": True,
        "two_stage_bbox_embed_share": False,
        "query_dim": 4,
        "position_embedding_type": "sine",
        "activation_function": "relu",
    }
    for key, expected in unsupported.items():
        if config.get(key, expected) != expected:
            raise ValueError(
                f"unsupported transformers config: {key}={config[key]!r} "
                f"(only {expected!r} is implemented)"
            )
    swin = dict(config.get("backbone_config") or {})
    if swin.get("model_type", "swin") != "swin":
        raise ValueError(
            f"unsupported backbone {swin.get('model_type')!r}: only Swin is implemented"
        )
    # transformers counts the patch embedding as stage 0, so its out_indices are ours + 1.
    out_indices = tuple(i - 1 for i in swin.get("out_indices", [2, 3, 4]))
    backbone = SwinConfig(
        embed_dim=swin.get("embed_dim", 96),
        depths=tuple(swin.get("depths", (2, 2, 6, 2))),
        num_heads=tuple(swin.get("num_heads", (3, 6, 12, 24))),
        window_size=swin.get("window_size", 7),
        patch_size=swin.get("patch_size", 4),
        mlp_ratio=swin.get("mlp_ratio", 4.0),
        out_indices=out_indices,
        layer_norm_eps=swin.get("layer_norm_eps", 1e-5),
        drop_path_rate=swin.get("drop_path_rate", 0.2),
    )
    text = {
        k: v for k, v in (config.get("text_config") or {}).items() if k in BERT_ARCHITECTURE_KEYS
    }
    return GroundingDINOConfig(
        backbone=backbone,
        text=text,
        hidden_dim=config.get("d_model", 256),
        num_queries=config.get("num_queries", 900),
        num_feature_levels=config.get("num_feature_levels", 4),
        encoder_layers=config.get("encoder_layers", 6),
        decoder_layers=config.get("decoder_layers", 6),
        encoder_heads=config.get("encoder_attention_heads", 8),
        decoder_heads=config.get("decoder_attention_heads", 8),
        encoder_ffn_dim=config.get("encoder_ffn_dim", 2048),
        decoder_ffn_dim=config.get("decoder_ffn_dim", 2048),
        encoder_points=config.get("encoder_n_points", 4),
        decoder_points=config.get("decoder_n_points", 4),
        max_text_len=config.get("max_text_len", 256),
        position_temperature=float(config.get("positional_embedding_temperature", 20)),
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        fusion_drop_path=config.get("fusion_droppath", 0.1),
    )


BERT_ARCHITECTURE_KEYS = {
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
}


@dataclass(frozen=True)
class LossConfig:
    """Matching costs and loss weights of the training objective (paper §3.5).

    The matcher costs 2 / 5 / 2 (class / L1 / GIoU) are MM-Grounding-DINO's and those of some
    Open-GroundingDino configs (others use class cost 1; transformers defaults to 1 / 5 / 2). The
    loss weights 2 / 5 / 2 and the focal alpha 0.25, gamma 2 are Open-GroundingDino's.

    Attributes:
        cost_class: weight of the focal-style token cost in the Hungarian matching.
        cost_l1: weight of the L1 distance between (cx, cy, w, h) boxes in the matching.
        cost_giou: weight of -GIoU in the matching.
        weight_class: weight of the sigmoid focal loss over query x token pairs.
        weight_l1: weight of the L1 box loss on matched pairs.
        weight_giou: weight of the 1 - GIoU box loss on matched pairs.
        focal_alpha: focal weight of the positive class (cost and loss).
        focal_gamma: focal exponent (cost and loss).
        aux_loss: also supervise every earlier decoder layer (suffixes `_0`, `_1`, ...).
        encoder_loss: also supervise the encoder's selected proposals (suffix `_enc`).
    """

    cost_class: float = 2.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    weight_class: float = 2.0
    weight_l1: float = 5.0
    weight_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    aux_loss: bool = True
    encoder_loss: bool = True
