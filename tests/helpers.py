"""Builders shared by the integration tests: tiny transformers models and official-layout files."""

from __future__ import annotations

from pathlib import Path

import torch

from grounding.key_mapping import rename_state_dict
from tests.key_lists import VOCAB_FILE, constant_state_dict, read_key_list


def tiny_transformers_config(**overrides):
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    swin = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 2, 4],
        window_size=7,
        out_indices=[2, 3, 4],
    )
    bert = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=30522,
    )
    settings = dict(
        backbone_config=swin,
        text_config=bert,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=30,
    )
    settings.update(overrides)
    return GroundingDinoConfig(**settings)


def tiny_swin_and_bert():
    """The smallest transformers SwinConfig (8 wide, one block a stage, stages 2-4 out) and
    BertConfig (16 wide, one layer, 50 tokens) for per-block comparisons with transformers."""
    from transformers import BertConfig, SwinConfig

    swin = SwinConfig(
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage2", "stage3", "stage4"],
    )
    bert = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    return swin, bert


def random_transformers_model(config, seed: int = 0, noise: float = 0.05):
    """transformers' GroundingDinoForObjectDetection with every parameter perturbed.

    Its own init zeroes some layers (the last box layer, for one); noise on everything makes the
    comparison exercise every weight.
    """
    from transformers import GroundingDinoForObjectDetection

    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * noise)
    return model


def save_transformers_directory(model, directory: Path) -> Path:
    """`save_pretrained` the model with a tokenizer built from the shipped vocabulary."""
    from transformers import BertTokenizer

    model.save_pretrained(directory)
    BertTokenizer(vocab=str(VOCAB_FILE), do_lower_case=True).save_pretrained(directory)
    return directory


def constant_official_state_dict(name: str) -> dict[str, torch.Tensor]:
    """A state dict in exactly the official layout of key list `name`, one distinct constant per key
    (see `key_lists.constant_state_dict`: nothing full-size is allocated or written), with the
    shared box head's aliases equal."""
    state_dict = constant_state_dict(read_key_list(name))
    # One box head shared by all decoder layers: all 12 names hold the same tensors.
    for key in list(state_dict):
        for prefix in ("bbox_embed.", "transformer.decoder.bbox_embed."):
            if key.startswith(prefix):
                _, rest = key[len(prefix) :].split(".", 1)
                state_dict[key] = state_dict["bbox_embed.0." + rest]
    return state_dict


def rename_block(
    block_state: dict[str, torch.Tensor], rules, prefix: str, target_prefix: str
) -> dict[str, torch.Tensor]:
    """One block's state dict renamed by a format's full-key rules (`official_rules`,
    `transformers_rules`): its keys get the format's `prefix`, and the renamed keys, which must all
    lie under our `target_prefix`, lose it."""
    renamed = rename_state_dict({prefix + key: value for key, value in block_state.items()}, rules)
    outside = sorted(key for key in renamed if not key.startswith(target_prefix))
    assert not outside, f"keys renamed outside {target_prefix}: {outside[:5]}"
    return {key[len(target_prefix) :]: value for key, value in renamed.items()}


# A fake Hub revision for the tests that build a local Hub cache.
COMMIT = "0123456789abcdef0123456789abcdef01234567"
