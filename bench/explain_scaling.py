"""Scaling of `xtl explain RUN` (maps of a split) from 1 to 2 processes on the CPU (issue 18).

    PYTHONPATH=src .venv/bin/python bench/explain_scaling.py [--model timm:resnet18] [--size 96]
        [--images 64 320] [--methods gradcam,saliency] [--processes 1 2] [--repeats 2] [--markdown FILE]

A tiny real run is made first (random init, one epoch on 40 CIFAR-10 images, `--images`' largest
count of test images). Then `xtl explain RUN --devices P --device cpu` runs as a subprocess, each time
on a fresh set of maps (the explanations/ folder removed), for each process count and image count;
the wall time is the whole command's (start-up, Fabric's launch, maps, galleries). The rate is the
marginal one, (N_large - N_small) / (t_large - t_small): images per second once started, with the
fixed costs (imports, launch, galleries) cancelled. Median of `--repeats` runs each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO / "../shared/data/cifar10"


def tiny_run(folder: Path, model: str, size: int, n_test: int):
    from xtl.config import RunConfig
    from xtl.data import load_split
    from xtl.evaluate import evaluate
    from xtl.runs import RunDir, split_spec
    from xtl.train import finetune

    config = RunConfig(source=str(CIFAR.resolve()), model=model, pretrained=False, input_size=size, split="random",
                       train_size=40, val_size=10, test_size=n_test, stratified=True, batch_size=20, epochs=1,
                       patience=0, accelerator="cpu")
    run = RunDir(folder)
    data = load_split(config.source, split_spec(config))
    finetune(config, data, run, progress=False)
    evaluate(run, data, device="cpu")
    return run


def explain_seconds(run_path: Path, processes: int, images: int, methods: str, batch_size: int) -> float:
    shutil.rmtree(run_path / "explanations", ignore_errors=True)
    xtl = [sys.executable, "-m", "xtl"]
    cmd = [*xtl, "explain", str(run_path), "--methods", methods, "--images", str(images), "--batch-size",
           str(batch_size), "--device", "cpu", "--devices", str(processes), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:resnet18")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--images", type=int, nargs=2, default=[64, 320])
    parser.add_argument("--methods", default="gradcam,saliency")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    small, large = sorted(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        run = tiny_run(Path(tmp) / "run", args.model, args.size, large)
        load_before = os.getloadavg()
        rows = []
        for p in args.processes:
            times = {n: statistics.median(explain_seconds(run.path, p, n, args.methods, args.batch_size)
                                          for _ in range(args.repeats)) for n in (small, large)}
            rate = (large - small) / (times[large] - times[small])
            rows.append((p, times[small], times[large], rate))
            print(f"{p} process(es): {times[small]:.1f} s for {small} images, {times[large]:.1f} s for {large}: "
                  f"{rate:.1f} images/s", flush=True)
        load_after = os.getloadavg()
    base = rows[0][3]
    lines = [f"{args.model} at {args.size} px, methods {args.methods}, --batch-size {args.batch_size}; "
             f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; {os.cpu_count()} CPU(s)",
             "", f"| processes | wall, {small} images (s) | wall, {large} images (s) | images/s (marginal) | speed-up |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {p} | {a:.1f} | {b:.1f} | {r:.1f} | {r / base:.2f}x |" for p, a, b, r in rows]
    save({}, None, "\n".join(lines), args.markdown)  # printed, and written to --markdown


if __name__ == "__main__":
    main()
