"""Fine-tuning throughput (images/s, steady state): our training step against the bare ceiling and
the seed's pipeline, measured in one process run, rounds interleaved.

    .venv/bin/python bench/finetune_throughput.py [--device cuda] [--models vit_b16_in21k resnet34]
        [--sizes 224] [--batch 32] [--steps 10] [--rounds 3] [--compile] [--json FILE] [--markdown FILE]

Per model (random init, `n_classes` 10), each variant with its own copy of the model:
- `ours`: `xtl.train.loop.train_one_epoch` as `xtl finetune` runs it (Fabric, `default` preset:
  AdamW, cosine schedule, gradient clipping, label smoothing, uint8 32 px CIFAR-10 images
  resized, augmented and normalised on the device, bf16-mixed on a GPU, float32 on the CPU).
- `ceiling`: a minimal timm-style loop on the same model, precision and batch size, the input
  already preprocessed on the device: forward, cross-entropy, backward, AdamW step; no
  clipping, no schedule, no per-step read-back.
- `seed`: the paper notebook's pipeline: PIL `Resize(size)`, `ToTensor`, `Normalize(0.5, 0.5)` on
  CIFAR-10 JPEGs in a `DataLoader` (`--workers`), float32, batch 32, Adam, `loss.item()` per step.
- with `--compile`: `ours+compile` and `ceiling+compile`, `torch.compile` on the model.

A round times `--steps` steps of every variant (order rotated per round) after one warm-up call
of `--warmup` steps each; the table gives each variant's median over rounds and ratios of medians.
"""

from __future__ import annotations

import argparse
import gc
import os
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import header, jpeg_dataset, markdown_table, median, save, sync, timed, uint8_images
from xtl.config import preset
from xtl.data.splits import SplitPart
from xtl.models import build_model
from xtl.runs import model_preprocess
from xtl.train.loop import (
    ModelInputs, TrainState, make_fabric, make_optimizer, make_scheduler, set_bn_momentum, train_one_epoch,
)
from xtl.train.progress import TrainProgress

MODELS = ("vit_b16_in21k", "resnet34")
SEED_BATCH = 32


def our_step(name: str, size: int, batch: int, device: str, images: torch.Tensor, labels: torch.Tensor,
             compile: bool = False, precision: str = "auto"):
    """`steps -> None`: `steps` batches through our loop's own `train_one_epoch`."""
    config = preset("default", name, input_size=size, batch_size=batch, pretrained=False, accelerator=device,
                    precision=precision, compile=compile)
    fabric = make_fabric(config)
    fabric.launch()
    model, _ = build_model(name, 10, pretrained=False, input_size=size)
    if config.bn_momentum is not None:
        set_bn_momentum(model, config.bn_momentum)
    preprocess = model_preprocess(config)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=10_000)  # stays in warm-up: lr never 0
    if config.compile:  # as finetune() does with `compile: true`
        model = torch.compile(model)
    model, optimizer = fabric.setup(model, optimizer)
    state, bar, run = TrainState(), TrainProgress(enabled=False), types.SimpleNamespace(path="bench")
    calls = [0]

    def run_steps(steps: int) -> None:
        n = steps * batch
        idx = (torch.arange(n) + calls[0] * n) % len(images)  # fresh images each call
        part = SplitPart(ids=np.arange(n), labels=labels[idx], images=images[idx])
        train_one_epoch(fabric, model, optimizer, scheduler, ModelInputs(part, preprocess), config, calls[0],
                        state, bar, run)
        calls[0] += 1

    return run_steps


def ceiling_step(name: str, size: int, batch: int, device: str, images: torch.Tensor, labels: torch.Tensor,
                 compile: bool = False, precision: str = "auto"):
    """The bare loop: preprocessed input already on the device, nothing but the step itself."""
    model, _ = build_model(name, 10, pretrained=False, input_size=size)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    if compile:
        model = torch.compile(model)
    config = preset("default", name, input_size=size)
    x = model_preprocess(config)(images[:batch].to(device))
    y = labels[:batch].to(device)
    bf16 = bf16_mixed(device, precision)

    def run_steps(steps: int) -> None:
        for _ in range(steps):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run_steps


def bf16_mixed(device: str, precision: str) -> bool:
    """Our loop's rule (`make_fabric`): "auto" is bf16-mixed on a GPU, float32 on the CPU."""
    return precision == "bf16-mixed" or (precision == "auto" and device == "cuda")


