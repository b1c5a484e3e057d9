"""`xtl analyse` and the pipeline's analysis step: the maps runs already store, measured.

    analyse_runs([RunDir("runs/quick/efficientnet_lite0"), RunDir("runs/quick/vit_s14_dinov2")],
                 Path("runs/quick/analysis"))

writes into the folder (each file atomically, analysis.json last, so its presence means a finished
analysis):

    statistics.csv      per model, method and group (all, correct, misclassified, class:<name>):
                        each statistic of `xtl.analysis.statistics` with its bootstrap 95 % interval
    rates.csv           per model and method: flat maps, single-token peaks, sparseness and effective
                        complexity (`xtl.analysis.metrics`) with intervals
    agreement.csv       per pair of (model, method): Spearman and top-10 % IoU on the shared images
    claims.csv          the paper's claims (`xtl.analysis.claims`) with verdicts
    claim_tests.csv     each claim's test per fine-tuning seed and method: difference, interval, p, Holm p,
                        sanity status (the primary seed's runs, then each replicate's)
    randomisation.csv   cascading model-parameter randomisation: mean Spearman per method and layer
    class_sensitivity.csv  Spearman of the predicted and the least likely class's maps per method
    data_randomisation.csv  Spearman of each model's maps and its shuffled-labels twin's (where one exists)
    robustness.csv      max-sensitivity and local Lipschitz estimate of the same methods on the same images
    figures/agreement.png, figures/concentration.png
    analysis.json       every number above, the sentences the report shows, the settings

Reads only stored maps and predictions.csv, except the sanity checks (`xtl.analysis.sanity`), which
load each model and explain `RANDOMISATION_IMAGES` images once per randomised layer group and twice
for class sensitivity, for each method whose tests can enter a verdict (`sanity_methods`).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xtl.analysis.agreement import agreement, common_grid, plot_agreement, shared
from xtl.analysis.claims import RESAMPLES as CLAIM_RESAMPLES
from xtl.analysis.claims import CONFIDENCE_BINS, MIN_GROUP, Claim, group_claim, over_seeds, paired_claim
from xtl.analysis.sanity import DEPENDS, MIN_IMAGES
from xtl.analysis.statistics import DESCRIPTIONS, STATISTICS, map_statistics, mean_interval, relevance_shares, summarise
from xtl.errors import XtlError
from xtl.evaluate.seeds import over_seeds as over_seeds_accuracy
from xtl.io import write_csv, write_json
from xtl.runs import RunDir, check_same_data

ANALYSIS_VERSION = 4  # part of the pipeline step's fingerprint: a change of what is computed redoes it
SEED = 0
RANDOMISATION_IMAGES = MIN_IMAGES  # the sanity checks' images: fewer cannot gate a claim (xtl.analysis.sanity)
ERROR_IMAGES = 1000  # maps an error claim needs (or every test image, where a run has fewer)
# the pipeline's setting: the gating checks in full (every layer group, 64 images), no robustness (32
# noise samples of every image cost 64 explanations an image, which a 2-core CPU's budget does not hold)
PIPELINE_RANDOMISATION = {"images": RANDOMISATION_IMAGES, "layers": None, "robustness": 0}
COMPLEXITY_EPS = 0.1  # effective complexity: cells above this fraction of the map's peak
ROBUSTNESS = {"radius": 0.2, "std": 0.1, "samples": 32}  # Quantus's noise defaults; 32 of its 200 samples
ROBUSTNESS_IMAGES = 8
PRIMARY = {"cnn": "gradcam", "vit": "transformer_attribution", "other": "saliency"}  # the paper's methods


@dataclass
class MapSet:
    """One run's stored maps of one method, with what the run's predictions say of each image."""

    model: str
    family: str
    method: str
    raw: torch.Tensor  # [N, h, w]
    targets: torch.Tensor  # [N]
    ids: torch.Tensor  # [N]
    labels: torch.Tensor  # [N] true class
    correct: torch.Tensor  # [N] bool
    run: RunDir | None = None
    confidence: torch.Tensor | None = None  # [N] the model's top-1 probability

    @property
    def label(self) -> str:
        return f"{self.model}: {self.method}"


def stored_methods(run: RunDir, split: str = "test") -> list[str]:
    folder = Path(run.path) / "explanations" / split
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def read_map_sets(run: RunDir, methods: list[str] | None = None) -> list[MapSet]:
    """The run's stored test maps per method (methods with none are left out), each image's true class
    and whether the run classified it correctly (from predictions.csv, matched by image id)."""
    from xtl.evaluate import read_predicted, read_predictions
    from xtl.explain.runner import read_stored_maps

    data = run.read()
    model = str(data["run"]["model"])
    family = str((data.get("derived", {}).get("model") or {}).get("family", "other"))
    if not run.file("predictions.csv").is_file():
        raise XtlError(f"run directory {run.path} has no predictions.csv; run `xtl evaluate {run.path}` first")
    ids, labels, predicted = read_predicted(run)
    _, _, probabilities = read_predictions(run)
    top = probabilities.max(1).values.double().tolist()
    truth = {int(i): (int(y), int(p) == int(y), c) for i, y, p, c in zip(ids, labels, predicted, top)}
    sets = []
    for method in methods or stored_methods(run):
        stored = read_stored_maps(run, method)
        if stored is None:
            continue
        raw, targets, map_ids = stored
        keep = torch.tensor([int(i) in truth for i in map_ids.tolist()], dtype=torch.bool)
        if not keep.any():
            continue
        raw, targets, map_ids = raw[keep], targets[keep], map_ids[keep]
        sets.append(MapSet(model, family, method, raw.double(), targets, map_ids,
                           torch.tensor([truth[int(i)][0] for i in map_ids.tolist()]),
                           torch.tensor([truth[int(i)][1] for i in map_ids.tolist()], dtype=torch.bool), run,
                           torch.tensor([truth[int(i)][2] for i in map_ids.tolist()], dtype=torch.float64)))
    return sets


# ------------------------------------------------------------------------------------ the parts


def statistics_rows(sets: list[MapSet], class_names: list[str]) -> tuple[list[dict], dict[str, dict]]:
    """Rows of statistics.csv and each set's per-map statistics (label -> name -> Tensor[N])."""
    rows, per_map = [], {}
    for s in sets:
        stats = map_statistics(s.raw)
        per_map[s.label] = stats
        groups = [("all", torch.ones(len(s.ids), dtype=torch.bool)), ("correct", s.correct), ("misclassified", ~s.correct)]
        groups += [(f"class:{name}", s.labels == k) for k, name in enumerate(class_names)]
        for group, mask in groups:
            for name, summary in summarise({k: stats[k][mask] for k in STATISTICS}, seed=SEED).items():
                rows.append({"model": s.model, "method": s.method, "group": group, "statistic": name, **summary})
    return rows, per_map


