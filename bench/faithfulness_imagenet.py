"""Faithfulness of six explanation methods on EfficientNet-Lite0 (real ImageNet-1k weights, its own
head) and the first 200 imagenet-sample images at 224 px, with the random and uniform maps.

    .venv/bin/python bench/faithfulness_imagenet.py [--images 200] [--steps 10] [--ig-steps 16] [--device cpu]

Prints the Markdown table and the throughput of the metric itself (perturbed forward passes only,
explanations excluded). CSV and curves land in --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from xtl.faithfulness import faithfulness_imagenet, markdown_table

METHODS = ["gradcam", "gradcam++", "layercam", "saliency", "integrated_gradients", "lrp_epsilon"]
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10, help="10: Chefer's 10 %% steps")
    parser.add_argument("--ig-steps", type=int, default=16, help="integrated gradients: interpolation steps")
    parser.add_argument("--baseline", default="zero")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sample", type=Path, default=REPO / "../shared/data/imagenet-sample")
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench-faithfulness-imagenet")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    result = faithfulness_imagenet(
        args.sample, "efficientnet_lite0", METHODS, args.images, args.out, args.steps, args.baseline, args.batch,
        device=args.device, progress=not args.no_progress,
        method_options={"integrated_gradients": {"n_steps": args.ig_steps, "internal_batch_size": 64}},  # caps memory
    )
    total = time.perf_counter() - started
    score_s = sum(m.score_seconds for m in result.methods)
    image_maps = result.n_images * len(result.methods)
    passes = image_maps * 2 * (args.steps - 1)
    print(markdown_table(result.rows()))
    print(f"device {args.device}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} steps, "
          f"baseline {args.baseline}, integrated gradients {args.ig_steps} steps")
    print(f"metric: {image_maps} image-maps (all four metrics each) in {score_s:.1f} s = {image_maps / score_s:.2f} "
          f"images/s ({passes / score_s:.1f} perturbed forward passes/s; predicted-class maps, shared end points excluded)")
    print(f"wall time of the whole benchmark: {total:.0f} s")


if __name__ == "__main__":
    main()
