"""Our code against its peers, in one process, on the same random weights, pixels and caption.

Compared, stage by stage (ours | peer):
- detector forward: `Detector.detect(pixels, caption)` (our Grounding DINO, loaded through our
  transformers-format loader from the directory transformers' `save_pretrained` wrote) |
  transformers' `GroundingDinoForObjectDetection` forward on the same pixels and token ids
  (`token_type_ids` zeros, under `inference_mode`). Both sides tokenize inside the timing.
- SAM image embedding: `BoxSegmenter.embed(image)` on the SAM `segmentation.sam.build_sam` loads
  from the weights saved to a temp file | `SamPredictor.set_image(image)` on segment_anything's
  model with those weights.
- mask decoding of --boxes fixed boxes: `BoxSegmenter.segment(boxes)` |
  `SamPredictor.predict_torch` on `transform.apply_boxes_torch` boxes, `multimask_output=False`,
  masks and scores copied to the host (as `segment` returns them).
- app first run: `GroundedSAM(...).run(image, caption, threshold)` on a fresh pipeline each time
  (no cache hits, no prefetch: detector, SAM embedding and masks) | the same chain from the
  peers: `GroundingDinoProcessor` -> transformers' forward ->
  `post_process_grounded_object_detection` -> boxes clipped to the image -> `set_image` ->
  `predict_torch`. The box threshold lies midway between our --boxes-th best score and the
  next, so a run shows exactly --boxes boxes.

Weights: transformers' `GroundingDinoConfig()` (SwinT-OGC) perturbed with noise (its init zeroes
some layers), its decoder's last LayerNorm scaled down so that scores do not saturate at 1.0,
saved with a `GroundingDinoProcessor` whose resize keeps the --size image as it is (800 x 1200 is
also what the reference resize gives), then loaded by `grounding.load_detector`. SAM: the
`segment_anything` registry's --sam-variant, default init after a fixed seed. The image is
seeded uniform noise. Each stage's outputs are compared (last column) so the comparison is
honest: detector queries are paired by the image cell they were selected from.

Timing: one warm-up per side and stage, then --runs rounds; in each round every stage runs ours
then the peer, or the peer then ours (alternating by round). Medians per stage, ratio = ours /
peer (below 1: ours is faster); also each round's own ratio (its median, lowest and highest),
which a machine that slows down or speeds up during the run moves less than the medians. Peak
RSS (`getrusage`) covers the whole process, both sides together; on CUDA the peak allocated GPU
memory is also taken per stage and side. `--json OUT` keeps every raw time. Figures belong in
the README or notes together with the command line and the machine (the header line of the
output).

    # CPU, full size: about 1.5 min per round on 2 cores (the warm-up is one more); both
    # detectors and SAM sit in memory (several GB), and the saved model (~0.7 GB) in a temp dir
    OMP_NUM_THREADS=2 python scripts/benchmark_peers.py --runs 3 --json peers_cpu.json
    # CUDA
    python scripts/benchmark_peers.py --device cuda --runs 10 --json peers_cuda.json
    # quick check of the script itself (tiny random models, a few seconds)
    OMP_NUM_THREADS=1 python scripts/benchmark_peers.py --tiny --runs 2
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timing  # scripts/timing.py, beside this script
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grounding  # noqa: E402
from grounding.transforms import preprocess  # noqa: E402
from segmentation.pipeline import GroundedSAM, LookAhead  # noqa: E402
from segmentation.sam import BoxSegmenter, build_sam  # noqa: E402
from segmentation.sam_attention import accelerate_sam  # noqa: E402

VOCAB = Path(__file__).resolve().parents[1] / "tests" / "data" / "bert-base-uncased-vocab.txt"
CAPTION = "a cat . a remote control ."
TEXT_THRESHOLD = 0.25


@dataclass
class Stage:
    """One row: two callables doing the same work, and how to compare their outputs."""

    name: str
    ours: Callable[[], object]
    peer: Callable[[], object]
    difference: Callable[[object, object], str]
    seconds: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "peer": []})
    cuda_peak_bytes: dict[str, int] = field(default_factory=lambda: {"ours": 0, "peer": 0})
    compared: str = ""


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # fp32 means fp32: PyTorch's default runs convolutions in TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    height, width = args.size or ((256, 384) if args.tiny else (800, 1200))
    image = np.random.default_rng(args.seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as directory:
        hf_model, processor = save_random_transformers_model(Path(directory), args.tiny,
                                                             (height, width), args.seed)
        detector = grounding.load_detector(directory, device=device)
        sam = build_random_sam(args.sam_variant, args.tiny, args.seed).to(device).eval()
        our_sam = load_our_sam(sam, args.sam_variant, args.tiny, Path(directory), device)
    hf_model.to(device)
    stages = build_stages(args, device, image, hf_model, processor, detector, our_sam, sam)
    rss_before = current_rss_bytes()
    for stage in stages:  # warm-up, and the outputs that are compared
        stage.compared = stage.difference(stage.ours(), stage.peer())
    for round_index in range(args.runs):
        for stage in stages:
            sides = ("ours", "peer") if round_index % 2 == 0 else ("peer", "ours")
            for side in sides:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _, (seconds, _) = timing.timed(getattr(stage, side), device)
                stage.seconds[side].append(seconds)
                if device.type == "cuda":
                    stage.cuda_peak_bytes[side] = max(stage.cuda_peak_bytes[side],
                                                      torch.cuda.max_memory_allocated(device))
    report(args, device, (height, width), stages, rss_before)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's, from OMP_NUM_THREADS)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="image height and width (default 800 1200; 256 384 with --tiny)")
    parser.add_argument("--boxes", type=int, default=5, help="boxes decoded by SAM")
    parser.add_argument("--sam-variant", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random detector and SAM, to check this script quickly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="write every raw time, the medians and the differences here")
    args = parser.parse_args()
    if args.runs < 1 or args.boxes < 1:
        parser.error("--runs and --boxes must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    return args


def save_random_transformers_model(directory: Path, tiny: bool, size: tuple[int, int],
                                   seed: int):
    """transformers' detector with random weights and its processor, saved to `directory`.

    Returns:
        the model (eval mode, CPU) and the `GroundingDinoProcessor` (bert-base-uncased
        vocabulary, a resize that leaves an image of `size` as it is).
    """
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    if tiny:  # tests/helpers.py tiny_transformers_config
        config = GroundingDinoConfig(
            backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                                       window_size=7, out_indices=[2, 3, 4]),
            text_config=BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=30522),
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
            num_queries=30)
    else:
        config = GroundingDinoConfig()
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # its init zeroes some layers: use every weight
            parameter.add_(torch.randn_like(parameter) * 0.02)
        # Random logits are large (all scores ~1.0): spread them so thresholds pick boxes.
        model.model.decoder.layer_norm.weight.mul_(0.05)
        model.model.decoder.layer_norm.bias.mul_(0.05)
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": min(size), "longest_edge": max(size)})
    # transformers 5 ignores `vocab_file=`: the vocabulary goes in as `vocab=`.
    tokenizer = BertTokenizer(vocab=str(VOCAB), do_lower_case=True)
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def build_random_sam(variant: str, tiny: bool, seed: int):
    if tiny:
        from segmentation.tiny_models import tiny_sam

        return tiny_sam(seed)
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    return sam_model_registry[variant](checkpoint=None)


def load_our_sam(sam, variant: str, tiny: bool, directory: Path, device: torch.device):
    """`sam`'s weights as our code loads them: saved, then `build_sam` (SDPA attention).

    The tiny SAM is not in segment_anything's registry: it gets `accelerate_sam`, the step
    `build_sam` adds to the registry's model."""
    if tiny:
        return accelerate_sam(copy.deepcopy(sam))
    path = directory / f"sam_{variant}.pth"
    torch.save(sam.state_dict(), path)
    return build_sam(variant, path, device=device)


