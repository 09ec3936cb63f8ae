"""The pipeline and its caches: what runs when thresholds change, where masks land, byte budgets."""

import contextlib
import threading
import time
import types

import numpy as np
import pytest
import torch

import segmentation.build as build_module
import segmentation.look_ahead as look_ahead_module
import segmentation.pipeline as pipeline_module
import segmentation.sam as sam_module
from grounding import Detections, RawPrediction
from grounding.hub import OfflineError
from grounding.predictor import normalize_caption
from segmentation.build import load_pipeline
from segmentation.cache import ByteLRU
from segmentation.look_ahead import BackgroundDecoder, LookAhead
from segmentation.pipeline import GroundedSAM
from segmentation.result_cache import image_key
from segmentation.sam import BoxSegmenter
from segmentation.tiny_models import tiny_detector, tiny_sam
from tests.sam_stand_ins import BoxesAsPrompts, PaintBoxes

PROMPT = "a cat . a remote control ."


@pytest.fixture(scope="module")
def detector():
    return tiny_detector("cpu")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)


@pytest.fixture
def pipeline(detector):
    """No prefetching: every decoder call below is for boxes shown."""
    return GroundedSAM(detector, BoxSegmenter(tiny_sam()), look_ahead=LookAhead.off())


@contextlib.contextmanager
def model_calls(pipeline, monkeypatch):
    """Counts every model call, independently of pipeline.stats: detector.infer runs, SAM image
    encoder runs, and the box count of each mask decoder call."""
    calls = {"infer": 0, "encoder": 0, "decoder": []}
    infer = pipeline.detector.infer

    def counting_infer(*args, **kwargs):
        calls["infer"] += 1
        return infer(*args, **kwargs)

    monkeypatch.setattr(pipeline.detector, "infer", counting_infer)
    sam = pipeline.segmenter.sam
    hooks = [
        sam.image_encoder.register_forward_hook(
            lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1)),
        sam.mask_decoder.register_forward_hook(
            lambda module, args, kwargs, out: calls["decoder"].append(
                kwargs["sparse_prompt_embeddings"].shape[0]), with_kwargs=True),
    ]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def reset(calls):
    calls.update(infer=0, encoder=0, decoder=[])


def score_cuts(pipeline, image, prompt):
    """Three box thresholds keeping about 1/4, 1/2 and 3/4 of the queries."""
    scores = pipeline.detector.select(pipeline.detector.infer(image, prompt), 0.0, 0.0).scores
    return [float(np.quantile(scores, q)) for q in (0.75, 0.5, 0.25)]


def test_threshold_changes_run_no_model(pipeline, image, monkeypatch):
    strict, middle, loose = score_cuts(pipeline, image, PROMPT)
    with model_calls(pipeline, monkeypatch) as calls:
        first = pipeline.run(image, PROMPT, middle, 0.25)
        assert calls == {"infer": 1, "encoder": 1, "decoder": [len(first)]} and len(first) > 0

        reset(calls)  # tighter: a subset of the boxes, all decoded before
        tight = pipeline.run(image, PROMPT, strict, 0.25)
        assert calls == {"infer": 0, "encoder": 0, "decoder": []} and 0 < len(tight) < len(first)

        reset(calls)  # looser: only the new boxes go to the decoder, in one call
        wide = pipeline.run(image, PROMPT, loose, 0.25)
        assert calls == {"infer": 0, "encoder": 0, "decoder": [len(wide) - len(first)]}

        reset(calls)  # text threshold: labels only
        relabelled = pipeline.run(image, PROMPT, middle, 0.9)
        assert calls == {"infer": 0, "encoder": 0, "decoder": []}
        np.testing.assert_array_equal(relabelled.boxes, first.boxes)

        reset(calls)  # the same picture as a new array; the prompt in other case and spacing
        again = pipeline.run(image.copy(), "  A Cat . a remote CONTROL .\n", middle, 0.25)
        assert calls == {"infer": 0, "encoder": 0, "decoder": []}
    assert pipeline.stats.detector_runs == 1 and pipeline.stats.image_embeddings == 1
    assert pipeline.stats.boxes_decoded == len(wide) and pipeline.stats.segment_calls == 2
    # Cached results are the results: same boxes, masks and scores as the first run.
    np.testing.assert_array_equal(again.masks, first.masks)
    np.testing.assert_array_equal(again.mask_scores, first.mask_scores)
    position = {box.tobytes(): i for i, box in enumerate(wide.boxes)}
    for box, mask in zip(first.boxes, first.masks, strict=True):
        np.testing.assert_array_equal(wide.masks[position[box.tobytes()]], mask)