def rate_rows(sets: list[MapSet]) -> list[dict]:
    """Flat maps, single-token peaks and the complexity metrics per model and method."""
    from xtl.analysis.metrics import effective_complexity, sparseness
    from xtl.report.artefacts import single_token_peaks

    rows = []
    for s in sets:
        shares, flat = relevance_shares(s.raw)
        valid = ~torch.isnan(shares.flatten(1)[:, 0])
        peaks = single_token_peaks(s.raw.numpy())
        sparse = torch.full((len(s.ids),), float("nan"), dtype=torch.float64)
        complexity = sparse.clone()
        if valid.any():
            sparse[valid] = torch.as_tensor(sparseness(shares[valid])).double()
            complexity[valid] = torch.as_tensor(effective_complexity(shares[valid], COMPLEXITY_EPS)).double()
        h, w = s.raw.shape[-2:]
        rows.append({
            "model": s.model, "method": s.method, "grid": f"{h}x{w}", "n": len(s.ids),
            "flat": int(flat.sum()), "flat_rate": float(flat.double().mean()),
            "single_token_peaks": int(peaks.sum()), "peak_rate": float(peaks.mean()),
            **{f"sparseness_{k}": v for k, v in mean_interval(sparse, SEED).items() if k != "n"},
            **{f"effective_complexity_{k}": v for k, v in mean_interval(complexity / (h * w), SEED).items() if k != "n"},
        })
    return rows


