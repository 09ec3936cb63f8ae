"""Comparing our detector with transformers' GroundingDinoForObjectDetection query by query
(used by the parity and the transformers-format tests)."""

import torch

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