def test_first_run_also_decodes_the_boxes_just_below_the_threshold(detector, image,
                                                                  monkeypatch):
    pipeline = GroundedSAM(detector, BoxSegmenter(tiny_sam()), look_ahead=LookAhead.prefetch(4))
    scores = np.sort(detector.select(detector.infer(image, PROMPT), 0.0, 0.0).scores)[::-1]
    threshold = float(scores[5] + scores[6]) / 2  # 6 boxes above, then 4 within the margin
    assert threshold - scores[10] < 0.1
    with model_calls(pipeline, monkeypatch) as calls:
        assert len(pipeline.run(image, PROMPT, threshold)) == 6
        assert calls["decoder"] == [6 + 4]
        lower = float(scores[9] + scores[10]) / 2
        assert len(pipeline.run(image, PROMPT, lower)) == 10  # the slider moved down: cached
        assert calls["decoder"] == [10]
        lowest = float(scores[11] + scores[12]) / 2
        assert len(pipeline.run(image, PROMPT, lowest)) == 12  # beyond: only the 2 new boxes
        assert calls["decoder"] == [10, 2] and calls["infer"] == 1


def test_new_prompt_reuses_the_embedding_and_new_pixels_do_not(pipeline, image, monkeypatch):
    with model_calls(pipeline, monkeypatch) as calls:
        pipeline.run(image, "a cat", 0.6)
        pipeline.run(image, "a dog", 0.6)
        assert calls["infer"] == 2 and calls["encoder"] == 1
        changed = image.copy()
        changed[0, 0, 0] ^= 1
        pipeline.run(changed, "a dog", 0.6)
        assert calls["infer"] == 3 and calls["encoder"] == 2
    # the detector's image encoder too: once per image (on the CPU)
    assert pipeline.stats.image_encodings == 2


def test_a_new_prompt_on_a_seen_image_gives_what_a_fresh_detector_run_gives(pipeline, image):
    first = pipeline.run(image, "a cat . a dog", 0.3)
    second = pipeline.run(image, "a dog . a remote control", 0.3)
    assert pipeline.stats.image_encodings == 1 and pipeline.stats.detector_runs == 2
    fresh = GroundedSAM(pipeline.detector, pipeline.segmenter, look_ahead=LookAhead.off())
    for ours, prompt in ((first, "a cat . a dog"), (second, "a dog . a remote control")):
        expected = fresh.run(image, prompt, 0.3)
        np.testing.assert_array_equal(ours.boxes, expected.boxes)
        np.testing.assert_array_equal(ours.scores, expected.scores)
        assert ours.phrases == expected.phrases
    raw = pipeline.detector.infer(image, "a dog")
    encoded = pipeline.detector.encode(image)
    same = pipeline.detector.infer(None, "a dog", encoded=encoded)  # the image is not read
    assert same.image_size == raw.image_size
    for (ids, logits, boxes), (ids2, logits2, boxes2) in zip(raw.chunks, same.chunks, strict=True):
        assert ids == ids2 and torch.equal(logits, logits2) and torch.equal(boxes, boxes2)


