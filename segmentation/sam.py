"""Segment Anything (Kirillov et al., arXiv 2304.02643) from the `segment-anything` package.

Weights: `build_sam` constructs the model through segment_anything's registry *without* its
checkpoint argument (its loader calls `torch.load` with no `map_location`, so a GPU-saved file fails
on a CPU machine) and loads the state dict here: on the CPU, weights only, strictly.

Prompting: `BoxSegmenter` splits `SamPredictor`'s `set_image` -> `predict` lifecycle into
`embed` (the image encoder, once per image) and `segment` (the prompt encoder and mask decoder for
a batch of boxes), so a caller can keep embeddings and reuse them; see `segmentation.pipeline`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse
from urllib.request import urlopen

import numpy as np
import torch
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import Sam
from torch import Tensor

from grounding.checkpoint import load_strict
from grounding.devices import default_device
from grounding.hub import OfflineError
from segmentation.sam_attention import accelerate_sam

_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class SamCheckpoint:
    """One official SAM variant: where its weights are and what to call it.

    Attributes:
        url: Meta's download address of the `.pth`.
        sha256: of that file.
        size: its size in bytes.
        display_name: for banners and logs ("ViT-B").
    """

    url: str
    sha256: str
    size: int
    display_name: str


# The one table of SAM variants: segment_anything's registry names -> official checkpoints.
SAM_CHECKPOINTS: dict[str, SamCheckpoint] = {
    "vit_b": SamCheckpoint(
        _URL + "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
        "ViT-B",
    ),
    "vit_l": SamCheckpoint(
        _URL + "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1_249_524_607,
        "ViT-L",
    ),
    "vit_h": SamCheckpoint(
        _URL + "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2_564_550_879,
        "ViT-H",
    ),
}
CHECKPOINT_ENV = "SAM_CHECKPOINT"
CACHE_DIR_ENV = "SAM_CACHE_DIR"
# Seconds to wait for the download server before calling the machine offline.
CONNECT_TIMEOUT = 10.0
# The mask decoder repeats the 256 x 64 x 64 image embedding once per box: one call with 300 boxes
# peaked at 9.8 GB of RAM, one with 32 at 2.2 GB (measured on CPU, vit_b).
MAX_BOXES_PER_CALL = 32
_UPSCALE_BYTES = 256 * 2**20


def cache_dir() -> Path:
    """Where downloaded SAM checkpoints live: `$SAM_CACHE_DIR`, else ~/.cache/grounded-sam."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "grounded-sam")