def agreement_rows(sets: list[MapSet]) -> tuple[list[str], dict[str, torch.Tensor], list[dict]]:
    """Agreement of every pair of (model, method) on their shared images: the matrix labels, the
    Spearman and IoU matrices (means) and the rows of agreement.csv (upper triangle, with intervals)."""
    k = len(sets)
    labels = [s.label for s in sets]
    matrices = {"spearman": torch.full((k, k), float("nan"), dtype=torch.float64),
                "iou": torch.full((k, k), float("nan"), dtype=torch.float64)}
    rows = []
    for i in range(k):
        for j in range(i, k):
            a, b = sets[i], sets[j]
            pa, pb = shared(a.ids, b.ids)
            if not len(pa):
                continue
            if i == j:
                matrices["spearman"][i, i] = matrices["iou"][i, i] = 1.0
                continue
            found = agreement(a.raw[pa], b.raw[pb])
            kind = "same model" if a.model == b.model else "same method" if a.method == b.method else "other"
            row = {"a": a.label, "b": b.label, "kind": kind, "n": len(pa)}
            for name, values in found.items():
                summary = mean_interval(values, SEED)
                matrices[name][i, j] = matrices[name][j, i] = summary["mean"]
                row.update({f"{name}_{key}": v for key, v in summary.items() if key != "n"})
            rows.append(row)
    return labels, matrices, rows


@functools.lru_cache(maxsize=64)
def _test_facts(path: str) -> tuple[int, torch.Tensor]:
    """(test images, the first test image as uint8 [1, 3, h, w] at its stored size) of a run, from
    split.csv and one decoded file: without decoding the whole split."""
    import csv

    from xtl.data.sources import open_source
    from xtl.data.splits import decode_into_memory
    from xtl.runs import split_spec

    run = RunDir(path)
    with open(run.file("split.csv"), newline="") as f:
        test_ids = [int(row["id"]) for row in csv.DictReader(f) if row["split"] == "test"]
    config = run.config()
    partition = open_source(config.source).partition("test")
    first = decode_into_memory(partition, np.asarray(test_ids[:1]), split_spec(config).store_size, f"run {path}")
    return len(test_ids), first


def claim_grid(runs: list[RunDir]) -> int | None:
    """Cells a side of every claim's maps: the faithfulness protocol's common grid of these runs
    (`xtl.faithfulness.runner.common_grid`: CIFAR's 32 x 32, else 28 x 28), the same for every model."""
    from xtl.faithfulness.runner import COMMON_GRID, common_grid as protocol_grid

    grids = set()
    for run in runs:
        source = _test_facts(str(run.path))[1]
        grids.add(protocol_grid(source, run.preprocess()(source), f"run {run.path}"))
    return grids.pop() if len(grids) == 1 else COMMON_GRID


def claim_methods(sets: list[MapSet]) -> tuple[dict[str, MapSet], list[str]]:
    """The first ViT and the first CNN among the sets' models, and the methods stored for both."""
    first: dict[str, str] = {}
    for s in sets:
        if s.family in ("vit", "cnn"):
            first.setdefault(s.family, s.model)
    of = lambda family: {s.method: s for s in sets if s.model == first.get(family)}  # noqa: E731
    vit, cnn = of("vit"), of("cnn")
    return first, [m for m in vit if m in cnn]


def error_images(s: MapSet) -> int:
    """Maps an error claim needs: `ERROR_IMAGES`, or every test image of the run where it has fewer."""
    total = _test_facts(str(s.run.path))[0] if s.run is not None else len(s.ids)
    return min(ERROR_IMAGES, total)


