"""Parity with transformers' GroundingDinoForObjectDetection through our transformers-format loader.

Same random weights, `save_pretrained` with a tokenizer from the shipped vocabulary, loaded with
`grounding.load_detector`, compared query by query in float32.

Padded batches: transformers (like the reference) is not padding-invariant (its Swin attends to
padded pixels, padded tokens join the top-k, the decoder's query position uses padded-scale boxes),
while our `detect` gives each image of a padded batch the numbers it gets alone. So each image of
the batch is compared with transformers on that image alone (which is how the reference's `predict`
runs it), and the unpadded first image also with transformers' batched output.
"""

import pytest
import torch

import grounding
from tests.helpers import (
    random_transformers_model,
    save_transformers_directory,
    tiny_transformers_config,
)

CAPTIONS = ["a cat . a remote control .", "dogs ? a red car"]


def cells(indices, shapes):
    """Flat token indices -> (level, row, column), so padded and unpadded layouts compare."""
    starts = [0]
    for height, width in shapes:
        starts.append(starts[-1] + height * width)
    found = []
    for index in indices.tolist():
        level = max(i for i, start in enumerate(starts[:-1]) if start <= index)
        row, column = divmod(index - starts[level], shapes[level][1])
        found.append((level, row, column))
    return found


def assert_matches(ours, index, hf, n_tokens, ours_shapes, hf_shapes):
    """Every query of image `index`: boxes within 1e-4, logits over the caption's tokens within
    1e-4 * (1 + the row's largest |logit|).

    Queries are paired by the image cell they were selected from (`*_shapes`: the level sizes
    each side's flat token indices refer to). Both implementations must select the same cells;
    their order may differ only between scores tied within 1e-4 (float rounding in two
    implementations can swap those; it did on an AVX-512 CPU and not on an AVX2 one). A swapped
    query is not compared: the decoder's content query is learned per slot (`tgt_embed[i]`), so
    a cell that lands in another slot legitimately gets another box and logits. Through the
    decoder's self-attention the swap also moves every other query's logits a little, so after
    a swap logits are compared within 1e-3 instead of 1e-4 (relative to the row's largest).
    """
    hf_logits, hf_boxes, hf_tokens, hf_scores = hf
    ours_cells = cells(ours.query_indices[index], ours_shapes)
    hf_cells = cells(hf_tokens, hf_shapes)
    assert set(ours_cells) == set(hf_cells), "different queries selected"
    position = {cell: i for i, cell in enumerate(hf_cells)}
    order = torch.tensor([position[cell] for cell in ours_cells])
    swapped = order != torch.arange(len(order))
    if swapped.any():
        gaps = (hf_scores[hf_tokens[order[swapped]]] - hf_scores[hf_tokens[swapped]]).abs()
        assert gaps.max() < 1e-4, "queries reordered beyond a near-tie"
        assert swapped.float().mean() < 0.01, f"{int(swapped.sum())} near-ties swapped"
    kept = ~swapped
    torch.testing.assert_close(ours.boxes[index][kept], hf_boxes[order][kept], atol=1e-4,
                               rtol=0)
    mine = ours.logits[index, :, :n_tokens][kept]
    theirs = hf_logits[order, :n_tokens][kept]
    scale = 1 + theirs.abs().amax(dim=-1, keepdim=True)
    tolerance = 1e-3 if swapped.any() else 1e-4
    assert ((mine - theirs).abs() <= tolerance * scale).all(), \
        (mine - theirs).abs().div(scale).max()
    assert torch.isinf(ours.logits[index, :, n_tokens:]).all()


def run_transformers(model, tokenizer, pixels, captions, pixel_mask=None):
    """transformers' outputs per image: (logits, boxes, selected tokens, token scores), lengths."""
    tokens = tokenizer(captions, padding="longest", return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=tokens["input_ids"],
                    attention_mask=tokens["attention_mask"],
                    token_type_ids=torch.zeros_like(tokens["input_ids"]),
                    pixel_mask=pixel_mask)
    scores = out.enc_outputs_class.max(-1).values  # (B, S): the query-selection ranking
    selected = scores.topk(out.logits.shape[1], dim=1).indices
    per_image = [(out.logits[b], out.pred_boxes[b], selected[b], scores[b])
                 for b in range(len(captions))]
    return per_image, tokens["attention_mask"].sum(1).tolist()


def level_shapes(detector, pixels, padding_mask=None):
    with torch.inference_mode():
        return detector.model.encode_image(pixels, padding_mask).spatial_shapes


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    model = random_transformers_model(tiny_transformers_config())
    directory = save_transformers_directory(model, tmp_path_factory.mktemp("tiny"))
    return model, grounding.load_detector(directory, device="cpu")


