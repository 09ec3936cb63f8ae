"""SAM wrapper: checkpoint download and loading (network replaced by local files), box prompts."""

import copy
import hashlib
import io
import time
import urllib.request
from urllib.error import URLError

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

import segmentation.sam as sam_module
from grounding.hub import OfflineError
from segmentation.sam import BoxSegmenter, build_sam, sam_checkpoint
from segmentation.sam_attention import FastAttention, restore_sam
from segmentation.tiny_models import tiny_sam
from tests.sam_stand_ins import BoxesAsPrompts, PaintBoxes

FILENAME = "sam_vit_b_01ec64.pth"
URL = "https://dl.fbaipublicfiles.com/segment_anything/" + FILENAME


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A fake vit_b checkpoint on a fake server: urlopen serves a local file and counts calls."""
    payload = np.random.default_rng(0).bytes(3 * 2**20 + 17)  # several read() chunks
    source = tmp_path / "server" / FILENAME
    source.parent.mkdir()
    source.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(sam_module.SAM_CHECKPOINTS, "vit_b",
                        sam_module.SamCheckpoint(URL, sha, len(payload), "ViT-B"))
    monkeypatch.setenv("SAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SAM_CHECKPOINT", raising=False)
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return urllib.request.urlopen(source.as_uri(), timeout=timeout)

    monkeypatch.setattr(sam_module, "urlopen", fake_urlopen)
    return payload, calls, tmp_path / "cache"


def test_download_verifies_and_caches(served, capsys):
    payload, calls, cache = served
    path = sam_checkpoint("vit_b")
    assert path == cache / FILENAME and path.read_bytes() == payload
    assert calls == [URL]
    assert FILENAME in capsys.readouterr().err  # the progress bar names the file
    assert sam_checkpoint("vit_b") == path and calls == [URL]  # second call: no network
    assert sorted(p.name for p in cache.iterdir()) == [FILENAME]


def test_sha256_mismatch_is_rejected_and_nothing_is_left(served, monkeypatch):
    payload, _, cache = served
    monkeypatch.setitem(sam_module.SAM_CHECKPOINTS, "vit_b",
                        sam_module.SamCheckpoint(URL, "0" * 64, len(payload), "ViT-B"))
    with pytest.raises(ValueError, match="sha256"):
        sam_checkpoint("vit_b", progress=False)
    assert list(cache.iterdir()) == []


def test_interrupted_download_leaves_nothing(served, monkeypatch):
    _, _, cache = served

    class Broken(io.BytesIO):
        headers = {"Content-Length": "4096"}

        def read(self, size=-1):
            if self.tell():
                raise ConnectionResetError("connection reset by peer")
            return super().read(1024)

    monkeypatch.setattr(sam_module, "urlopen", lambda url, timeout: Broken(b"x" * 4096))
    with pytest.raises(OSError, match="connection reset"):
        sam_checkpoint("vit_b", progress=False)
    assert list(cache.iterdir()) == []


def test_offline_fails_at_once_naming_file_url_and_how_to_supply(served, monkeypatch):
    _, _, cache = served

    def unreachable(url, timeout):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(sam_module, "urlopen", unreachable)
    start = time.perf_counter()
    with pytest.raises(OfflineError) as error:
        sam_checkpoint("vit_b")
    assert time.perf_counter() - start < 1.0
    message = str(error.value)
    for needle in (FILENAME, URL, str(cache / FILENAME), "SAM_CHECKPOINT", "SAM_CACHE_DIR",
                   "--sam-checkpoint"):
        assert needle in message
    assert isinstance(error.value, FileNotFoundError)


def test_environment_variable_overrides_and_wrong_sizes_are_reported(served, monkeypatch,
                                                                     tmp_path):
    _, calls, cache = served
    local = tmp_path / "mine.pth"
    local.write_bytes(b"weights")
    monkeypatch.setenv("SAM_CHECKPOINT", str(local))
    assert sam_checkpoint("vit_b") == local and calls == []
    monkeypatch.setenv("SAM_CHECKPOINT", str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="SAM_CHECKPOINT"):
        sam_checkpoint("vit_b")
    monkeypatch.delenv("SAM_CHECKPOINT")
    cache.mkdir()
    (cache / FILENAME).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="delete it"):
        sam_checkpoint("vit_b")
    with pytest.raises(ValueError, match="unknown SAM variant"):
        sam_checkpoint("vit_x")


@pytest.fixture
def tiny_registry(monkeypatch):
    """segment_anything's registry entry for vit_b builds the tiny SAM (seed 1)."""
    seen = []

    def build(checkpoint=None):
        seen.append(checkpoint)
        return tiny_sam(seed=1)

    monkeypatch.setitem(sam_module.sam_model_registry, "vit_b", build)
    return seen