def paper_claims(sets: list[MapSet], sanity: dict[tuple[str, str], str], grid: int | None) -> list[Claim]:
    """(a) ViT errors more concentrated, (b) CNN errors, each per method within confidence bins, and
    (c) ViT vs CNN, paired, per method stored for both models (module `xtl.analysis.claims`)."""
    from xtl.analysis.claims import combine, confidence_bins, stratified_difference, to_grid

    first, shared_methods = claim_methods(sets)
    gini = lambda raw: map_statistics(to_grid(raw, grid))["gini"]  # noqa: E731
    claims = []
    for family, key, who in (("vit", "vit_errors", "the ViT"), ("cnn", "cnn_errors", "the CNN")):
        mine = [s for s in sets if s.model == first.get(family)]
        if not mine:
            continue
        rows = []
        for s in mine:
            g, wrong = gini(s.raw), ~s.correct
            plain = group_claim(key, "", g[wrong], g[s.correct], seed=SEED)
            d, low, high, p, n, strata = stratified_difference(g, wrong, confidence_bins(s.confidence), seed=SEED,
                                                               resamples=CLAIM_RESAMPLES)
            need = error_images(s)
            state = sanity.get((s.model, s.method), "not checked")
            if len(s.ids) < need:
                state = f"too few images ({len(s.ids)} of {need})"
            rows.append({"method": s.method, "role": "test", "difference": d, "low": low, "high": high, "p_value": p,
                         "n": list(n), "strata": strata, "sanity": state, "enough": min(n) >= MIN_GROUP,
                         "plain_difference": plain.difference, "plain_low": plain.low, "plain_high": plain.high,
                         "plain_p_value": plain.p_value, "images": len(s.ids)})
        claims.append(combine(key, f"{who}'s maps ({first[family]}) are more concentrated on misclassified than on "
                              "correctly classified images of the same confidence", rows, grid,
                              f"misclassified minus correct within {CONFIDENCE_BINS} confidence bins"))
    if "vit" in first and "cnn" in first:
        of = lambda model, method: next(s for s in sets if s.model == model and s.method == method)  # noqa: E731
        rows = []
        pairs = [(m, m, "test") for m in shared_methods]
        own = (PRIMARY["vit"], PRIMARY["cnn"])
        if all(any(s.model == first[f] and s.method == m for s in sets) for f, m in zip(("vit", "cnn"), own)):
            pairs.append((*own, "secondary"))
        for vm, cm, role in pairs:
            vit, cnn = of(first["vit"], vm), of(first["cnn"], cm)
            pv, pc = shared(vit.ids, cnn.ids)
            test = paired_claim("vit_vs_cnn", "", gini(vit.raw[pv]), gini(cnn.raw[pc]), seed=SEED)
            states = [sanity.get((first["vit"], vm), "not checked"), sanity.get((first["cnn"], cm), "not checked")]
            bad = [f"{who}: {st}" for who, st in zip(("ViT", "CNN"), states) if st != "passes"]
            rows.append({"method": vm if vm == cm else f"{vm} (ViT) vs {cm} (CNN)", "role": role,
                         "difference": test.difference, "low": test.low, "high": test.high, "p_value": test.p_value,
                         "n": list(test.n), "enough": test.n[0] >= MIN_GROUP,
                         "sanity": "passes" if not bad else "; ".join(bad)})
        claims.append(combine("vit_vs_cnn", f"the ViT's maps ({first['vit']}) are more concentrated than the CNN's "
                              f"({first['cnn']}) on the same images, by the same method", rows, grid,
                              "paired ViT minus CNN"))
    return claims


def sanity_methods(sets: list[MapSet]) -> dict[str, list[str]]:
    """model -> the methods whose tests can enter a verdict, which the sanity checks must examine:
    those stored for both the ViT and the CNN, and those with enough maps for an error claim."""
    first, shared_methods = claim_methods(sets)
    out: dict[str, list[str]] = {}
    for s in sets:
        if s.model in first.values() and (s.method in shared_methods or len(s.ids) >= error_images(s)):
            out.setdefault(s.model, []).append(s.method)
    return out


