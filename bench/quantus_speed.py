"""xtl.analysis.metrics against Quantus 0.6.0: images per second for each metric on the same
inputs, maps and settings (the settings under which tests/test_quantus_agreement.py shows the
values equal), on the CPU.

    .venv/bin/python bench/quantus_speed.py [--images 16] [--rounds 3] [--map-copies 32] [--threads N] [--json FILE] [--markdown FILE]

Model: timm ResNet-18, random init, 10 classes, 32 px; images: CIFAR-10 test images (4 classes);
maps: xtl's saliency. One warm-up round, then `--rounds` rounds in which every metric is timed for
xtl and for Quantus one after the other (interleaved, so a load change hits both); the table gives
each side's median (a call under 0.2 s is repeated within its timing). The metrics that read
only maps and masks score the images' maps tiled `--map-copies` times (masks shifted per copy).
Robustness: 10 noise samples each (Quantus's default is 200 for both sides).
Pixel flipping: xtl 16 steps of 64 pixels; Quantus needs features_in_step=64 channel values (it
wants a divisor of H*W), i.e. 48 steps, every third of which is one of xtl's 16.
"""

from __future__ import annotations

import argparse
import math
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


def cases(model, spec, images, targets, maps, masks, map_copies: int):
    """name -> (images, xtl call, Quantus call); both compute the metric for every image.

    The metrics that read only maps and masks are timed on the maps tiled `map_copies` times
    (a batch of one call takes microseconds: the tiling measures the work, not the call)."""
    import quantus

    x, y, a, s = _np(images), _np(targets), _np(maps[:, None]), _np(masks[:, None]).astype(np.float32)
    many_maps = maps.repeat(map_copies, 1, 1)
    many_masks = torch.cat([masks.roll(k, dims=2) for k in range(map_copies)])  # each copy's boxes shifted
    xm, ym = x.repeat(map_copies, axis=0), y.repeat(map_copies)
    am, sm = _np(many_maps[:, None]), _np(many_masks[:, None]).astype(np.float32)

    def fn(imgs, tgts):
        return explain(model, imgs, tgts, "saliency", spec=spec).maps

    def q_explain(model, inputs, targets, **kwargs):
        return _np(explain(model, torch.as_tensor(inputs), torch.as_tensor(targets).long(), "saliency", spec=spec).maps[:, None])

    def q(metric, **call):
        return lambda: metric(model=model, x_batch=x, y_batch=y, a_batch=a, s_batch=s, device="cpu", **call)

    def q_maps(metric):
        return lambda: metric(model=model, x_batch=xm, y_batch=ym, a_batch=am, s_batch=sm, device="cpu",
                              batch_size=len(xm))

    n_h_w = maps.shape[1] * maps.shape[2]
    n_maps, n = len(many_maps), len(images)
    return {
        "pointing game": (n_maps, lambda: M.pointing_game(many_maps, many_masks),
                          q_maps(quantus.PointingGame(disable_warnings=True))),
        "relevance mass accuracy": (n_maps, lambda: M.relevance_mass_accuracy(many_maps, many_masks),
                                    q_maps(quantus.RelevanceMassAccuracy(disable_warnings=True))),
        "relevance rank accuracy": (n_maps, lambda: M.relevance_rank_accuracy(many_maps, many_masks),
                                    q_maps(quantus.RelevanceRankAccuracy(disable_warnings=True))),
        "sparseness": (n_maps, lambda: M.sparseness(many_maps), q_maps(quantus.Sparseness(disable_warnings=True))),
        "effective complexity": (n_maps, lambda: M.effective_complexity(many_maps),
                                 q_maps(quantus.EffectiveComplexity(disable_warnings=True))),
        f"max-sensitivity ({N_SAMPLES} samples)": (n,
            lambda: M.max_sensitivity(fn, images, targets, n_samples=N_SAMPLES),
            q(quantus.MaxSensitivity(nr_samples=N_SAMPLES, disable_warnings=True), explain_func=q_explain)),
        f"local Lipschitz estimate ({N_SAMPLES} samples)": (n,
            lambda: M.local_lipschitz_estimate(fn, images, targets, n_samples=N_SAMPLES),
            q(quantus.LocalLipschitzEstimate(nr_samples=N_SAMPLES, disable_warnings=True), explain_func=q_explain)),
        f"model parameter randomisation ({len(M.randomisable_layers(model))} layers, cascading)": (n,
            lambda: M.randomisation_similarity(model, spec, images, targets, "saliency", seed=42),
            lambda: quantus.MPRT(seed=42, disable_warnings=True)(
                model=model, x_batch=x, y_batch=y, a_batch=None, device="cpu", explain_func=q_explain)),
        f"pixel flipping ({STEPS} steps)": (n,
            lambda: M.pixel_flipping(model, images, targets, maps, steps=STEPS),
            q(quantus.PixelFlipping(features_in_step=n_h_w // STEPS, disable_warnings=True))),
    }


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16, help="CIFAR-10 test images (a multiple of 4)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--map-copies", type=int, default=32, help="the maps-only metrics score the maps tiled this often")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
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

    table = cases(model, spec, images, targets, maps, masks, args.map_copies)
    seconds = {name: ([], []) for name in table}
    repeats = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up and sets the repeats
        for name, (_, ours, theirs) in table.items():
            for side, run in ((0, ours), (1, theirs)):
                k = repeats.get((name, side), 1)
                started = time.perf_counter()
                for _ in range(k):
                    run()
                took = (time.perf_counter() - started) / k
                if round_:
                    seconds[name][side].append(took)
                else:  # calls under 0.2 s are repeated within one timing, so scheduling noise averages out
                    repeats[(name, side)] = max(1, math.ceil(0.2 / max(took, 1e-6)))
        print(f"round {round_} done", file=sys.stderr, flush=True)

    rows = []
    for name, (ours, theirs) in seconds.items():
        n = table[name][0]
        xtl_rate, quantus_rate = n / median(ours), n / median(theirs)
        rows.append({"metric": name, "images": n, "xtl images/s": _rate(xtl_rate), "Quantus images/s": _rate(quantus_rate),
                     "xtl / Quantus": f"{xtl_rate / quantus_rate:,.1f}x"})
    n = len(images)
    results = {**header("cpu"), "benchmark": "quantus_speed", "images": n, "rounds": args.rounds,
               "load_average": os.getloadavg(), "seconds": seconds}
    head = (f"xtl.analysis.metrics vs Quantus 0.6.0, {n} CIFAR-10 images, timm ResNet-18 (32 px), saliency maps, "
            f"{results['machine']}, {results['date']}, torch {results['torch']}, {results['threads']} threads, "
            f"median of {args.rounds} interleaved rounds; load average at the end "
            f"{', '.join(f'{v:.1f}' for v in results['load_average'])}\n\n")
    save(results, args.json, head + markdown_table(rows, list(rows[0])), args.markdown)


if __name__ == "__main__":
    main()