def test_single_image(tiny_pair):
    hf_model, detector = tiny_pair
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 256, 320)
    hf, lengths = run_transformers(hf_model, detector.tokenizer, pixels, CAPTIONS[:1])
    out = detector.detect(pixels, CAPTIONS[:1])
    assert out.logits.shape == (1, 30, 256) and out.boxes.shape == (1, 30, 4)
    shapes = level_shapes(detector, pixels)
    assert_matches(out, 0, hf[0], lengths[0], shapes, shapes)


def test_padded_batch_of_two_sizes_and_captions(tiny_pair):
    hf_model, detector = tiny_pair
    torch.manual_seed(2)
    large, small = torch.randn(3, 288, 320), torch.randn(3, 256, 256)
    pixels, padding_mask = grounding.transforms.batch_images([large, small])
    out = detector.detect(pixels, CAPTIONS, padding_mask)
    batch_shapes = level_shapes(detector, pixels, padding_mask)
    for index, image in enumerate([large, small]):
        hf, lengths = run_transformers(hf_model, detector.tokenizer, image[None],
                                       CAPTIONS[index:index + 1])
        assert_matches(out, index, hf[0], lengths[0], batch_shapes,
                       level_shapes(detector, image[None]))
    # The first image is unpadded and has the longer caption: transformers' batch agrees too.
    hf, lengths = run_transformers(hf_model, detector.tokenizer, pixels, CAPTIONS,
                                   (~padding_mask).long())
    assert_matches(out, 0, hf[0], lengths[0], batch_shapes, batch_shapes)


@pytest.mark.slow
def test_full_size_swint_single_image(tmp_path):
    """The full Swin-T configuration.

    384 x 384 keeps every level-0 anchor valid: at 50 or more columns the border anchors are
    invalid (+inf proposals, boxes of exactly 1.0), where the reference's inverse_sigmoid
    (eps 1e-3, which we follow) and transformers' (eps 1e-5) differ by design.
    """
    from transformers import GroundingDinoConfig

    hf_model = random_transformers_model(GroundingDinoConfig(), noise=0.02)
    directory = save_transformers_directory(hf_model, tmp_path / "full")
    detector = grounding.load_detector(directory, device="cpu")
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, 384, 384)
    hf, lengths = run_transformers(hf_model, detector.tokenizer, pixels, CAPTIONS[:1])
    out = detector.detect(pixels, CAPTIONS[:1])
    shapes = level_shapes(detector, pixels)
    assert_matches(out, 0, hf[0], lengths[0], shapes, shapes)


# transformers 5 names of the Swin backbone -> the transformers 4.x names that files saved in
# 2024 (the Hub's IDEA-Research/grounding-dino-tiny / -base) carry.
LEGACY_NAMES = [
    ("conv_encoder.model.swin.", "conv_encoder.model."),
    ("attention.relative_position_bias.relative_position_bias_table",
     "attention.self.relative_position_bias_table"),
    ("attention.q_proj.", "attention.self.query."),
    ("attention.k_proj.", "attention.self.key."),
    ("attention.v_proj.", "attention.self.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
]


def test_transformers_4_file_layout_loads_the_same(tiny_pair, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    hf_model, detector = tiny_pair
    directory = save_transformers_directory(hf_model, tmp_path / "modern")
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(directory, legacy_dir)
    legacy = {}
    for key, value in load_file(str(directory / "model.safetensors")).items():
        if ".swin.layernorm." in key:  # SwinModel's final norm: 4.x's SwinBackbone had none
            continue
        if key.startswith("model.backbone."):
            for new, old in LEGACY_NAMES:
                key = key.replace(new, old)
        legacy[key] = value.contiguous()
    legacy["model.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self."
           "relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    legacy["model.text_backbone.embeddings.position_ids"] = torch.arange(512)[None]
    save_file(legacy, str(legacy_dir / "model.safetensors"))
    reloaded = grounding.load_detector(legacy_dir, device="cpu")
    for key, value in detector.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[key], value), key


def test_hub_id_of_a_transformers_repository_loads_from_the_cache(tiny_pair, tmp_path,
                                                                  monkeypatch):
    """`load_detector("owner/name")` with the network replaced by a pre-filled Hub cache."""
    from huggingface_hub import constants

    from tests.test_hub import COMMIT

    hf_model, detector = tiny_pair
    repo = tmp_path / "hub" / "models--someone--tiny-gdino"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    save_transformers_directory(hf_model, repo / "snapshots" / COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = grounding.load_detector("someone/tiny-gdino", device="cpu")
    torch.testing.assert_close(loaded.model.state_dict()["level_embed"],
                               detector.model.state_dict()["level_embed"])
