"""Faithfulness-metric throughput (images/s): deletion + insertion at `--steps` steps, scored by
`xtl.faithfulness.score` exactly as `xtl faithfulness` scores a map set, explanation excluded.

    .venv/bin/python bench/faithfulness_throughput.py [--device cuda] [--models resnet34 vit_b16_in21k]
        [--images 512] [--steps 20] [--batch 256] [--bf16] [--json FILE] [--markdown FILE]

Per image: the unperturbed and the fully masked image once, and 2 x (steps - 1) masked copies
(most relevant first for deletion, least relevant first for insertion), each a forward pass; the
maps are seeded random maps (ranking and masking cost the same for any map). Random-init models
of 10 classes; CIFAR-10 images resized to each model's input. `--bf16` runs the same call under
bf16 autocast (`score(..., bf16=True)`, what `xtl faithfulness` does on a GPU; float32 is its CPU
default). Median of `--repeats` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import header, markdown_table, median, save, timed, uint8_images
from xtl.config import preset
from xtl.faithfulness.perturbation import random_maps, score
from xtl.models import build_model
from xtl.runs import model_preprocess

MODELS = ("resnet34", "vit_b16_in21k")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=None, help="input size (default: each model's own)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64, help="forward passes per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="also time the call under bf16 autocast")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    pool, labels = uint8_images(args.images)
    rows = []
    for name in args.models:
        model, spec = build_model(name, 10, pretrained=False, input_size=args.size)
        model.to(args.device).eval()
        images = model_preprocess(preset("default", name, input_size=args.size))(pool.to(args.device))
        maps = random_maps((len(images), *images.shape[-2:]), seed=0, device=args.device)
        precisions = ["fp32"] + (["bf16-autocast"] if args.bf16 else [])
        for precision in precisions:
            def run(n=len(images), model=model, images=images, maps=maps, bf16=precision != "fp32"):
                return score(model, images[:n], labels[:n], maps[:n], steps=args.steps, batch_size=args.batch,
                             metrics=["deletion", "insertion"], bf16=bf16)

            run(min(4, len(images)))  # warm-up
            seconds = [timed(run, args.device) for _ in range(args.repeats)]
            passes = len(images) * (2 + 2 * (args.steps - 1))
            row = {"model": name, "input": spec.input_size, "precision": precision, "images": len(images),
                   "steps": args.steps, "batch": args.batch, "images_per_s": len(images) / median(seconds),
                   "forward_passes_per_s": passes / median(seconds)}
            rows.append(row)
            print(f"  {row}", flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
        # saved after every model, so that a time limit keeps what was measured
        results = {**header(args.device), "benchmark": "faithfulness_throughput", "rows": rows}
        head = (f"Faithfulness throughput (deletion + insertion), {results['machine']}, {results['date']}, "
                f"torch {results['torch']}, random init\n\n")
        columns = ["model", "input", "precision", "images", "steps", "batch", "images_per_s", "forward_passes_per_s"]
        save(results, args.json, head + markdown_table(rows, columns), args.markdown)


if __name__ == "__main__":
    main()