def test_nothing_detected_still_embeds_so_sliders_never_run_the_encoder(pipeline, image,
                                                                        monkeypatch):
    with model_calls(pipeline, monkeypatch) as calls:
        none = pipeline.run(image, PROMPT, 1.0)
        assert len(none) == 0 and none.masks.shape == (0, 96, 128)
        assert none.mask_scores.shape == (0,) and calls["encoder"] == 1
        assert calls["decoder"] == []
        some = pipeline.run(image, PROMPT, 0.0)  # every query: 50 boxes, in calls of at most 32
        assert calls["infer"] == 1 and calls["encoder"] == 1
        assert calls["decoder"] == [32, len(some) - 32]


def test_mask_i_belongs_to_box_i(pipeline, image):
    result = pipeline.run(image, PROMPT, 0.3)
    assert result.masks.shape == (len(result), 96, 128) and result.masks.dtype == bool
    alone = BoxSegmenter(tiny_sam())
    alone.set_image(image)
    picked = np.linspace(0, len(result) - 1, 6).astype(int)
    for box, mask, score in zip(result.boxes[picked], result.masks[picked],
                                result.mask_scores[picked], strict=True):
        expected, expected_score = alone.segment(box[None])
        assert (expected[0] != mask).mean() < 1e-3
        np.testing.assert_allclose(score, expected_score[0], atol=1e-5)


class StubDetector:
    """Known boxes and scores, one phrase per box; `select` filters by box threshold."""

    def __init__(self, boxes, scores):
        self.boxes, self.scores = np.asarray(boxes, np.float32), np.asarray(scores, np.float32)
        self.phrases = [f"thing {i}" for i in range(len(self.boxes))]

    device = torch.device("cpu")

    def encode(self, image):
        return types.SimpleNamespace(nbytes=0, image_size=(image.shape[1], image.shape[0]))

    def infer(self, image, caption, *, encoded=None):
        encoded = encoded or self.encode(image)
        return RawPrediction(chunks=[], image_size=encoded.image_size)

    def select(self, raw, box_threshold, text_threshold, nms_threshold=None):
        keep = np.flatnonzero(self.scores > box_threshold)
        return Detections(self.boxes[keep], self.scores[keep], [self.phrases[i] for i in keep],
                          keep.astype(np.int64), list(self.phrases))


def painting_segmenter():
    sam = tiny_sam()
    sam.prompt_encoder, sam.mask_decoder = BoxesAsPrompts(), PaintBoxes()
    return BoxSegmenter(sam)


def box_mask(box, shape):
    """True on the pixels whose centre lies in the box."""
    x0, y0, x1, y1 = box
    rows, columns = np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5
    return ((rows >= y0) & (rows <= y1))[:, None] & ((columns >= x0) & (columns <= x1))[None]


def test_boxes_and_masks_land_on_the_right_pixels_fresh_and_cached(image):
    """A SAM whose decoder paints its box: every mask must cover its own box, also when it comes
    back from the (cropped) mask cache next to newly decoded ones."""
    boxes = [[8, 10, 60, 50], [70, 40, 120, 90], [20, 60, 40, 95]]
    pipeline = GroundedSAM(StubDetector(boxes, [0.9, 0.6, 0.4]), painting_segmenter())
    for threshold, count in ((0.5, 2), (0.3, 3), (0.7, 1), (0.3, 3)):
        result = pipeline.run(image, "things", threshold)
        assert len(result) == count
        for box, mask in zip(result.boxes, result.masks, strict=True):
            expected = box_mask(box, mask.shape)
            assert (mask & expected).sum() / (mask | expected).sum() > 0.97
    assert pipeline.stats.boxes_decoded == 3 and pipeline.stats.segment_calls == 2


def test_hundreds_of_detections(image):
    rng = np.random.default_rng(1)
    corners = rng.uniform(0, 66, (300, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1) + 30], axis=1)
    pipeline = GroundedSAM(StubDetector(boxes, np.linspace(0.99, 0.5, 300)),
                           painting_segmenter())
    result = pipeline.run(image, "things", 0.4)
    assert result.masks.shape == (300, 96, 128) and len(result.phrases) == 300
    assert pipeline.stats.boxes_decoded == 300 and pipeline.stats.segment_calls == 1
    for index in range(300):
        expected = box_mask(result.boxes[index], (96, 128))
        mask = result.masks[index]
        assert (mask & expected).sum() / (mask | expected).sum() > 0.97


