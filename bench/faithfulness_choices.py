"""Which perturbation makes faithfulness measure the map rather than the damage? Scores the chosen
methods and the random and uniform references of `xtl run` models for every combination of grid
(pixels, the source's native resolution, the model's own feature grid) and baseline (zero, ROAD),
and says for each method and metric whether its 95 % interval clears both references'.

    .venv/bin/python bench/faithfulness_choices.py runs/quick/efficientnet_lite0 runs/quick/vit_s14_dinov2 \
        [--methods gradcam,saliency,transformer_attribution,attention_rollout] [--images 100] [--steps 10] \
        [--grids none,native,model] [--baselines zero,road] [--device cuda] [--no-cache]

Grids: `none` = every pixel of the model's input; `native` = the source images' own resolution (32
for CIFAR-10: one CIFAR pixel = one block of the upsampled input); `model` = the model's feature
grid (a ViT's patch grid, a CNN's target layer of Grad-CAM: 8 for DINOv2 at 112 px, 4 for
EfficientNet-Lite0 at 128 px); or a number. Grids that coincide for a model are scored once.

Per model and combination: `markdown_table` (mean AUC ± 95 % CI half-width over images, the
normal approximation) and a verdict table: "yes" where the method's interval lies entirely below
both references' intervals (deletion, positive: lower is better) or entirely above them
(insertion, negative). Every combination explains the images afresh (`score_model` explains and
scores batch by batch); with the cache (default) a killed benchmark resumes, as `xtl faithfulness`
does, from `<run>/faithfulness_cache/` (one key per grid and baseline). Nothing else is written
into the runs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from xtl.explain.runner import applicable_methods
from xtl.faithfulness.metrics import METRICS
from xtl.faithfulness.cache import CACHE
from xtl.faithfulness.results import ModelScores, grid_label
from xtl.faithfulness.runner import resolve_grid, score_model
from xtl.faithfulness.settings import REFERENCES, FaithfulnessSettings
from xtl.faithfulness.tables import markdown_table
from xtl.inference import LoadedRun
from xtl.runs import RunDir

METHODS = "gradcam,saliency,transformer_attribution,attention_rollout"
VERDICT_METRICS = ("deletion", "insertion", "positive", "negative")


def resolve(choice: str, explainer: LoadedRun, images: torch.Tensor) -> int | None:
    grid = None if choice == "none" else choice if choice in ("native", "model") else int(choice)
    return resolve_grid(grid, explainer.model, explainer.spec, explainer.part.images, images[:1],
                        f"run {explainer.run.path}")


def interval(row: dict, column: str) -> tuple[float, float]:
    half = 1.96 * row[f"{column}_std"] / math.sqrt(max(row["n_images"], 1))
    return row[column] - half, row[column] + half


def verdict_table(rows: list[dict]) -> str:
    """Per method and metric: does its 95 % interval clear both references' intervals?"""
    references = [r for r in rows if r["method"] in REFERENCES]
    lines = ["| method | " + " | ".join(f"{m} {METRICS[m].arrow}" for m in VERDICT_METRICS) + " |",
             "|---|" + "---|" * len(VERDICT_METRICS)]
    for row in rows:
        if row["method"] in REFERENCES:
            continue
        cells = []
        for metric in VERDICT_METRICS:
            low, high = interval(row, metric)
            bounds = [interval(ref, metric) for ref in references]
            better = (all(low > ref_high for _, ref_high in bounds) if METRICS[metric].higher_is_better
                      else all(high < ref_low for ref_low, _ in bounds))
            cells.append("yes" if better else "no")
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of `xtl run` models")
    parser.add_argument("--methods", default=METHODS, help="comma-separated; those that don't apply are skipped")
    parser.add_argument("--images", type=int, default=100, help="the first N test images")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--grids", default="none,native,model", help="none, native, model or numbers")
    parser.add_argument("--baselines", default="zero,road")
    parser.add_argument("--batch", type=int, default=64, help="perturbed images per forward pass")
    parser.add_argument("--explain-batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-cache", action="store_true", help="compute everything, keep nothing")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    grids = [g.strip() for g in args.grids.split(",") if g.strip()]
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]

    for path in args.runs:
        run = RunDir(path)
        run.read()
        explainer = LoadedRun(run, "test", args.device)
        chosen = applicable_methods(explainer.spec.family, methods)
        n = min(args.images, len(explainer.part))
        images = explainer.preprocess(explainer.part.images[:n].to(explainer.device))
        labels = explainer.part.labels[:n]
        resolved = {}
        for choice in grids:
            resolved.setdefault(resolve(choice, explainer, images), []).append(choice)
        for grid, names in resolved.items():
            for baseline in baselines:
                started = time.perf_counter()
                settings = FaithfulnessSettings(steps=args.steps, baseline=baseline, grid=grid,
                                                batch_size=args.batch, explain_batch_size=args.explain_batch)
                scores = score_model(explainer.model, explainer.spec, images, labels, chosen, settings,
                                     progress=not args.no_progress,
                                     title=f"{run.path.name} grid {grid_label(grid)} {baseline}",
                                     cache=None if args.no_cache else run.file(CACHE),
                                     pixel_std=explainer.preprocess.std)
                rows = ModelScores(run.path.name, explainer.spec.name, n, args.steps, baseline, scores, grid).rows()
                print(f"\n### {explainer.spec.name}: grid {grid_label(grid)} ({'/'.join(names)}), baseline {baseline}, "
                      f"{n} images, {args.steps} steps ({time.perf_counter() - started:.0f} s on {args.device})\n")
                print(markdown_table(rows))
                print("Interval clear of both references' (random, uniform):\n")
                print(verdict_table(rows), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
