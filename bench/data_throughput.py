"""Images per second of the two data paths, memory and stream, on the CPU: fine-tuning and explanation (issue 18).

    PYTHONPATH=src .venv/bin/python bench/data_throughput.py [--images 1000] [--epochs 2] [--size 64]
        [--explain-images 16 160] [--rounds 2] [--num-workers 2] [--model timm:resnet18] [--batch-size 32]
        [--methods gradcam,saliency] [--source ../shared/data/cifar10] [--quick] [--markdown FILE]

Each round runs both paths, memory then stream (memory, stream, memory, stream, ...), so that a drift
of the machine's load hits both; the figures are the medians over the rounds.
- Fine-tuning: `xtl finetune --data-path P --num-workers W --device cpu` as a subprocess: `--model`
  from random weights at `--size` px, a seeded random split of `--images` CIFAR-10 training images
  (10 validation images, the explanation's test images), `--epochs` epochs, no evaluation. The rate is
  `--images` over the epoch's seconds as training logs them (history_epochs.csv, `seconds`: the
  epoch's batches and its 10 validation images), the last epoch's, so that first-call costs fall in
  the first; the command's wall time (start-up and the memory path's decode of the split included)
  is shown too.
- Explanation: `xtl explain RUN --methods M --images N --device cpu` on the run that path fine-tuned,
  for the two counts of `--explain-images`, each time on a fresh set of maps. `xtl explain` has no
  --data-path option: it reads the split through the data path recorded in the run's config.yaml
  (`run.data_path`), which is why each path explains its own run. The rate is the marginal one,
  (N_large - N_small) / (t_large - t_small), so that the fixed costs (imports, the model, the
  memory path's decode of the whole split, galleries) cancel; the per-round rates' median. One
  untimed `xtl explain` comes first (on round 1's first run), so that the first path measured does not
  pay alone for reading the explanation's code and libraries from disk into the page cache. Where the
  larger count did not take longer (a tiny --quick size under load) the rate is left blank.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import save
from data_memory import machine

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO / "../shared/data/cifar10"
VAL_IMAGES = 10  # fine-tuning validates every epoch; kept tiny so the epoch's seconds are its training


def xtl(args: list[str]) -> float:
    """Wall seconds of `python -m xtl ARGS` (this repo's src first on the path); its stderr if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "xtl", *args], capture_output=True, text=True, env=env, timeout=3600)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"xtl {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return seconds


def finetune(runs: Path, name: str, path: str, args) -> dict:
    wall = xtl(["finetune", "--model", args.model, "--random-init", "--input-size", str(args.size),
                "--source", str(Path(args.source).resolve()), "--split", "random", "--train-size", str(args.images),
                "--val-size", str(VAL_IMAGES), "--test-size", str(max(args.explain_images)), "--seed", "0",
                "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--patience", "0",
                "--data-path", path, "--num-workers", str(args.num_workers), "--device", "cpu",
                "--no-evaluate", "--no-progress", "--runs-dir", str(runs), "--name", name])
    run = runs / name
    with open(run / "history_epochs.csv") as f:
        epochs = list(csv.DictReader(f))
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    if derived["data_path"] != path:
        raise SystemExit(f"{run} took data path {derived['data_path']}, not {path}")
    return {"run": run, "wall": wall, "epoch_s": float(epochs[-1]["seconds"]), "precision": derived["precision"]}


def explain(run: Path, images: int, args) -> float:
    shutil.rmtree(run / "explanations", ignore_errors=True)
    return xtl(["explain", str(run), "--methods", args.methods, "--images", str(images), "--device", "cpu",
                "--no-progress"])


def median(values: list[float]) -> float:
    """The median of the measured values (NaN: no rate); NaN if there is none."""
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return ""
    return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def number(value: float, digits: int = 1) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs; the last one is timed (default 2)")
    parser.add_argument("--size", type=int, default=64, help="model input size in px (default 64)")
    parser.add_argument("--explain-images", type=int, nargs=2, default=[16, 160],
                        help="the two test-image counts of the marginal explanation rate (default 16 160)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of memory then stream (default 2)")
    parser.add_argument("--num-workers", type=int, default=2, help="stream: decode worker processes (default 2)")
    parser.add_argument("--model", default="timm:resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", default="gradcam,saliency")
    parser.add_argument("--paths", nargs="+", default=["memory", "stream"])
    parser.add_argument("--source", default=str(CIFAR))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 64 training images, 1 epoch, explanation of 4 and 12 images, 1 round")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs, args.explain_images, args.rounds = 64, 1, [4, 12], 1
    small, large = sorted(args.explain_images)

    import torch

    threads = torch.get_num_threads()
    results = {p: {"train": [], "wall": [], "explain": [], "small_s": [], "large_s": []} for p in args.paths}
    precision = ""
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="data_throughput_") as tmp:
        for r in range(args.rounds):
            for path in args.paths:
                run = finetune(Path(tmp), f"{path}{r}", path, args)
                precision = run["precision"]
                if r == 0 and path == args.paths[0]:
                    explain(run["run"], small, args)  # warm-up, untimed
                t_small, t_large = explain(run["run"], small, args), explain(run["run"], large, args)
                shutil.rmtree(run["run"])  # a ResNet-18 run with its checkpoint is ~130 MB
                out = results[path]
                out["train"].append(args.images / run["epoch_s"])
                out["wall"].append(run["wall"])
                out["small_s"].append(t_small)
                out["large_s"].append(t_large)
                out["explain"].append((large - small) / (t_large - t_small) if t_large > t_small else float("nan"))
                print(f"round {r + 1} {path}: fine-tuning {out['train'][-1]:.1f} images/s (epoch {run['epoch_s']:.1f} s, "
                      f"command {run['wall']:.1f} s); explanation {t_small:.1f} s for {small} images, {t_large:.1f} s "
                      f"for {large}: {out['explain'][-1]:.1f} images/s (marginal)", flush=True)
    load_after = os.getloadavg()
    minutes = (time.perf_counter() - started) / 60
    med = {p: {k: median(v) for k, v in out.items()} for p, out in results.items()}
    base = args.paths[0]
    lines = [
        f"{datetime.date.today().isoformat()}, {machine()}, torch {torch.__version__} with {threads} threads, "
        f"load average (1 min) {load_before[0]:.2f} before / {load_after[0]:.2f} after ({minutes:.1f} min); "
        f"{args.model} from random weights at {args.size} px, {precision}, batches of {args.batch_size}; "
        f"{args.num_workers} decode workers (stream); median of {args.rounds} round(s) of {', '.join(args.paths)}.",
        "",
        f"Fine-tuning, {args.images:,} CIFAR-10 training images, epoch {args.epochs} of {args.epochs} timed:",
        "",
        f"| data path | images/s (median) | rounds' images/s | x {base} | command wall s (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in args.paths:
        lines.append(f"| {p} | {med[p]['train']:.1f} | {spread(results[p]['train'])} | "
                     f"{med[p]['train'] / med[base]['train']:.2f} | {med[p]['wall']:.1f} |")
    lines += [
        "",
        f"Explanation, `xtl explain RUN --methods {args.methods}`, marginal rate between {small} and {large} test images:",
        "",
        f"| data path | wall, {small} images (s) | wall, {large} images (s) | images/s (marginal, median) | "
        f"rounds' images/s | x {base} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in args.paths:
        lines.append(f"| {p} | {med[p]['small_s']:.1f} | {med[p]['large_s']:.1f} | {number(med[p]['explain'])} | "
                     f"{spread(results[p]['explain'])} | {number(med[p]['explain'] / med[base]['explain'], 2)} |")
    save({}, None, "\n".join(lines), args.markdown)  # printed, and written to --markdown


if __name__ == "__main__":
    main()
