"""Seconds the explorer (`xtl serve`) takes to answer one image: every served model's top-5 and
its heatmaps from the offered methods, as one upload asks. The issue-6 target: a few seconds at
most on the CPU with the `make run` models.

    .venv/bin/python bench/app_latency.py [RUN ...] [--images 10] [--json FILE] [--markdown FILE]

Default runs: those of `make run` (runs/quick/*/). Images: the runs' own test images, one call
each, after one warm-up call; the table gives the median and the slowest call, per model alone
and for the whole answer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import REPO, header, markdown_table, median, save
from xtl.app.explorer import Explorer
from xtl.runs import RunDir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    folders = args.runs or sorted(p.parent for p in (REPO / "runs" / "quick").glob("*/model.safetensors"))
    if not folders:
        raise SystemExit("no runs given and no runs/quick/*/model.safetensors: run `make run` first")
    explorer = Explorer([RunDir(p) for p in folders], device="cpu")
    methods = explorer.methods
    images = [explorer.runs[0].loaded.part.images[k] for k in range(args.images)]
    explorer.answer(images[0], methods)  # warm-up
    per_model = {run.name: [] for run in explorer.runs}
    whole = []
    for image in images:
        started = time.perf_counter()
        for run in explorer.runs:
            t0 = time.perf_counter()
            run.answer(image, methods, "predicted")
            per_model[run.name].append(time.perf_counter() - t0)
        whole.append(time.perf_counter() - started)
    rows = [{"answer": f"{run.name} ({', '.join(run.methods)})", "median_s": median(per_model[run.name]),
             "max_s": max(per_model[run.name])} for run in explorer.runs]
    rows.append({"answer": "one upload, every model", "median_s": median(whole), "max_s": max(whole)})
    results = {**header("cpu"), "benchmark": "app_latency", "runs": [str(p) for p in folders],
               "images": len(images), "rows": rows}
    head = f"Explorer latency per image, {results['machine']}, {results['date']}, torch {results['torch']}\n\n"
    save(results, args.json, head + markdown_table(rows, ["answer", "median_s", "max_s"]), args.markdown)


if __name__ == "__main__":
    main()
