"""Our pipeline alone, in a fresh process: the app's first run and the process's peak RSS.

`scripts/benchmark_peers.py` holds both sides (ours and the peers' models) in one process, so its
peak RSS is theirs and ours together; this script holds only ours: full-size SwinT-OGC Grounding
DINO with random weights, SAM (`build_sam` from a saved random state dict, as a real checkpoint
loads), then --runs runs of `GroundedSAM(...).run` on a fresh pipeline each (no cache, no
look-ahead: detector, SAM embedding and --boxes masks), on a seeded noise image, and after each
a run with another prompt on the same image (what is cached per image is reused). It uses only
public API that older commits have too, so it can measure them as well (from a worktree).

    OMP_NUM_THREADS=2 python scripts/first_run.py              # ~1 min on 2 cores
    OMP_NUM_THREADS=2 python scripts/first_run.py --prepared   # Segment after the upload's
                                                               # embedding finished
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from grounding.config import swint_ogc  # noqa: E402
from grounding.model import build_model  # noqa: E402
from grounding.predictor import Detector  # noqa: E402
from segmentation.pipeline import GroundedSAM, LookAhead  # noqa: E402
from segmentation.sam import BoxSegmenter, build_sam  # noqa: E402

VOCAB = ROOT / "tests" / "data" / "bert-base-uncased-vocab.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--boxes", type=int, default=5, help="detections kept and segmented")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1200), metavar=("H", "W"))
    parser.add_argument("--sam-variant", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--prepared",
        action="store_true",
        help="as in the app after an upload: SAM's embedding computed first (`prepare`, not "
        "timed), then the run",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from segment_anything import sam_model_registry
    from transformers import BertTokenizerFast

    torch.manual_seed(0)
    detector = Detector(build_model(swint_ogc()), BertTokenizerFast(str(VOCAB)), "cpu")
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "sam.pth"
        torch.save(sam_model_registry[args.sam_variant]().state_dict(), path)
        segmenter = BoxSegmenter(build_sam(args.sam_variant, path, device="cpu"))
    image = np.random.default_rng(0).integers(0, 256, (*args.size, 3), dtype=np.uint8)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    seconds, new_prompt = [], []
    for _ in range(args.runs):
        pipeline = GroundedSAM(detector, segmenter, look_ahead=LookAhead.off())
        if args.prepared:
            pipeline.prepare(image)
            pipeline.preparer.wait_idle()
        start = time.perf_counter()
        result = pipeline.run(
            image, "a cat . a remote control .", 0.0, 0.0, max_detections=args.boxes
        )
        seconds.append(time.perf_counter() - start)
        start = time.perf_counter()  # another prompt on the same image: images' parts cached
        pipeline.run(image, "a dog . a person .", 0.0, 0.0, max_detections=args.boxes)
        new_prompt.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"SwinT-OGC + SAM {args.sam_variant}, {args.size[0]}x{args.size[1]}, "
        f"{torch.get_num_threads()} threads, {len(result.boxes)} boxes: first runs"
        f"{' after prepare' if args.prepared else ''} "
        f"{', '.join(f'{s:.2f}' for s in seconds)} s, then a new prompt "
        f"{', '.join(f'{s:.2f}' for s in new_prompt)} s; peak RSS {peak:.2f} GB "
        f"({loaded:.2f} GB after loading)"
    )


if __name__ == "__main__":
    main()
