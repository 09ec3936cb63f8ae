"""Stand-ins for SAM's prompt encoder and mask decoder whose masks are exactly the boxes, so
tests can check the coordinate chain (box -> 1024 frame -> low-res logits -> image pixels)."""

import torch
from torch import nn


class BoxesAsPrompts(nn.Module):
    """Stands in for the prompt encoder: hands the (resized) boxes straight to the decoder."""

    def forward(self, points, boxes, masks):
        return boxes, None

    def get_dense_pe(self):
        return None


class PaintBoxes(nn.Module):
    """Stands in for the mask decoder: low-res logits = signed distance to each box's edge
    (positive inside), so the upscaled mask's edge is the box's edge."""

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                dense_prompt_embeddings, multimask_output):
        boxes = sparse_prompt_embeddings  # (n, 4) in the 1024 frame; logits are 256 x 256
        centres = (torch.arange(256, dtype=torch.float32) + 0.5) * 4
        inside_x = torch.minimum(centres - boxes[:, 0, None], boxes[:, 2, None] - centres)
        inside_y = torch.minimum(centres - boxes[:, 1, None], boxes[:, 3, None] - centres)
        distance = torch.minimum(inside_y[:, :, None], inside_x[:, None, :])  # (n, 256, 256)
        return distance[:, None], torch.ones(len(boxes), 1)