def test_byte_lru_evicts_least_recently_used_by_bytes():
    cache = ByteLRU(100)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3, 40)  # 120 > 100: the least recently used ("b") goes
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    assert cache.nbytes == 80 and len(cache) == 2
    cache.put("a", 10, 70)  # replacing counts the new size only, then evicts "c"
    assert cache.nbytes == 70 and cache.get("a") == 10 and "c" not in cache
    cache.put("huge", 4, 101)  # larger than the whole budget: not stored, nothing evicted
    assert "huge" not in cache and cache.get("a") == 10


def test_byte_lru_takes_its_own_lock():
    """The background thread `put`s while a request reads, or records for ZeroGPU: every
    operation waits for the cache's own lock (no caller has to remember one)."""
    cache = ByteLRU(1000)
    done = []
    operations = {"put": lambda: cache.put("k", 1, 10), "get": lambda: cache.get("k"),
                  "pop": lambda: cache.pop("k"), "contains": lambda: "k" in cache,
                  "recording": lambda: cache.recording().__enter__()}
    for name, operation in operations.items():
        with cache._lock:
            thread = threading.Thread(target=lambda op=operation, n=name: (op(), done.append(n)))
            thread.start()
            thread.join(0.2)
            assert name not in done, f"{name} ran while another thread held the cache"
        thread.join(5)
        assert name in done
    with cache.recording() as journal:  # a put by another thread is recorded too
        worker = threading.Thread(target=lambda: cache.put("other", 2, 20))
        worker.start()
        worker.join()
    assert journal == [("other", 2, 20)]


def test_pipeline_caches_stay_within_budget_lru(detector, image, monkeypatch):
    other = image[::-1].copy()
    small = GroundedSAM(detector, BoxSegmenter(tiny_sam()), look_ahead=LookAhead.off())
    with model_calls(small, monkeypatch) as calls:
        small.run(image, PROMPT, 0.6)
        # Room for 1.5 times what one image needs (raw outputs, detector features, embedding,
        # masks).
        small.cache.max_bytes = int(small.cache.nbytes * 1.5)
        small.run(other, PROMPT, 0.6)
        assert small.cache.nbytes <= small.cache.max_bytes
        # The least recently used entry went: the first image's detector features (stored
        # first, the largest); its raw outputs and embedding stay, so it runs no model.
        assert small.cache.encoded_image(image_key(image)) is None
        assert small.cache.raw(image_key(image), normalize_caption(PROMPT)) is not None
        small.run(image, PROMPT, 0.6)
        assert small.cache.nbytes <= small.cache.max_bytes
        assert calls["infer"] == 2 and calls["encoder"] == 2

    nothing = GroundedSAM(detector, BoxSegmenter(tiny_sam()), cache_bytes=0,
                          look_ahead=LookAhead.off())
    with model_calls(nothing, monkeypatch) as calls:
        nothing.run(image, PROMPT, 0.6)
        nothing.run(image, PROMPT, 0.6)
        assert calls["infer"] == 2 and len(nothing.cache) == 0


@pytest.mark.parametrize("prompt", ["", "   ", " . ", "\n\t"])
def test_empty_prompts_are_value_errors_before_any_model_runs(pipeline, image, prompt,
                                                               monkeypatch):
    with model_calls(pipeline, monkeypatch) as calls, \
            pytest.raises(ValueError, match="prompt is empty"):
        pipeline.run(image, prompt)
    assert calls == {"infer": 0, "encoder": 0, "decoder": []}


def test_bad_thresholds_and_images_are_value_errors(pipeline, image):
    with pytest.raises(ValueError, match="box_threshold"):
        pipeline.run(image, PROMPT, 1.5)
    with pytest.raises(ValueError):
        pipeline.run(np.zeros((0, 10, 3), np.uint8), PROMPT)
    with pytest.raises(ValueError, match="got int"):
        pipeline.run(42, PROMPT)