def test_build_sam_loads_our_way(tiny_registry, tmp_path, monkeypatch):
    weights = tiny_sam(seed=2).state_dict()
    path = tmp_path / "sam.pth"
    torch.save(weights, path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    sam = build_sam("vit_b", path, device="cpu")
    assert tiny_registry == [None]  # segment_anything's own loader is never used
    assert loads == [{"map_location": "cpu", "weights_only": True}]
    assert not sam.training
    for key, value in sam.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


def test_build_sam_attends_through_sdpa_with_the_same_embedding(tiny_registry, tmp_path):
    path = tmp_path / "sam.pth"
    torch.save(tiny_sam(seed=2).state_dict(), path)
    sam = build_sam("vit_b", path, device="cpu")
    attentions = [m for m in sam.image_encoder.modules() if isinstance(m, Attention)]
    assert attentions and all(isinstance(m, FastAttention) for m in attentions)
    reference = restore_sam(copy.deepcopy(sam))
    pixels = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        torch.testing.assert_close(sam.image_encoder(pixels), reference.image_encoder(pixels),
                                   atol=1e-5, rtol=1e-5)


def test_build_sam_names_keys_that_do_not_fit(tiny_registry, tmp_path):
    weights = tiny_sam(seed=2).state_dict()
    weights.pop("mask_decoder.iou_token.weight")
    weights["extra.weight"] = torch.zeros(1)
    weights["image_encoder.pos_embed"] = torch.zeros(1, 2, 2, 32)
    path = tmp_path / "other.pth"
    torch.save(weights, path)
    with pytest.raises(ValueError) as error:
        build_sam("vit_b", path, device="cpu")
    for needle in ("mask_decoder.iou_token.weight", "extra.weight", "image_encoder.pos_embed",
                   "another SAM variant"):
        assert needle in str(error.value)
    with pytest.raises(ValueError, match="unknown SAM variant"):
        build_sam("default", path)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)  # H != W: exercises the resize


BOXES = np.array([[10, 20, 80, 100], [100, 5, 190, 60], [0, 0, 200, 120], [50, 50, 52, 53]],
                 dtype=np.float32)


def test_masks_at_image_resolution_one_per_box_in_order(image):
    segmenter = BoxSegmenter(tiny_sam())
    segmenter.set_image(image)
    masks, scores = segmenter.segment(BOXES)
    assert masks.shape == (4, 120, 200) and masks.dtype == bool
    assert scores.shape == (4,) and scores.dtype == np.float32
    for index, box in enumerate(BOXES):  # mask i is box i's mask, as if decoded alone
        alone, alone_score = segmenter.segment(box[None])
        assert (alone[0] != masks[index]).mean() < 1e-3
        np.testing.assert_allclose(alone_score[0], scores[index], atol=1e-5)
    empty, empty_scores = segmenter.segment(np.zeros((0, 4)))
    assert empty.shape == (0, 120, 200) and empty_scores.shape == (0,)


def test_one_encoder_run_per_image_and_one_decoder_call_per_batch(image, monkeypatch):
    sam = tiny_sam()
    calls = {"encoder": 0, "decoder": []}
    sam.image_encoder.register_forward_hook(
        lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    sam.mask_decoder.register_forward_hook(
        lambda module, args, kwargs, out: calls["decoder"].append(
            kwargs["sparse_prompt_embeddings"].shape[0]), with_kwargs=True)
    segmenter = BoxSegmenter(sam)
    embedding = segmenter.embed(image)
    first, _ = segmenter.segment(BOXES)
    segmenter.segment(BOXES[:2])
    assert calls == {"encoder": 1, "decoder": [4, 2]}

    segmenter.set_image(image[::-1].copy())  # another image, then back by its embedding
    segmenter.use(embedding)
    again, _ = segmenter.segment(BOXES)
    assert calls["encoder"] == 2 and np.array_equal(first, again)

    monkeypatch.setattr(sam_module, "MAX_BOXES_PER_CALL", 3)  # bounded batches for many boxes
    chunked, _ = segmenter.segment(BOXES)
    assert calls["decoder"][-2:] == [3, 1] and (chunked != first).mean() < 1e-3


def test_using_the_current_embedding_again_copies_nothing(image, monkeypatch):
    """`use` uploads an embedding only when the predictor does not hold it already (on a GPU
    each upload is a copy of 4 MiB for SAM, and the pipeline calls `use` before every decode)."""
    segmenter = BoxSegmenter(tiny_sam())
    uploads = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda t, *args, **kwargs: uploads.append(t) or real_to(t, *args, **kwargs))
    first = segmenter.embed(image)
    held = segmenter.predictor.features
    segmenter.use(first)  # what embed just made
    segmenter.use(first)
    assert segmenter.predictor.features is held and not any(t is first.features for t in uploads)
    masks, _ = segmenter.segment(BOXES)

    other = segmenter.embed(image[::-1].copy())
    segmenter.use(other)
    segmenter.use(first)  # back: uploaded once
    assert sum(t is first.features for t in uploads) == 1
    assert np.array_equal(segmenter.segment(BOXES)[0], masks)
    segmenter.use(other)
    assert segmenter.predictor.original_size == other.original_size


def test_segment_before_an_image_is_a_clear_error():
    with pytest.raises(RuntimeError, match="set_image"):
        BoxSegmenter(tiny_sam()).segment(BOXES)
    with pytest.raises(ValueError, match="uint8 RGB"):
        BoxSegmenter(tiny_sam()).set_image(np.zeros((10, 10), np.uint8))


def test_masks_land_on_the_box_pixels(image):
    """The whole coordinate chain: box -> 1024 frame -> low-res logits -> image pixels."""
    sam = tiny_sam()
    sam.prompt_encoder, sam.mask_decoder = BoxesAsPrompts(), PaintBoxes()
    segmenter = BoxSegmenter(sam)
    segmenter.set_image(image)
    masks, _ = segmenter.segment(BOXES[:3])
    for mask, (x0, y0, x1, y1) in zip(masks, BOXES[:3].astype(int), strict=True):
        expected = np.zeros_like(mask)
        expected[y0:y1, x0:x1] = True
        assert (mask & expected).sum() / (mask | expected).sum() > 0.97