def sanity_rows(runs: list[RunDir], sets: list[MapSet], n_images: int, device: str | None,
                max_layers: int | None = None, robustness_images: int = 0,
                shuffled: dict[str, RunDir] | None = None
                ) -> tuple[list[dict], list[dict], list[dict], list[dict], dict[tuple[str, str], str], str | None]:
    """The sanity checks (`xtl.analysis.sanity`) of the methods `sanity_methods` names, on the first
    `n_images` stored images of each: cascading model-parameter randomisation from the top block
    down (`layer_groups="blocks"`, all groups, or the top `max_layers`), rows (model, method, layer,
    order, spearman: mean over the images whose randomised map is not constant, n, undefined); class
    sensitivity, rows (model, method, n, mean, low, high, undefined); robustness (`robustness_row`) on
    the first `robustness_images` of them; data randomisation where `shuffled` has the model's
    shuffled-labels run (model -> RunDir), rows like class sensitivity's; and each method's status. A note instead where the randomisation check
    cannot run."""
    from xtl.analysis.sanity import class_sensitivity, data_randomisation, status

    try:
        from xtl.analysis.metrics import layer_groups_of, randomisation_similarity
    except ImportError:
        note = "the randomisation check (xtl.analysis.metrics.randomisation_similarity) is not available"
        return [], [], [], [], {}, note
    from xtl.inference import LoadedRun

    chosen = sanity_methods(sets)
    random_rows, class_rows, data_rows, robust_rows, states = [], [], [], [], {}
    for run in runs:
        mine = [s for s in sets if s.run is run and s.method in chosen.get(s.model, [])]
        if not mine or n_images <= 0:
            continue
        loaded = LoadedRun(run, device=device)
        other = (shuffled or {}).get(mine[0].model)
        untrained = LoadedRun(other, device=device) if other is not None else None
        position = {int(i): k for k, i in enumerate(loaded.part.ids.tolist())}
        for s in mine:
            ids = [int(i) for i in s.ids[:n_images].tolist() if int(i) in position]
            if not ids:
                continue
            images = loaded.inputs([position[i] for i in ids])
            targets = s.targets[:len(ids)].to(images.device)
            found = randomisation_similarity(loaded.model, loaded.spec, images, targets, s.method,
                                             layers="cascading", similarity="spearman", seed=SEED,
                                             layer_groups="blocks", max_layers=max_layers)
            if robustness_images > 0:
                robust_rows.append(robustness_row(loaded, s, images[:robustness_images], targets[:robustness_images]))
            last = None
            for order, (layer, values) in enumerate(found):
                values = torch.as_tensor(values).double().cpu()
                undefined = torch.isnan(values)  # a randomised model's constant map: no rank correlation
                kept = values[~undefined]
                last = {"model": s.model, "method": s.method, "layer": str(layer), "order": order,
                        "spearman": float(kept.mean()) if len(kept) else float("nan"), "n": len(values),
                        "undefined": int(undefined.sum())}
                random_rows.append(last)
            probabilities = loaded.probabilities[[position[i] for i in ids]]
            sensitivity = _correlation_row(s, class_sensitivity(loaded.model, loaded.spec, images, probabilities, s.method))
            class_rows.append(sensitivity)
            data = None
            if untrained is not None:
                data = _correlation_row(s, data_randomisation(loaded.model, untrained.model, loaded.spec, images,
                                                              targets, s.method))
                data_rows.append(data)
            complete = len(found) >= len(layer_groups_of(loaded.model, "blocks"))  # down to the input
            states[(s.model, s.method)] = status({**last, "complete": complete} if last else None, sensitivity,
                                                 data=data)
    return random_rows, class_rows, data_rows, robust_rows, states, None


def _correlation_row(s: MapSet, values: torch.Tensor) -> dict:
    """A sanity check's row: the per-image correlations' mean and bootstrap interval, and how many are NaN."""
    summary = mean_interval(values, SEED)
    return {"model": s.model, "method": s.method, "n": len(values), "mean": summary["mean"], "low": summary["low"],
            "high": summary["high"], "undefined": int(torch.isnan(values).sum())}


def robustness_row(loaded, s: MapSet, images: torch.Tensor, targets: torch.Tensor) -> dict:
    """Max-sensitivity (uniform noise of radius `ROBUSTNESS["radius"]`) and the local Lipschitz
    estimate (Gaussian noise of std `ROBUSTNESS["std"]`), in the model's normalised input space, of the
    method's [0, 1] maps at input size, `ROBUSTNESS["samples"]` noisy copies per image: Quantus's
    definitions (`xtl.analysis.metrics`), with fewer samples than its default 200. Lower is more robust."""
    from xtl.analysis.metrics import local_lipschitz_estimate, max_sensitivity
    from xtl.explain import explain

    def explain_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return explain(loaded.model, x, t, method=s.method, spec=loaded.spec).maps.to(x.dtype)

    n = ROBUSTNESS["samples"]
    found = {"max_sensitivity": max_sensitivity(explain_fn, images, targets, radius=ROBUSTNESS["radius"],
                                                n_samples=n, seed=SEED),
             "local_lipschitz": local_lipschitz_estimate(explain_fn, images, targets, std=ROBUSTNESS["std"],
                                                         n_samples=n, seed=SEED)}
    row = {"model": s.model, "method": s.method, "n": len(images), "samples": n}
    for name, values in found.items():
        values = torch.as_tensor(values).double().cpu()
        row[f"{name}_undefined"] = int(torch.isnan(values).sum())  # an all-zero map has no relative change
        summary = mean_interval(values, SEED)
        row.update({f"{name}_{key}": v for key, v in summary.items() if key != "n"})
    return row


def _undefined_note(row: dict) -> str:
    undefined = row.get("max_sensitivity_undefined", 0)
    return f" (without {undefined} of {row['n']} images whose map is all zeros)" if undefined else ""