def test_prompts_over_256_tokens_keep_every_phrase(pipeline, image):
    phrases = [f"object {i}" for i in range(40)]  # character tokens: about 400 in all
    prompt = " . ".join(phrases)
    ids = pipeline.detector.tokenizer(prompt + " .")["input_ids"]
    assert len(ids) > 256
    result = pipeline.run(image, prompt, 0.0)
    assert result.prompt_phrases == phrases
    assert len(result) == len(result.masks) > 0


def test_load_pipeline_offline_runs_without_files(image, monkeypatch):
    monkeypatch.setattr(sam_module, "urlopen", None)  # any download attempt would fail
    pipeline = load_pipeline(offline=True, device="cpu")
    result = pipeline.run(image, PROMPT, 0.3)
    assert result.masks.shape[1:] == (96, 128)


def test_load_pipeline_names_unknown_detectors():
    with pytest.raises(ValueError, match="unknown detector 'swint'"):
        load_pipeline(detector="swint", device="cpu")


def test_load_pipeline_reports_a_missing_sam_file_before_loading_the_detector(tmp_path,
                                                                              monkeypatch):
    def unreachable(url, timeout):
        raise OSError("Network is unreachable")

    def no_detector(*args, **kwargs):
        raise AssertionError("the detector loaded before the SAM file was found")

    monkeypatch.setenv("SAM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SAM_CHECKPOINT", raising=False)
    monkeypatch.setattr(sam_module, "urlopen", unreachable)
    monkeypatch.setattr(build_module, "load_detector", no_detector)
    with pytest.raises(OfflineError, match="sam_vit_h_4b8939.pth"):
        load_pipeline(sam="vit_h", device="cpu")


def test_max_detections_keeps_the_best_and_counts_the_rest(image):
    rng = np.random.default_rng(2)
    corners = rng.uniform(0, 66, (40, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1) + 30], axis=1)
    pipeline = GroundedSAM(StubDetector(boxes, np.linspace(0.95, 0.4, 40)), painting_segmenter(),
                           look_ahead=LookAhead.off())
    result = pipeline.run(image, "things", 0.5, max_detections=5)
    above = int((np.linspace(0.95, 0.4, 40) > 0.5).sum())
    assert len(result) == 5 and result.omitted == above - 5
    np.testing.assert_array_equal(result.boxes, boxes[:5].astype(np.float32))
    assert result.masks.shape[0] == 5 and pipeline.stats.boxes_decoded == 5
    assert pipeline.run(image, "things", 0.5).omitted == 0
    with pytest.raises(ValueError, match="max_detections"):
        pipeline.run(image, "things", 0.5, max_detections=-1)


def test_background_decodes_below_the_threshold_so_lowering_it_decodes_nothing(
        detector, image, monkeypatch):
    background = GroundedSAM(detector, BoxSegmenter(tiny_sam()),
                             look_ahead=LookAhead.background(6))
    strict, middle, _ = score_cuts(background, image, PROMPT)
    with model_calls(background, monkeypatch) as calls:
        first = background.run(image, PROMPT, middle, 0.25)
        assert background.wait_idle(timeout=60)
        assert background.stats.background_boxes_decoded == 6
        assert background.stats.boxes_decoded == len(first)  # no synchronous prefetch
        everything = detector.select(detector.infer(image, PROMPT), 0.0, 0.25)
        revealing = float(everything.scores[len(first) + 5])  # shows exactly 5 more
        reset(calls)
        lower = background.run(image, PROMPT, revealing, 0.25)
        assert len(lower) == len(first) + 5
        assert calls["decoder"] == [] and calls["infer"] == 0 and calls["encoder"] == 0
    # Masks decoded ahead are the masks a plain pipeline decodes for those boxes (the scores up
    # to float rounding: the decoder's batches differ).
    plain = GroundedSAM(detector, BoxSegmenter(background.segmenter.sam),
                        look_ahead=LookAhead.off())
    expected = plain.run(image, PROMPT, revealing, 0.25)
    np.testing.assert_array_equal(lower.masks, expected.masks)
    np.testing.assert_allclose(lower.mask_scores, expected.mask_scores, atol=1e-5)
    assert background.wait_idle(timeout=60)


