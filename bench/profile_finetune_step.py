"""Where our training step spends what the bare ceiling does not: torch profiler over a few steps
of each, operator counts per step and the operators that only ours runs.

    .venv/bin/python bench/profile_finetune_step.py [--device cuda] [--model resnet34] [--size 224]
        [--batch 32] [--steps 5] [--trace DIR]

At a tiny input on the CPU (`--size 32 --batch 2`) compute is negligible and the figures show
the per-step overhead that, on a GPU, decides whether the step is launch-bound. `--trace` writes
Chrome traces (one per variant) for chrome://tracing or Perfetto.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from common import sync, uint8_images
from finetune_throughput import ceiling_step, our_step


def profiled(run, steps: int, device: str, trace: Path | None, name: str):
    run(2)  # warm-up
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run(steps)
        sync(device)
    if trace:
        trace.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace / f"{name}.json"))
    return prof


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--trace", type=Path, default=None)
    parser.add_argument("--first", default="ours", choices=["ours", "ceiling"], help="which is profiled first")
    args = parser.parse_args()
    images, labels = uint8_images(max(args.batch * (args.steps + 2) * 2, 64))
    counts, totals = {}, {}
    variants = [("ours", our_step), ("ceiling", ceiling_step)]
    for name, make in variants if args.first == "ours" else variants[::-1]:
        run = make(args.model, args.size, args.batch, args.device, images, labels)
        prof = profiled(run, args.steps, args.device, args.trace, name)
        events = prof.key_averages()
        counts[name] = Counter({e.key: e.count / args.steps for e in events if e.key.startswith("aten::")})
        cpu_total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
        dev_total = sum(getattr(e, "self_device_time_total", 0) for e in events) / args.steps / 1e3
        kernels = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
        totals[name] = (cpu_total, dev_total, kernels / args.steps)
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(f"\n=== {name}: {args.model} {args.size} px batch {args.batch} on {args.device}, per step: "
              f"{sum(counts[name].values()):.0f} aten calls, self CPU {cpu_total:.1f} ms, device {dev_total:.1f} ms, "
              f"{kernels / args.steps:.0f} device kernels")
        print(events.table(sort_by=sort, row_limit=args.top))
    extra = counts["ours"] - counts["ceiling"]
    print("\n=== aten calls per step that ours makes beyond the ceiling:")
    for key, n in extra.most_common(25):
        print(f"  {n:6.1f}  {key}")


if __name__ == "__main__":
    main()
