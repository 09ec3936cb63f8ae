"""Training speed and peak memory of `grounding.train`'s step on this machine, printed as a table.

Random weights (`--config` from scratch), drawn rectangles as data. One optimiser step is exactly
the trainer's: the criterion over every decoder layer and the encoder proposals, backward, gradient
clipping and AdamW over the three parameter groups. The first step is a warm-up; the table shows
the median of the timed ones and the data-loading share. Each config runs in its own process, so
its peak RSS (`resource.getrusage`, which also counts the model, the optimiser state and the
activations of backward) is its own.

    python scripts/benchmark_train.py --configs tiny swint_ogc --batch-size 2 \\
        --size 800 --steps 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from timing import timed  # scripts/timing.py, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grounding.config import LossConfig  # noqa: E402
from grounding.dataset import CocoGroundingDataset  # noqa: E402
from grounding.losses import SetCriterion  # noqa: E402
from grounding.model import build_model  # noqa: E402
from grounding.optim import parameter_groups  # noqa: E402
from grounding.train import load_tokenizer  # noqa: E402
from grounding.train_args import SCRATCH_CONFIGS  # noqa: E402
from grounding.training_step import accumulate_gradients, epoch_batches  # noqa: E402

VOCAB = Path(__file__).resolve().parent.parent / "tests" / "data" / "bert-base-uncased-vocab.txt"
NAMES = ["red square", "blue circle", "green triangle", "yellow star", "traffic light", "dog"]


def write_images(root: Path, count: int, width: int, height: int, seed: int = 0,
                 ) -> tuple[Path, Path]:
    """`count` images of 1-4 coloured rectangles in COCO format; returns (folder, JSON)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        image = Image.new("RGB", (width, height), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 5))):
            w, h = (int(v) for v in rng.integers(width // 10, width // 3, size=2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            category = int(rng.integers(1, len(NAMES) + 1))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            draw.rectangle([x, y, x + w, y + h], fill=colour)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": 0})
        image.save(root / "images" / f"{image_id}.jpg", quality=90)
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width,
                       "height": height})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(NAMES)]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return root / "images", path


def measure(args: argparse.Namespace) -> dict:
    """Time `args.steps` steps of one config after a warm-up step (run in a child process)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.text_encoder)
    model = build_model(SCRATCH_CONFIGS[args.one](len(tokenizer))).to(device).train()
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(parameter_groups(model, lr=1e-4, lr_backbone=1e-5,
                                                   lr_text=1e-5, weight_decay=1e-4))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    criterion = SetCriterion(LossConfig())
    special = (tokenizer.cls_token_id, tokenizer.sep_token_id,
               *tokenizer.convert_tokens_to_ids([".", "?"]))
    width, height = (int(v) for v in args.image_size.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        data = write_images(Path(folder), args.batch_size * (args.steps + 1), width, height)
        dataset = CocoGroundingDataset(*data, tokenizer, train=True, sizes=(args.size,),
                                       max_size=args.max_size, flip_prob=0.0)
        batches = iter(epoch_batches(dataset, batch_size=args.batch_size, seed=0, epoch=0,
                                     workers=0))
        step_seconds, data_seconds, load = [], [], []
        for step in range(args.steps + 1):
            start = time.perf_counter()
            batch = next(batches)
            loading = time.perf_counter() - start

            def optimiser_step(batch=batch) -> None:
                accumulate_gradients(model, criterion, [batch], device, special, args.bf16)
                torch.nn.utils.clip_grad_norm_(trainable, 0.1)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            _, (seconds, cpu_per_wall) = timed(optimiser_step, device)
            if step > 0:  # the first step is a warm-up
                step_seconds.append(seconds + loading)
                data_seconds.append(loading)
                load.append(cpu_per_wall)
    median = statistics.median(step_seconds)
    return {
        "config": args.one, "parameters": parameters, "batch": args.batch_size,
        "input": f"{tuple(batch.pixels.shape[-2:])}", "seconds_per_step": median,
        "steps_per_second": 1 / median, "images_per_second": args.batch_size / median,
        "data_share": statistics.median(data_seconds) / median,
        "cpu_per_wall": statistics.median(load),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "peak_cuda_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
        "steps": " / ".join(f"{s:.2f}" for s in step_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "swint_ogc"],
                        choices=sorted(SCRATCH_CONFIGS))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=800, help="short side after resizing")
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--image-size", default="1066x800", help="WxH of the drawn images")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--text-encoder", default=str(VOCAB), help="vocab.txt or its folder")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process's config
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return

    rows = []
    for config in args.configs:
        command = [sys.executable, __file__, "--one", config, *sys.argv[1:]]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            print(f"{config}: failed\n{finished.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(finished.stdout.strip().splitlines()[-1]))
    print(f"training steps on {args.device} ({args.threads} threads, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}), median of {args.steps} after a warm-up")
    print("| config | parameters | batch | input HxW | s/step | steps/s | images/s | data share "
          "| cpu/wall | peak RSS GB | peak CUDA GB | steps (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cuda = "-" if row["peak_cuda_gb"] is None else f"{row['peak_cuda_gb']:.2f}"
        print(f"| {row['config']} | {row['parameters'] / 1e6:.1f} M | {row['batch']} | "
              f"{row['input']} | {row['seconds_per_step']:.2f} | {row['steps_per_second']:.3f} | "
              f"{row['images_per_second']:.2f} | {100 * row['data_share']:.0f} % | "
              f"{row['cpu_per_wall']:.2f} | {row['peak_rss_gb']:.2f} | {cuda} | {row['steps']} |")


if __name__ == "__main__":
    main()