def test_an_older_requests_look_ahead_never_replaces_a_newer_ones(detector, image, monkeypatch):
    """Two requests: the first finishes its run but hands its look-ahead over only after the
    second has handed over its own; the background thread must keep the second's."""
    pipeline = GroundedSAM(detector, BoxSegmenter(tiny_sam()),
                           look_ahead=LookAhead.background(4))
    real_submit = BackgroundDecoder.submit
    first_waiting, newer_handed_over = threading.Event(), threading.Event()

    def submit(self, job):
        if job.order == 0:
            first_waiting.set()
            assert newer_handed_over.wait(60)
        real_submit(self, job)
        if job.order == 1:
            newer_handed_over.set()

    monkeypatch.setattr(BackgroundDecoder, "submit", submit)
    with pipeline.hold():  # the background thread waits, so its job can be inspected
        first = threading.Thread(target=pipeline.run, args=(image, PROMPT, 0.5))
        first.start()
        assert first_waiting.wait(60)
        pipeline.run(image[:, ::-1].copy(), PROMPT, 0.5)
        first.join(60)
        assert pipeline.background.job is not None and pipeline.background.job.order == 1
    assert pipeline.wait_idle(timeout=60)


def test_requests_go_before_the_background_and_replace_its_job(detector, monkeypatch):
    """The background decodes a couple of boxes per call and yields to a waiting request; the
    request's own boxes come next, and the older job is dropped for the request's."""
    big = np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    small = np.random.default_rng(4).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    pipeline = GroundedSAM(detector, BoxSegmenter(tiny_sam()),
                           look_ahead=LookAhead.background(40))
    log = []
    segment = pipeline.segmenter.segment

    def slow_segment(boxes):
        log.append(("background" if threading.current_thread().name == "grounded-sam-lookahead"
                    else "request", pipeline.segmenter.predictor.original_size, len(boxes)))
        time.sleep(0.05)
        return segment(boxes)

    monkeypatch.setattr(pipeline.segmenter, "segment", slow_segment)
    first = pipeline.run(big, PROMPT, 0.5, 0.25)
    second = pipeline.run(small, PROMPT, 0.5, 0.25)
    assert pipeline.wait_idle(timeout=60)
    requests = [index for index, (who, _, _) in enumerate(log) if who == "request"]
    big_ahead = [entry for entry in log if entry[0] == "background" and entry[1] == (96, 128)]
    small_ahead = [entry for entry in log if entry[0] == "background" and entry[1] == (64, 80)]
    assert len(requests) == (len(first) > 0) + (len(second) > 0)
    assert len(big_ahead) <= 1, "the first job went on after a newer request"
    assert requests[-1] <= requests[0] + 2, "the second request waited for the background"
    assert all(count <= look_ahead_module.BACKGROUND_CHUNK for _, _, count in small_ahead)
    assert sum(count for _, _, count in small_ahead) == min(
        40, int((detector.select(detector.infer(small, PROMPT), 0.0, 0.25).scores <= 0.5).sum()))


def test_a_failing_background_decode_is_logged_and_requests_still_work(detector, image,
                                                                       monkeypatch, caplog):
    pipeline = GroundedSAM(detector, BoxSegmenter(tiny_sam()),
                           look_ahead=LookAhead.background(4))
    segment = pipeline.segmenter.segment

    def failing_in_background(boxes):
        if threading.current_thread().name == "grounded-sam-lookahead":
            raise RuntimeError("out of memory")
        return segment(boxes)

    monkeypatch.setattr(pipeline.segmenter, "segment", failing_in_background)
    pipeline.run(image, PROMPT, 0.6, 0.25)
    assert pipeline.wait_idle(timeout=60)
    assert "decoding masks ahead failed" in caplog.text
    assert len(pipeline.run(image, PROMPT, 0.3, 0.25)) >= 0  # served as usual
    assert pipeline.wait_idle(timeout=60)


