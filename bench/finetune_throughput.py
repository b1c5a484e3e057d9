"""Fine-tuning throughput (images/s, forward + backward + AdamW step) per model and input size.

    .venv/bin/python bench/finetune_throughput.py [--device cuda] [--sizes 112 224] [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from xtl.models import build_model

MODELS = ("efficientnet_lite0", "vit_s14_dinov2")


def measure(name: str, size: int, batch: int, device: str, steps: int) -> float:
    model, _ = build_model(name, 10, pretrained=False, input_size=size)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    use_bf16 = device == "cuda"
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 128, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"| model | input | batch | device | train images/s |\n|---|---|---|---|---|")
    for name in MODELS:
        for size in args.sizes:
            ips = measure(name, size, args.batch, args.device, args.steps)
            print(f"| {name} | {size} | {args.batch} | {args.device} | {ips:.1f} |", flush=True)


if __name__ == "__main__":
    main()
