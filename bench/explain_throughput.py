"""Explanations per second, per method and model (batched, random images, real weights).

    .venv/bin/python bench/explain_throughput.py [--device cuda] [--size 224] [--batch 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from xtl.explain import explain, methods_for
from xtl.models import build_model

MODELS = ("efficientnet_lite0", "vit_s14_dinov2")
SLOW = {"scorecam", "integrated_gradients", "smoothgrad"}  # many forward passes per image


def measure(model, images: torch.Tensor, method: str, repeats: int) -> float:
    explain(model, images[:2], method=method)  # warm-up
    if images.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        explain(model, images, method=method)
    if images.is_cuda:
        torch.cuda.synchronize()
    return repeats * len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=None)
    args = parser.parse_args()
    print(f"| model | method | input | batch | device | images/s |\n|---|---|---|---|---|---|", flush=True)
    for name in MODELS:
        model, spec = build_model(name, 10, input_size=args.size)
        model.to(args.device).eval()
        images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(args.device)
        for method in args.methods or methods_for(spec.family):
            if method not in methods_for(spec.family):
                continue
            batch = images[:2] if method in SLOW and args.device == "cpu" else images
            ips = measure(model, batch, method, args.repeats)
            print(f"| {name} | {method} | {args.size} | {len(batch)} | {args.device} | {ips:.2f} |", flush=True)


if __name__ == "__main__":
    main()