def build_stages(args, device, image, hf_model, processor, detector, our_sam,
                 sam) -> list[Stage]:
    from segment_anything import SamPredictor

    height, width = image.shape[:2]
    tokenizer = detector.tokenizer
    pixels = preprocess(image, min(height, width), max(height, width))
    pixels = pixels[None].to(device)

    def peer_detect():
        tokens = tokenizer([CAPTION], padding="longest", return_tensors="pt").to(device)
        with torch.inference_mode():
            return hf_model(pixel_values=pixels, input_ids=tokens["input_ids"],
                            attention_mask=tokens["attention_mask"],
                            token_type_ids=torch.zeros_like(tokens["input_ids"]))

    n_tokens = len(tokenizer(CAPTION)["input_ids"])
    segmenter, predictor = BoxSegmenter(our_sam), SamPredictor(sam)
    boxes = fixed_boxes(args.boxes, height, width, args.seed)

    def peer_masks():
        return peer_decode(predictor, boxes, (height, width), device)

    # The box threshold that shows exactly --boxes boxes (from our raw scores).
    scores = detector.select(detector.infer(image, CAPTION), 0.0, TEXT_THRESHOLD).scores
    if len(scores) <= args.boxes or scores[args.boxes - 1] <= scores[args.boxes]:
        raise RuntimeError(f"cannot pick a threshold for exactly {args.boxes} boxes "
                           f"(scores {np.round(scores[:args.boxes + 1], 4).tolist()})")
    threshold = float(scores[args.boxes - 1] + scores[args.boxes]) / 2

    def ours_app():
        result = GroundedSAM(detector, segmenter, look_ahead=LookAhead.off()).run(
            image, CAPTION, box_threshold=threshold, text_threshold=TEXT_THRESHOLD)
        return result.boxes, result.scores, result.masks

    def peer_app():
        inputs = processor(images=image, text=CAPTION, return_tensors="pt").to(device)
        with torch.inference_mode():
            outputs = hf_model(**inputs)
        found = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=threshold, text_threshold=TEXT_THRESHOLD,
            target_sizes=[(height, width)])[0]
        found_boxes, masks = peer_boxes_to_masks(predictor, image, found["boxes"])
        return found_boxes, found["scores"].cpu().numpy(), masks

    return [
        Stage("detector forward", lambda: detector.detect(pixels, CAPTION), peer_detect,
              lambda ours, peer: detector_difference(ours, peer, n_tokens)),
        Stage("SAM image embedding", lambda: segmenter.embed(image),
              lambda: predictor.set_image(image),
              lambda ours, _: f"max abs {max_abs(ours.features, predictor.features):.1e}"),
        # The embedding stage has just set this image on both sides (and so has the app stage).
        Stage(f"mask decoding, {args.boxes} boxes", lambda: segmenter.segment(boxes), peer_masks,
              mask_difference),
        Stage(f"app first run, {args.boxes} boxes", ours_app, peer_app, app_difference),
    ]