def test_cache_only_answers_from_the_caches_or_raises_cache_miss(pipeline, image):
    from segmentation.results import CacheMiss

    _, middle, loose = score_cuts(pipeline, image, PROMPT)
    with pytest.raises(CacheMiss):  # nothing cached yet
        pipeline.run(image, PROMPT, middle, cache_only=True)
    assert pipeline.stats == pipeline_module.PipelineStats()
    shown = pipeline.run(image, PROMPT, middle)
    again = pipeline.run(image, PROMPT, middle, cache_only=True)
    np.testing.assert_array_equal(again.masks, shown.masks)
    with pytest.raises(CacheMiss, match="mask decoder"):  # more boxes than were decoded
        pipeline.run(image, PROMPT, loose, cache_only=True)


def test_entries_recorded_in_one_pipeline_serve_another(detector, image):
    """What a forked worker computed, copied into its parent (ZeroGPU)."""
    from segmentation.results import CacheMiss

    worker = GroundedSAM(detector, BoxSegmenter(tiny_sam()), look_ahead=LookAhead.prefetch(4))
    parent = GroundedSAM(detector, BoxSegmenter(worker.segmenter.sam),
                         look_ahead=LookAhead.prefetch(4))
    _, middle, _ = score_cuts(worker, image, PROMPT)
    with worker.cache.recording() as added:
        expected = worker.run(image, PROMPT, middle)
    kinds = {key[0] for key, _, _ in added}
    assert kinds == {"raw", "encoded", "embedding", "mask"}
    with pytest.raises(CacheMiss):
        parent.run(image, PROMPT, middle, cache_only=True)
    parent.adopt(added)
    result = parent.run(image, PROMPT, middle, cache_only=True)
    np.testing.assert_array_equal(result.masks, expected.masks)
    assert parent.stats.detector_runs == parent.stats.image_embeddings == 0


def test_an_image_prepared_ahead_is_embedded_once_and_the_run_reuses_it(pipeline, image,
                                                                          monkeypatch):
    with model_calls(pipeline, monkeypatch) as calls:
        pipeline.prepare(image)
        assert pipeline.preparer.wait_idle(timeout=60)
        assert calls["encoder"] == 1 and calls["infer"] == 0
        assert pipeline.stats.image_encodings == 1  # the detector's image features too
        pipeline.prepare(image.copy())  # cached: nothing to do
        assert pipeline.preparer.wait_idle(timeout=60) and calls["encoder"] == 1
        result = pipeline.run(image, PROMPT, 0.3, 0.25)
        assert calls["encoder"] == 1 and calls["infer"] == 1
        assert pipeline.stats.image_encodings == 1
    expected = GroundedSAM(pipeline.detector, pipeline.segmenter,
                           look_ahead=LookAhead.off()).run(image, PROMPT, 0.3, 0.25)
    np.testing.assert_array_equal(result.masks, expected.masks)
    with pytest.raises(ValueError):
        pipeline.prepare(np.zeros((2, 500, 3), np.uint8))  # too thin, as run says


def test_only_the_newest_waiting_image_is_prepared(pipeline, image, monkeypatch):
    """While one embedding runs, newer uploads replace each other: the last one is embedded."""
    images = [np.ascontiguousarray(np.roll(image, shift, axis=1)) for shift in (1, 2, 3, 4)]
    with model_calls(pipeline, monkeypatch) as calls:
        with pipeline._lock:  # a request is running
            pipeline.prepare(images[0])
            while pipeline.preparer._next is not None:  # taken by the thread, waiting
                time.sleep(0.01)
            for each in images[1:]:
                pipeline.prepare(each)
        assert pipeline.preparer.wait_idle(timeout=60)
        assert calls["encoder"] == 2  # the first (taken before the lock was free) and the last
    keys = [pipeline.cache.embedding(image_key(each)) is not None for each in images]
    assert keys[-1] and not any(keys[1:-1])