def robustness_sentences(rows: list[dict]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model and r["max_sensitivity_mean"] == r["max_sensitivity_mean"]),
                      key=lambda r: r["max_sensitivity_mean"])
        if not mine:
            continue
        parts = [f"{r['method']} {r['max_sensitivity_mean']:.2f} [{r['max_sensitivity_low']:.2f}, "
                 f"{r['max_sensitivity_high']:.2f}]" + _undefined_note(r) for r in mine]
        text = (f"{model}: under input noise of {ROBUSTNESS['radius']} (normalised units) the maps change by "
                f"at most (max-sensitivity, relative to the map, lower is steadier): " + ", ".join(parts))
        if len(mine) > 1:
            clear = mine[0]["max_sensitivity_high"] < mine[1]["max_sensitivity_low"]
            text += (f"; {mine[0]['method']} is the most robust (its interval clear of the others')" if clear
                     else "; the intervals overlap, so these images do not rank the methods")
        out.append(text + ".")
    return out


# ------------------------------------------------------------------------------------ sentences


def complexity_sentences(rates: list[dict]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rates):
        mine = [r for r in rates if r["model"] == model and r["sparseness_mean"] == r["sparseness_mean"]]
        if not mine:
            continue
        by = sorted(mine, key=lambda r: r["sparseness_mean"])
        sparse, dense = by[-1], by[0]
        text = (f"{model}: the sparsest maps are {sparse['method']}'s (Gini {sparse['sparseness_mean']:.2f} "
                f"[{sparse['sparseness_low']:.2f}, {sparse['sparseness_high']:.2f}])")
        if dense is not sparse:
            text += (f", the least sparse {dense['method']}'s ({dense['sparseness_mean']:.2f} "
                     f"[{dense['sparseness_low']:.2f}, {dense['sparseness_high']:.2f}])")
            if sparse["grid"] != dense["grid"]:
                text += f" (on different grids, {sparse['grid']} and {dense['grid']}: a finer grid can be sparser)"
        text += "; " + ", ".join(f"{r['method']} lights up {100 * r['effective_complexity_mean']:.0f} % of its "
                                 f"{r['grid']} cells" for r in mine)
        text += f" (effective complexity: cells above {COMPLEXITY_EPS:.0%} of the map's peak)."
        flat = [r for r in mine if r["flat"]]
        peaks = [r for r in mine if r["peak_rate"] >= 0.1]
        if flat:
            text += " Flat maps: " + ", ".join(f"{r['method']} {r['flat']} of {r['n']}" for r in flat) + "."
        if peaks:
            text += " Single-token peaks: " + ", ".join(f"{r['method']} {100 * r['peak_rate']:.0f} %" for r in peaks) + "."
        out.append(text)
    return out