def seed_step(name: str, size: int, device: str, workers: int):
    """The paper notebook: PIL transforms in a DataLoader, float32, batch 32, Adam, loss.item()."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize(size), transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    loader = torch.utils.data.DataLoader(
        jpeg_dataset(transform), batch_size=SEED_BATCH, shuffle=True, num_workers=workers,
        persistent_workers=workers > 0,
    )
    batches = iter(loader)
    model, _ = build_model(name, 10, pretrained=False, input_size=size)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-5, weight_decay=0.01)
    criterion = torch.nn.CrossEntropyLoss()
    running = [0.0]

    def run_steps(steps: int) -> None:
        nonlocal batches
        for _ in range(steps):
            try:
                inputs, targets = next(batches)
            except StopIteration:
                batches = iter(loader)
                inputs, targets = next(batches)
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
            running[0] += loss.item()

    return run_steps


def measure_model(name: str, size: int, args, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    p = args.precision
    variants = {
        "ours": (args.batch, lambda: our_step(name, size, args.batch, args.device, images, labels, precision=p)),
        "ceiling": (args.batch, lambda: ceiling_step(name, size, args.batch, args.device, images, labels,
                                                     precision=p)),
    }
    if not args.no_seed:
        variants["seed"] = (SEED_BATCH, lambda: seed_step(name, size, args.device, args.workers))
    if args.compile:
        variants["ours+compile"] = (args.batch, lambda: our_step(name, size, args.batch, args.device, images,
                                                                 labels, compile=True, precision=p))
    if args.compile_ceiling:
        variants["ceiling+compile"] = (args.batch, lambda: ceiling_step(name, size, args.batch, args.device,
                                                                        images, labels, compile=True, precision=p))
    runs = {}
    for variant, (batch, make) in variants.items():
        runs[variant] = (batch, make())
        runs[variant][1](args.warmup)  # warm-up: allocator, cuDNN/cuBLAS choices, compilation
        sync(args.device)
    speeds: dict[str, list[float]] = {v: [] for v in runs}
    order = list(runs)
    for r in range(args.rounds):
        for variant in order[r % len(order):] + order[: r % len(order)]:
            batch, run = runs[variant]
            seconds = timed(lambda: run(args.steps), args.device)
            speeds[variant].append(args.steps * batch / seconds)
        print(f"  {name} round {r + 1}: " + ", ".join(f"{v} {s[-1]:.2f}" for v, s in speeds.items()), flush=True)
    del runs
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    rows = []
    ours = median(speeds["ours"])
    for variant, values in speeds.items():
        row = {"model": name, "variant": variant, "input": size,
               "batch": SEED_BATCH if variant == "seed" else args.batch,
               "precision": "bf16-mixed" if variant != "seed" and bf16_mixed(args.device, p) else "fp32",
               "images_per_s": median(values), "rounds": [round(v, 3) for v in values]}
        if variant != "ours":
            row["ours_over_this"] = ours / median(values)
        rows.append(row)
    for row in rows:
        if row["variant"].endswith("+compile"):
            row["over_eager_ceiling"] = row["images_per_s"] / median(speeds["ceiling"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", "--sizes", dest="sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--batch", type=int, default=32, help="ours and the ceiling (the seed: always 32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="the seed's DataLoader")
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile on the model")
    parser.add_argument("--compile-ceiling", action="store_true", help="also time the ceiling with torch.compile")
    parser.add_argument("--no-seed", action="store_true")
    parser.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed"],
                        help="ours and the ceiling (auto: bf16-mixed on a GPU, float32 on the CPU, as xtl finetune)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    images, labels = uint8_images(max(args.batch * args.steps, 1024))
    rows = []
    for name, size in [(n, s) for n in args.models for s in args.sizes]:
        rows += measure_model(name, size, args, images, labels)
        # saved after every model, so that a time limit keeps what was measured
        results = {**header(args.device), "benchmark": "finetune_throughput", "steps": args.steps,
                   "precision": args.precision, "rounds": args.rounds, "workers": args.workers, "rows": rows}
        head = (f"Fine-tuning throughput, {results['machine']}, {results['date']}, torch {results['torch']}, "
                f"{args.steps} steps x {args.rounds} rounds (median)\n\n")
        columns = ["model", "variant", "input", "batch", "precision", "images_per_s", "ours_over_this",
                   "over_eager_ceiling"]
        save(results, args.json, head + markdown_table(rows, columns), args.markdown)


if __name__ == "__main__":
    main()
