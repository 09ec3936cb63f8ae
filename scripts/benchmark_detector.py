"""Grounding DINO forward latency on this machine, printed as a table.

Random weights (timings do not depend on them). Stages: image encoder (Swin + projections), text +
feature enhancer + query selection + decoder (`ground`). Also peak RSS and CPU-seconds per
wall-second (about 2.0 on an idle 2-core machine; lower means other jobs competed).

    python scripts/benchmark_detector.py --config swint_ogc --size 800x1200 --runs 3 [--bf16]
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch
from timing import timed  # scripts/timing.py, beside this script

from grounding.config import PRESETS
from grounding.model import build_model
from grounding.text_masks import BERT_SPECIAL_TOKEN_IDS, sub_sentence_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="swint_ogc", choices=sorted(PRESETS))
    parser.add_argument("--size", default="800x1200", help="HxW of the (resized) input")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="torch.autocast to bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.split("x"))
    device = torch.device(args.device)

    model = build_model(PRESETS[args.config]()).eval().to(device)
    pixels = torch.randn(1, 3, height, width, device=device)
    # "a cat . a remote control ." in bert-base-uncased ids
    input_ids = torch.tensor([[101, 1037, 4937, 1012, 1037, 6556, 2491, 1012, 102]],
                             device=device)
    token_mask = torch.ones_like(input_ids, dtype=torch.bool)
    masks = sub_sentence_masks(input_ids, token_mask, BERT_SPECIAL_TOKEN_IDS)

    rows = {"image encoder": [], "text + enhancer + decoder": [], "total": []}
    load = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    with torch.inference_mode(), autocast:
        for run in range(args.runs + 1):
            features, (image_s, image_load) = timed(lambda: model.encode_image(pixels), device)
            _, (ground_s, ground_load) = timed(
                lambda features=features: model.ground(features, input_ids, token_mask,
                                                       text_masks=masks), device)
            if run == 0:
                continue  # warm-up
            rows["image encoder"].append(image_s)
            rows["text + enhancer + decoder"].append(ground_s)
            rows["total"].append(image_s + ground_s)
            load.append((image_load * image_s + ground_load * ground_s) / (image_s + ground_s))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{args.config} {height}x{width} on {device} ({args.threads} threads"
          f"{', bf16 autocast' if args.bf16 else ', fp32'}), {args.runs} runs after a warm-up")
    print("| stage | median s | runs |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.2f} | "
              f"{' / '.join(f'{v:.2f}' for v in values)} |")
    print(f"cpu/wall {statistics.median(load):.2f}; peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