def fixed_boxes(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """(count, 4) float32 x0, y0, x1, y1 boxes of at least an eighth of each side."""
    rng = np.random.default_rng(seed + 1)
    corner = rng.uniform(0, 0.6, (count, 2))
    extent = rng.uniform(0.125, 0.4, (count, 2))
    scale = np.array([width, height])
    return np.concatenate([corner * scale, (corner + extent) * scale], 1).astype(np.float32)


def max_abs(a, b) -> float:
    a, b = torch.as_tensor(a).float().cpu(), torch.as_tensor(b).float().cpu()
    return float((a - b).abs().max()) if a.numel() else 0.0


def detector_difference(ours, peer, n_tokens: int) -> str:
    """Boxes and caption-token logits of the queries both sides put in the same slot from the
    same image cell; queries swapped between near-tied scores are counted, not compared."""
    ours_cells = ours.query_indices[0].cpu().tolist()
    scores = peer.enc_outputs_class[0].max(-1).values  # the query-selection ranking
    peer_cells = scores.topk(len(ours_cells)).indices.cpu().tolist()
    same = torch.tensor([a == b for a, b in zip(ours_cells, peer_cells, strict=True)])
    boxes = max_abs(ours.boxes[0].cpu()[same], peer.pred_boxes[0].cpu()[same])
    logits = max_abs(ours.logits[0, :, :n_tokens].cpu()[same],
                     peer.logits[0, :, :n_tokens].cpu()[same])
    selected = len(set(ours_cells) & set(peer_cells))
    return (f"boxes {boxes:.1e}, logits {logits:.1e} ({int(same.sum())}/{len(same)} queries "
            f"same slot, {selected} same cells)")


def mask_difference(ours, peer) -> str:
    (ours_masks, ours_scores), (peer_masks, peer_scores) = ours, peer
    differing = int((ours_masks != peer_masks).sum())
    return f"{differing} mask pixels differ; IoU scores {max_abs(ours_scores, peer_scores):.1e}"


def peer_decode(predictor, boxes: np.ndarray, size: tuple[int, int], device: torch.device):
    """The peer's mask decoding on the image already set: `predict_torch` for boxes (N, 4) x0,
    y0, x1, y1 in pixels of an image of `size` (H, W), one mask each; (masks (N, H, W) bool,
    IoU scores (N,)) as NumPy."""
    prompts = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, device=device), size)
    with torch.inference_mode():
        masks, scores, _ = predictor.predict_torch(None, None, boxes=prompts,
                                                   multimask_output=False)
    return masks[:, 0].cpu().numpy(), scores[:, 0].float().cpu().numpy()


