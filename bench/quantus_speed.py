"""xtl.analysis.metrics against Quantus 0.6.0: images per second for each metric on the same
inputs, maps and settings (the settings under which tests/test_quantus_agreement.py shows the
values equal), on the CPU.

    .venv/bin/python bench/quantus_speed.py [--images 16] [--rounds 3] [--json FILE] [--markdown FILE]

Model: timm ResNet-18, random init, 10 classes, 32 px; images: CIFAR-10 test images (4 classes);
maps: xtl's saliency. One warm-up round, then `--rounds` rounds in which every metric is timed for
xtl and for Quantus one after the other (interleaved, so a load change hits both); the table gives
each side's median. Robustness: 10 noise samples each (Quantus's default is 200 for both sides).
Pixel flipping: xtl 16 steps of 64 pixels; Quantus needs features_in_step=64 channel values (it
wants a divisor of H*W), i.e. 48 steps, every third of which is one of xtl's 16.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import REPO, header, markdown_table, median, save  # noqa: E402
from helpers import cifar_images  # noqa: E402
from xtl.analysis import metrics as M  # noqa: E402
from xtl.explain import explain  # noqa: E402
from xtl.models import build_model, preprocessing  # noqa: E402

N_SAMPLES = 10
STEPS = 16


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def cases(model, spec, images, targets, maps, masks):
    """name -> (xtl call, Quantus call); both compute the metric for every image."""
    import quantus

    x, y, a, s = _np(images), _np(targets), _np(maps[:, None]), _np(masks[:, None]).astype(np.float32)

    def fn(imgs, tgts):
        return explain(model, imgs, tgts, "saliency", spec=spec).maps

    def q_explain(model, inputs, targets, **kwargs):
        return _np(explain(model, torch.as_tensor(inputs), torch.as_tensor(targets).long(), "saliency", spec=spec).maps[:, None])

    def q(metric, **call):
        return lambda: metric(model=model, x_batch=x, y_batch=y, a_batch=a, s_batch=s, device="cpu", **call)

    n_h_w = maps.shape[1] * maps.shape[2]
    return {
        "pointing game": (lambda: M.pointing_game(maps, masks), q(quantus.PointingGame(disable_warnings=True))),
        "relevance mass accuracy": (lambda: M.relevance_mass_accuracy(maps, masks),
                                    q(quantus.RelevanceMassAccuracy(disable_warnings=True))),
        "relevance rank accuracy": (lambda: M.relevance_rank_accuracy(maps, masks),
                                    q(quantus.RelevanceRankAccuracy(disable_warnings=True))),
        "sparseness": (lambda: M.sparseness(maps), q(quantus.Sparseness(disable_warnings=True))),
        "effective complexity": (lambda: M.effective_complexity(maps), q(quantus.EffectiveComplexity(disable_warnings=True))),
        f"max-sensitivity ({N_SAMPLES} samples)": (
            lambda: M.max_sensitivity(fn, images, targets, n_samples=N_SAMPLES),
            q(quantus.MaxSensitivity(nr_samples=N_SAMPLES, disable_warnings=True), explain_func=q_explain)),
        f"local Lipschitz estimate ({N_SAMPLES} samples)": (
            lambda: M.local_lipschitz_estimate(fn, images, targets, n_samples=N_SAMPLES),
            q(quantus.LocalLipschitzEstimate(nr_samples=N_SAMPLES, disable_warnings=True), explain_func=q_explain)),
        f"model parameter randomisation ({len(M.randomisable_layers(model))} layers, cascading)": (
            lambda: M.randomisation_similarity(model, spec, images, targets, "saliency", seed=42),
            lambda: quantus.MPRT(seed=42, disable_warnings=True)(
                model=model, x_batch=x, y_batch=y, a_batch=None, device="cpu", explain_func=q_explain)),
        f"pixel flipping ({STEPS} steps)": (
            lambda: M.pixel_flipping(model, images, targets, maps, steps=STEPS),
            q(quantus.PixelFlipping(features_in_step=n_h_w // STEPS, disable_warnings=True))),
    }


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16, help="CIFAR-10 test images (a multiple of 4)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model, spec = build_model("timm:resnet18", 10, pretrained=False, input_size=32)
    model.eval()
    raw, _ = cifar_images(REPO / "../shared/data/cifar10", n_per_class=max(1, args.images // 4))
    images = preprocessing(model, spec)(raw)
    targets = model(images).argmax(dim=1).detach()
    maps = explain(model, images, targets, "saliency", spec=spec).maps
    masks = torch.zeros_like(maps, dtype=torch.bool)
    for i in range(len(masks)):
        top, left = 2 + (3 * i) % 16, 20 - (2 * i) % 16
        masks[i, top:top + 8 + i % 8, left:left + 10] = True

    table = cases(model, spec, images, targets, maps, masks)
    seconds = {name: ([], []) for name in table}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, (ours, theirs) in table.items():
            for side, run in ((0, ours), (1, theirs)):
                started = time.perf_counter()
                run()
                if round_:
                    seconds[name][side].append(time.perf_counter() - started)
        print(f"round {round_} done", file=sys.stderr, flush=True)

    n = len(images)
    rows = []
    for name, (ours, theirs) in seconds.items():
        xtl_rate, quantus_rate = n / median(ours), n / median(theirs)
        rows.append({"metric": name, "xtl images/s": _rate(xtl_rate), "Quantus images/s": _rate(quantus_rate),
                     "xtl / Quantus": f"{xtl_rate / quantus_rate:,.1f}x"})
    results = {**header("cpu"), "benchmark": "quantus_speed", "images": n, "rounds": args.rounds,
               "load_average": os.getloadavg(), "seconds": seconds}
    head = (f"xtl.analysis.metrics vs Quantus 0.6.0, {n} CIFAR-10 images, timm ResNet-18 (32 px), saliency maps, "
            f"{results['machine']}, {results['date']}, torch {results['torch']}, {results['threads']} threads, "
            f"median of {args.rounds} interleaved rounds; load average at the end "
            f"{', '.join(f'{v:.1f}' for v in results['load_average'])}\n\n")
    save(results, args.json, head + markdown_table(rows, list(rows[0])), args.markdown)


if __name__ == "__main__":
    main()