def sam_checkpoint(variant: str = "vit_b", *, progress: bool = True) -> Path:
    """The local path of the official checkpoint for `variant`, downloaded on first use.

    `$SAM_CHECKPOINT` (a path) overrides everything. Otherwise the file is looked up in
    `cache_dir()` and, when missing, downloaded from Meta's server with a progress bar and
    verified against its sha256 before it is moved into place.

    Raises:
        ValueError: unknown variant, a cached file of the wrong size, or a sha256 mismatch.
        FileNotFoundError: `$SAM_CHECKPOINT` names no file.
        grounding.hub.OfflineError: not cached and the server cannot be reached.
    """
    info = sam_variant(variant)
    url, sha256, size = info.url, info.sha256, info.size
    if os.environ.get(CHECKPOINT_ENV):
        path = Path(os.environ[CHECKPOINT_ENV]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{CHECKPOINT_ENV}={path} is not a file")
        return path
    filename = Path(urlparse(url).path).name
    path = cache_dir() / filename
    if path.is_file():
        if path.stat().st_size != size:
            raise ValueError(
                f"{path} has {path.stat().st_size} bytes, the official {filename} "
                f"has {size}: delete it and it is downloaded again"
            )
        return path
    how = (
        f"Download {url} ({size / 1e6:.0f} MB) on a connected machine and put it at {path} "
        f"(or set {CACHE_DIR_ENV} to its folder), or pass its path as sam_checkpoint= "
        f"(--sam-checkpoint), or set {CHECKPOINT_ENV}."
    )
    return download(url, path, sha256=sha256, progress=progress, how_to_supply=how)


def download(
    url: str, destination: Path, *, sha256: str, progress: bool = True, how_to_supply: str = ""
) -> Path:
    """Fetch `url` to `destination` through a temporary file, verified by its sha256.

    Nothing is left behind on failure: the temporary file is removed, and `destination` only
    appears once its content matches.

    Raises:
        grounding.hub.OfflineError: the server cannot be reached.
        OSError: the transfer broke off.
        ValueError: the content's sha256 differs from `sha256`.
    """
    from tqdm.auto import tqdm

    destination = Path(destination)
    try:
        response = urlopen(url, timeout=CONNECT_TIMEOUT)
    except (URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise OfflineError(
            f"{destination.name} is not in {destination.parent} and {url} cannot "
            f"be reached ({reason}). {how_to_supply}"
        ) from error
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=destination.parent, prefix=destination.name + ".", suffix=".part", delete=False
    )
    partial = Path(handle.name)
    digest = hashlib.sha256()
    total = int(response.headers.get("Content-Length") or 0) or None
    try:
        with (
            response,
            handle,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=destination.name,
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(1 << 20):
                handle.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise ValueError(
                f"the download of {url} is corrupt: sha256 {digest.hexdigest()}, "
                f"expected {sha256}. Try again. {how_to_supply}"
            )
        os.replace(partial, destination)
    except OSError as error:
        raise OSError(f"downloading {url} failed: {error}. {how_to_supply}") from error
    finally:
        partial.unlink(missing_ok=True)
    return destination


def build_sam(
    variant: str = "vit_b",
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> Sam:
    """SAM `variant` with loaded weights, in eval mode, on `device`.

    The image encoder's attention runs through SDPA (`segmentation.sam_attention.accelerate_sam`:
    same modules, parameters and keys; the same embedding up to float rounding).

    Args:
        variant: "vit_b", "vit_l" or "vit_h".
        checkpoint: a SAM `.pth` state dict; None for `sam_checkpoint(variant)`.
        device: default CUDA when available, else CPU.

    Raises:
        ValueError: unknown variant, or a checkpoint that does not fit it (names the keys).
    """
    sam_variant(variant)
    sam = sam_model_registry[variant](checkpoint=None)
    path = Path(checkpoint) if checkpoint is not None else sam_checkpoint(variant)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint {path} does not exist")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    load_strict(
        sam,
        state_dict,
        source=str(path),
        target=f"SAM {variant}",
        error=ValueError,
        hint=". Is it a checkpoint of another SAM variant?",
    )
    device = torch.device(device or default_device())
    return accelerate_sam(sam.to(device).eval())


@dataclass(frozen=True)
class ImageEmbedding:
    """SAM's embedding of one image, kept on the CPU.

    Attributes:
        features: (1, C, 64, 64) float, the image encoder's output (C = 256 for SAM).
        original_size: (H, W) of the image.
        input_size: (h, w) of the image resized to the encoder's long side (1024), before padding.
    """

    features: Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.features.element_size() * self.features.nelement()


class BoxSegmenter:
    """Box prompts -> masks, one image at a time: `set_image` (or `use`), then `segment`."""

    def __init__(self, sam: Sam) -> None:
        self.sam = sam.eval()
        self.predictor = SamPredictor(sam)
        self._current: ImageEmbedding | None = None  # the embedding the predictor holds

    @property
    def device(self) -> torch.device:
        return self.sam.device

    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Run the image encoder once and make `image` the current one.

        Args:
            image: (H, W, 3) uint8 RGB.
        """
        if not (
            isinstance(image, np.ndarray)
            and image.ndim == 3
            and image.shape[2] == 3
            and image.dtype == np.uint8
            and image.shape[0]
            and image.shape[1]
        ):
            raise ValueError(
                "SAM needs an H x W x 3 uint8 RGB array, got "
                f"{getattr(image, 'shape', type(image).__name__)}"
            )
        self._current = None
        self.predictor.set_image(image)
        self._current = ImageEmbedding(
            self.predictor.features.cpu(),
            tuple(self.predictor.original_size),
            tuple(self.predictor.input_size),
        )
        return self._current

    def set_image(self, image: np.ndarray) -> None:
        """Compute `image`'s embedding (once) for the following `segment` calls."""
        self.embed(image)

    def use(self, embedding: ImageEmbedding) -> None:
        """Make a previously computed embedding current, without running the encoder (nor
        copying it to the device again when it is the current one: `embed` just made it, or
        `use` was given it last)."""
        predictor = self.predictor
        if embedding is self._current and predictor.is_image_set:
            return
        self._current = None
        predictor.reset_image()
        predictor.features = embedding.features.to(self.device)
        predictor.original_size = embedding.original_size
        predictor.input_size = embedding.input_size
        predictor.is_image_set = True
        self._current = embedding

    @torch.inference_mode()
    def segment(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks for the current image, one per box.

        The steps of SamPredictor.predict_torch (`multimask_output=False`): all boxes go through
        the prompt encoder and mask decoder in one batched call (more than MAX_BOXES_PER_CALL
        boxes are split into calls of that size to bound memory), then the low-resolution
        logits are upscaled to the image in slices of about 256 MB.

        Args:
            boxes: (N, 4) float, x0, y0, x1, y1 in the image's pixels; N = 0 is fine.

        Returns:
            masks (N, H, W) bool at the image's resolution (True = object), in box order, and
            scores (N,) float32, SAM's predicted IoU of each mask.
        """
        predictor, sam = self.predictor, self.sam
        if not predictor.is_image_set:
            raise RuntimeError("call set_image(image) (or use(embedding)) before segment(boxes)")
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        height, width = predictor.original_size
        masks = np.zeros((len(boxes), height, width), dtype=bool)
        scores = np.zeros(len(boxes), dtype=np.float32)
        upscale_step = max(1, _UPSCALE_BYTES // (4 * height * width))
        for start in range(0, len(boxes), MAX_BOXES_PER_CALL):
            prompts = torch.as_tensor(boxes[start : start + MAX_BOXES_PER_CALL], device=self.device)
            prompts = predictor.transform.apply_boxes_torch(prompts, (height, width))
            sparse, dense = sam.prompt_encoder(points=None, boxes=prompts, masks=None)
            low_res, iou = sam.mask_decoder(  # (n, 1, 256, 256) logits, (n, 1)
                image_embeddings=predictor.features,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            scores[start : start + len(prompts)] = iou[:, 0].float().cpu().numpy()
            for offset in range(0, len(prompts), upscale_step):
                logits = sam.postprocess_masks(
                    low_res[offset : offset + upscale_step], predictor.input_size, (height, width)
                )
                first = start + offset
                masks[first : first + len(logits)] = (
                    (logits[:, 0] > sam.mask_threshold).cpu().numpy()
                )
        return masks, scores


def sam_variant(variant: str) -> SamCheckpoint:
    """`SAM_CHECKPOINTS[variant]`, or a ValueError naming the known variants."""
    if variant not in SAM_CHECKPOINTS:
        raise ValueError(
            f"unknown SAM variant {variant!r}; choose one of {sorted(SAM_CHECKPOINTS)}"
        )
    return SAM_CHECKPOINTS[variant]