def peer_boxes_to_masks(predictor, image: np.ndarray, boxes):
    """The peers' box -> mask chain: boxes (N, 4) x0, y0, x1, y1 clipped to the image,
    `set_image`, `predict_torch` with `multimask_output=False`; (boxes, masks (N, H, W) bool) as
    NumPy."""
    height, width = image.shape[:2]
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    predictor.set_image(image)
    prompts = predictor.transform.apply_boxes_torch(boxes, (height, width))
    with torch.inference_mode():
        masks, _, _ = predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)
    return boxes.cpu().numpy(), masks[:, 0].cpu().numpy()


def app_difference(ours, peer) -> str:
    """Boxes (pixels), scores and masks, both sides in descending score order (transformers'
    post-processing keeps query order)."""
    (ours_boxes, ours_scores, ours_masks), (peer_boxes, peer_scores, peer_masks) = ours, peer
    if len(ours_boxes) != len(peer_boxes):
        return f"{len(ours_boxes)} boxes vs {len(peer_boxes)}"
    order = np.argsort(-peer_scores, kind="stable")
    differing = int((ours_masks != peer_masks[order]).sum())
    return (f"{len(ours_boxes)} boxes; boxes {max_abs(ours_boxes, peer_boxes[order]):.1e} px, "
            f"scores {max_abs(ours_scores, peer_scores[order]):.1e}; {differing} mask pixels "
            "differ")


def current_rss_bytes() -> int | None:
    """This process's resident set size now (Linux), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def report(args, device, size, stages: list[Stage], rss_before: int | None) -> None:
    import transformers

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    rss_now = current_rss_bytes()
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads")
    precision = "fp32 (TF32 off)" if device.type == "cuda" else "fp32"
    header = (f"{'tiny' if args.tiny else 'SwinT-OGC'} Grounding DINO + SAM "
              f"{'tiny' if args.tiny else args.sam_variant}, {size[0]}x{size[1]} image, "
              f"{device} ({machine}), {precision}, {args.runs} interleaved runs after a warm-up; "
              f"torch {torch.__version__}, transformers {transformers.__version__}")
    cuda = device.type == "cuda"
    print(header)
    print("| stage | ours s | peer s | ratio (ours/peer) | per round: median (range) "
          "| output difference |" + (" GPU peak ours / peer GB |" if cuda else ""))
    print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    rows = []
    for stage in stages:
        ours, peer = (statistics.median(stage.seconds[side]) for side in ("ours", "peer"))
        paired = [a / b for a, b in zip(stage.seconds["ours"], stage.seconds["peer"], strict=True)]
        line = (f"| {stage.name} | {ours:.3f} | {peer:.3f} | {ours / peer:.2f} | "
                f"{statistics.median(paired):.2f} ({min(paired):.2f}-{max(paired):.2f}) | "
                f"{stage.compared} |")
        if cuda:
            line += (f" {stage.cuda_peak_bytes['ours'] / 1e9:.2f} / "
                     f"{stage.cuda_peak_bytes['peer'] / 1e9:.2f} |")
        print(line)
        rows.append({"stage": stage.name, "seconds": stage.seconds,
                     "median_s": {"ours": ours, "peer": peer}, "ratio": ours / peer,
                     "ratio_per_round": paired,
                     "output_difference": stage.compared,
                     **({"cuda_peak_bytes": stage.cuda_peak_bytes} if cuda else {})})

    def gb(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 1e9:.2f} GB"

    print(f"peak RSS {gb(peak_rss)} (whole process, both sides); RSS after loading "
          f"{gb(rss_before)}, at the end {gb(rss_now)}")
    if args.json:
        args.json.write_text(json.dumps({
            "header": header, "command": sys.argv, "args": {k: str(v) for k, v in
                                                           vars(args).items()},
            "stages": rows, "peak_rss_bytes": peak_rss, "rss_after_loading_bytes": rss_before,
            "rss_end_bytes": rss_now}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