def randomisation_sentences(rows: list[dict]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        last = {}
        for r in rows:
            if r["model"] == model:
                last[r["method"]] = r  # the deepest randomisation: every listed layer randomised
        # every randomised map constant (e.g. Grad-CAM's ReLU leaving nothing): the map is gone, so it depends
        gone = lambda r: r["spearman"] != r["spearman"] and r["undefined"] == r["n"] > 0
        depend = [m for m, r in last.items() if r["spearman"] < DEPENDS or gone(r)]
        fail = [m for m, r in last.items() if r["spearman"] >= DEPENDS]
        parts = []
        if depend:
            parts.append(f"{', '.join(depend)} depend{'s' if len(depend) == 1 else ''} on the weights (Spearman with "
                         f"the trained model's maps below {DEPENDS}, or no map left, once the listed layers are randomised)")
        if fail:
            parts.append(f"{', '.join(fail)} barely change{'s' if len(fail) == 1 else ''} when the weights are "
                         f"randomised (Spearman {DEPENDS} or more): {'it fails' if len(fail) == 1 else 'they fail'} "
                         "the sanity check")
        if parts:
            out.append(f"{model}: " + "; ".join(parts) + ".")
    return out


# ------------------------------------------------------------------------------------ the whole


def plot_concentration(rows: list[dict], path: Path) -> None:
    """Gini of correct and misclassified images' maps per model and method, with 95 % intervals."""
    from xtl.io import pyplot, save_figure

    plt = pyplot()
    keys = list(dict.fromkeys((r["model"], r["method"]) for r in rows if r["statistic"] == "gini"))
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(keys) + 1.5))
    for offset, group, colour in ((-0.15, "correct", "tab:blue"), (0.15, "misclassified", "tab:red")):
        for y, key in enumerate(keys):
            found = [r for r in rows if (r["model"], r["method"]) == key and r["group"] == group and r["statistic"] == "gini"]
            if not found or found[0]["n"] == 0:
                continue
            r = found[0]
            ax.errorbar(r["mean"], y + offset, xerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]], fmt="o",
                        color=colour, capsize=3, label=group if y == 0 else None)
    ax.set_yticks(range(len(keys)), [f"{m}: {meth}" for m, meth in keys])
    ax.invert_yaxis()
    ax.set_xlabel("Gini index of the map (higher = more concentrated), mean and bootstrap 95 % interval")
    ax.legend(loc="best")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def analyse_runs(runs: list[RunDir], out: Path, methods: list[str] | None = None,
                 randomisation_images: int = RANDOMISATION_IMAGES, randomisation_layers: int | None = None,
                 device: str | None = None, robustness_images: int = ROBUSTNESS_IMAGES, seed: int = 0,
                 replicates: dict[int, list[RunDir]] | None = None,
                 shuffled: dict[str, RunDir] | None = None) -> dict[str, Any]:
    """Measure the runs' stored maps and write the analysis folder (see the module's docstring).
    `randomisation_images`: images of the sanity checks (randomisation and class sensitivity; 0 skips
    them, and then no method passes them: every verdict is "cannot decide"; fewer than
    `xtl.analysis.sanity.MIN_IMAGES` cannot gate either); `randomisation_layers`: randomise only the
    top that many layer groups (None: all, down to the input, as gating needs);
    `robustness_images`: the first that many of them also scored for robustness (0: not reported);
    `seed`: the fine-tuning seed of `runs`; `replicates`: further seeds' runs of the same models on the
    same split (seed -> runs): each claim is tested on each seed's maps as well, gated by the sanity
    checks of `runs`' methods, and stands only where every seed agrees (`xtl.analysis.claims.over_seeds`);
    accuracy over the seeds is in the result's `seeds` (`xtl.evaluate.seeds`); `shuffled`: model ->
    its run fine-tuned on shuffled labels, for the data-randomisation check (`xtl.analysis.sanity`)."""
    check_same_data(list(runs) + [r for seed_runs in (replicates or {}).values() for r in seed_runs]
                    + list((shuffled or {}).values()), "the analysis")
    start = time.perf_counter()
    sets = [s for run in runs for s in read_map_sets(run, methods)]
    if not sets:
        names = ", ".join(str(r.path) for r in runs)
        raise XtlError(f"no stored maps in {names}: run `xtl explain` on {'it' if len(runs) == 1 else 'them'} first")
    class_names = runs[0].class_names
    out = Path(out)
    stats_rows, per_map = statistics_rows(sets, class_names)
    rates = rate_rows(sets)
    labels, matrices, agree = agreement_rows(sets)
    timings = {"statistics": round(time.perf_counter() - start, 2)}
    started = time.perf_counter()
    random_rows, class_rows, data_rows, robust_rows, states, random_note = sanity_rows(
        runs, sets, randomisation_images, device, randomisation_layers, robustness_images, shuffled)
    timings["sanity"] = round(time.perf_counter() - started, 2)
    grid = claim_grid(runs)
    claims = paper_claims(sets, states, grid)
    replicates = replicates or {}
    seed_claims = {seed: {c.key: c for c in paper_claims([s for run in reps for s in read_map_sets(run, methods)],
                                                          states, grid)}
                   for seed, reps in replicates.items()}
    if replicates:
        claims = [over_seeds(c, {seed: c, **{k: found.get(c.key) for k, found in seed_claims.items()}}) for c in claims]
    accuracy = over_seeds_accuracy({seed: runs, **replicates}) if replicates else None

    figures = out / "figures"
    if len(sets) > 1:
        plot_agreement(labels, matrices, figures / "agreement.png",
                       "Agreement of the maps on the same images (mean over images)")
    plot_concentration(stats_rows, figures / "concentration.png")
    write_csv(out / "statistics.csv", stats_rows, ["model", "method", "group", "statistic", "mean", "low", "high", "n"])
    write_csv(out / "rates.csv", rates)
    write_csv(out / "agreement.csv", agree, ["a", "b", "kind", "n", "spearman_mean", "spearman_low", "spearman_high",
                                             "iou_mean", "iou_low", "iou_high"])
    write_csv(out / "claims.csv", [{k: v for k, v in c.to_dict().items() if k not in ("methods", "seeds")} for c in claims],
              ["key", "statement", "difference", "low", "high", "p_value", "n", "verdict", "grid", "sentence"])
    tests = [{"claim": c.key, "seed": seed, **r} for c in claims for r in c.methods]
    tests += [{"claim": c.key, "seed": k, **r} for k, found in seed_claims.items() for c in found.values() for r in c.methods]
    write_csv(out / "claim_tests.csv", tests,
              ["claim", "seed", "method", "role", "difference", "low", "high", "p_value", "p_holm", "n", "sanity",
               "in_verdict", "verdict", "enough", "strata", "images", "plain_difference", "plain_low", "plain_high",
               "plain_p_value"])
    write_csv(out / "class_sensitivity.csv", class_rows, ["model", "method", "n", "mean", "low", "high", "undefined"])
    write_csv(out / "data_randomisation.csv", data_rows, ["model", "method", "n", "mean", "low", "high", "undefined"])
    write_csv(out / "robustness.csv", robust_rows,
              ["model", "method", "n", "samples"] + [f"{m}_{k}" for m in ("max_sensitivity", "local_lipschitz")
                                                      for k in ("mean", "low", "high", "undefined")])
    write_csv(out / "randomisation.csv", random_rows, ["model", "method", "layer", "order", "spearman", "n", "undefined"])
    timings["total"] = round(time.perf_counter() - start, 2)
    result = {
        "version": ANALYSIS_VERSION,
        "runs": [str(r.path) for r in runs],
        "normalisation": "positive part of each raw map, normalised to sum 1 on the method's own grid; "
                         "maps with no positive mass are flat and left out",
        "settings": {"seed": SEED, "bootstrap_resamples": 2000, "claim_resamples": CLAIM_RESAMPLES, "level": 0.95,
                     "top_iou_share": 0.1, "complexity_eps": COMPLEXITY_EPS, "randomisation_images": randomisation_images,
                     "randomisation_layers": randomisation_layers, "robustness_images": robustness_images,
                     "depends_below": DEPENDS, "sanity_min_images": MIN_IMAGES, "claim_grid": grid,
                     "confidence_bins": CONFIDENCE_BINS, "error_images": ERROR_IMAGES, "min_group": MIN_GROUP},
        "statistics_described": DESCRIPTIONS,
        "sets": [{"model": s.model, "family": s.family, "method": s.method, "n": len(s.ids),
                  "grid": list(s.raw.shape[-2:]), "misclassified": int((~s.correct).sum())} for s in sets],
        "statistics": stats_rows,
        "rates": rates,
        "complexity_sentences": complexity_sentences(rates),
        "agreement": {"labels": labels, "spearman": _matrix(matrices["spearman"]), "iou": _matrix(matrices["iou"]),
                      "pairs": agree},
        "claims": [c.to_dict() for c in claims],
        "seed": seed,
        "seeds": accuracy,
        "seed_claims": {str(k): [c.to_dict() for c in found.values()] for k, found in seed_claims.items()},
        "randomisation": random_rows,
        "randomisation_sentences": randomisation_sentences(random_rows),
        "randomisation_note": random_note,
        "class_sensitivity": class_rows,
        "data_randomisation": data_rows,
        "data_randomisation_runs": {m: str(r.path) for m, r in (shuffled or {}).items()},
        "sanity": [{"model": m, "method": k, "status": v} for (m, k), v in states.items()],
        "robustness": robust_rows,
        "robustness_sentences": robustness_sentences(robust_rows),
        "robustness_settings": ROBUSTNESS,
        "figures": sorted(p.name for p in figures.glob("*.png")) if figures.is_dir() else [],
        "seconds": timings,
    }
    write_json(out / "analysis.json", _finite(result))
    return result


def _matrix(m: torch.Tensor) -> list[list[float | None]]:
    return [[None if v != v else round(float(v), 4) for v in row] for row in m.tolist()]


def _finite(value: Any) -> Any:
    """NaN and infinities as null: analysis.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_analysis(folder: Path) -> dict[str, Any] | None:
    """analysis.json of an analysis folder, or None when there is none (or it cannot be read)."""
    import json

    path = Path(folder) / "analysis.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
