"""The HTML report: one self-contained file (figures embedded) with the PNG figures beside it."""

from __future__ import annotations

import base64
import datetime
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import xtl
from xtl.errors import XtlError
from xtl.io import atomic_path, write_text
from xtl.report.findings import (
    ModelResult,
    artefact_sentences,
    confusion_sentences,
    faithfulness_findings,
    kind_sentences,
    labels,
    last_epoch_note,
    last_epoch_notes,
    paired_comparisons,
    paired_sentence,
    summary_sentence,
    top_confusions,
)
from xtl.runs import RunDir

__all__ = ["ModelResult", "build_report", "SECTIONS"]

# Section ids, in page order; a report of existing runs (`xtl compare`) has only some of them.
SECTIONS = ("summary", "data", "models", "comparison", "confusions", "galleries", "faithfulness", "analysis",
            "localisation", "reproducibility")
RUN_FIGURES = {
    "training_curves": "Training curves: loss and accuracy per batch, validation per epoch",
    "confusion_matrix": "Confusion matrix on the test split",
    "per_class_accuracy": "Per-class test accuracy",
    "gallery_correct": "Correctly classified test images, one per class",
    "gallery_misclassified": "Most confidently misclassified test images",
    "faithfulness_curves": "Faithfulness curves",
}
FOLDER_FIGURES = {
    "class_distribution": "Images per class in each part of the split",
    "compare_correct": "The same test images through every model and method: classified correctly by every model",
    "compare_misclassified": "The same test images through every model and method: misclassified by at least one model",
    "faithfulness_combined": "Faithfulness curves of every model and method",
}


@dataclass
class Figure:
    file: str  # beside the report, in figures/
    caption: str
    data_uri: str


def build_report(runs: list[RunDir], out: Path, folder: Path | None = None, config: dict[str, Any] | None = None,
                 title: str | None = None, sections: tuple[str, ...] = SECTIONS) -> Path:
    """Write `out/report.html` (and `out/figures/*.png`) from finished runs and, when given, the
    `xtl run` folder that holds them (data figure, side-by-side galleries, combined faithfulness)."""
    results = [ModelResult.read(run) for run in runs]
    figures_dir = out / "figures"
    figures = Figures(figures_dir)
    paired = paired_comparisons(results)
    artefacts = artefact_sentences(results)
    context = {
        "title": title or "Explainable transfer learning: " + " vs ".join(r.model for r in results),
        "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "sections": [s for s in sections if s in SECTIONS],
        "kind": kind_sentences(results, (config or {}).get("preset")),
        "summary": summary_sentence(results),
        "paired": [{"row": p.row(), "sentence": paired_sentence(p)} for p in paired],
        "paired_note": len(paired) > 1,
        "notes": last_epoch_notes(results) + artefacts,
        "artefacts": artefacts,
        "confusions": confusion_sentences(results),
        "comparison": [r.row() for r in results],
        "models": [_model_context(r, label, figures) for r, label in zip(results, labels(results))],
        "data": _data_context(folder, results, figures),
        "galleries": [figures.add(folder / "figures" / f"{name}.png", f"{name}.png", caption)
                      for name, caption in FOLDER_FIGURES.items() if name.startswith("compare") and folder],
        "faithfulness": _faithfulness_context(folder, results, figures),
        "analysis": _analysis_context(folder, figures),
        "localisation": _localisation_context(folder, figures),
        "reproducibility": _reproducibility_context(results, config),
    }
    context["galleries"] = [g for g in context["galleries"] if g]
    html = _template().render(**context)
    path = out / "report.html"
    write_text(path, html)
    return path


class Figures:
    """Copies figures beside the report and embeds them as data URIs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, source: Path, name: str, caption: str) -> Figure | None:
        if not source.is_file():
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.directory / name) as tmp:
            shutil.copyfile(source, tmp)
        data = base64.b64encode(source.read_bytes()).decode("ascii")
        return Figure(f"figures/{name}", caption, f"data:image/png;base64,{data}")


def _model_context(result: ModelResult, label: str, figures: Figures) -> dict[str, Any]:
    m = result.metrics
    low, high = m["accuracy_ci95"]
    return {
        "name": result.name,
        "model": result.model,
        "anchor": "model-" + result.name,
        "headline": f"{100 * m['accuracy']:.1f} % [{100 * low:.1f}, {100 * high:.1f}]",
        "auc": f"{m['roc_auc_macro_ovr']:.3f}",
        "n_images": m["n_images"],
        "epochs": result.epochs,
        "best_epoch": m.get("best_epoch"),
        "note": last_epoch_note(label, result.epochs, m.get("best_epoch")),
        "per_class": m["per_class_accuracy"],
        "confusions": top_confusions(m, limit=5),
        "figures": [f for f in (figures.add(source, f"{result.name}_{source.name}", caption)
                                for source, caption in _run_figures(result.run)) if f],
    }


def _run_figures(run: RunDir) -> list[tuple[Path, str]]:
    """A run's figures for its section: each of RUN_FIGURES but the faithfulness curves, every gallery
    that `xtl explain` drew (one per method list, newest first), its caption naming the methods."""
    from xtl.explain.gallery import gallery_files, gallery_methods

    found = []
    for key, caption in RUN_FIGURES.items():
        if key == "faithfulness_curves":
            continue
        if key.startswith("gallery_"):
            kind = key.removeprefix("gallery_")
            for path in gallery_files(run.figures, kind):
                methods = gallery_methods(path, kind)
                found.append((path, caption + (f" ({', '.join(methods)})" if methods else "")))
        else:
            found.append((run.figures / f"{key}.png", caption))
    return found


def _data_context(folder: Path | None, results: list[ModelResult], figures: Figures) -> dict[str, Any]:
    import json

    first = results[0]
    info = {}
    if folder is not None and (folder / "data.json").is_file():
        try:
            info = json.loads((folder / "data.json").read_bytes().decode())
        except ValueError:  # not JSON, or binary (UnicodeDecodeError)
            info = None
        if not isinstance(info, dict):
            raise XtlError(f"run folder file {folder / 'data.json'} is damaged (not a JSON mapping); delete it "
                           "and run the same `xtl run` again (its data step writes it anew)")
    figure = figures.add(folder / "figures" / "class_distribution.png", "class_distribution.png",
                         FOLDER_FIGURES["class_distribution"]) if folder else None
    if figure is None:
        figure = figures.add(first.run.figures / "class_distribution.png", "class_distribution.png",
                             FOLDER_FIGURES["class_distribution"])
    return {
        "source": info.get("source", first.config["source"]),
        "classes": first.derived["class_names"],
        "sizes": info.get("sizes", first.derived["split_sizes"]),
        "split": first.config["split"],
        "stratified": first.config["stratified"],
        "seed": first.config["seed"],
        "figure": figure,
    }


def _faithfulness_context(folder: Path | None, results: list[ModelResult], figures: Figures) -> dict[str, Any] | None:
    from xtl.faithfulness.results import read_rows, read_tests
    from xtl.faithfulness.settings import REFERENCES
    from xtl.faithfulness.tables import logit_share, table_columns

    combined = folder / "faithfulness_combined.csv" if folder else None
    unscored: list[str] = []
    if combined is not None and combined.is_file():
        rows = read_rows(combined)
        tests = read_tests(folder / "faithfulness_combined_tests.csv")
        figure = figures.add(folder / "figures" / "faithfulness_combined.png", "faithfulness_combined.png",
                             FOLDER_FIGURES["faithfulness_combined"])
    else:
        # the runs that were scored keep their scores; the others are named as not scored
        scored = [r for r in results if r.run.file("faithfulness.csv").is_file()]
        if not scored:
            return None
        unscored = [r.name for r in results if r not in scored]
        results = scored
        rows = [row for r in scored for row in read_rows(r.run.file("faithfulness.csv"))]
        tests = [t for r in scored for t in read_tests(r.run.file("faithfulness_tests.csv"))]
        figure = None
    main_grid = str(rows[0].get("grid", "pixel")) if rows else "pixel"
    main = [r for r in rows if str(r.get("grid", "pixel")) == main_grid]
    columns = table_columns()

    def cells(row: dict, chosen: list[tuple[str, str]]) -> list[str]:
        out = []
        for column, _ in chosen:
            if column not in row:
                out.append("-")
                continue
            half = 1.96 * row[f"{column}_std"] / max(row["n_images"], 1) ** 0.5
            out.append(f"{row[column]:.3f} ± {half:.3f}")
        return out

    table = [{"model": row["model"], "method": row.get("label") or row["method"], "baseline": row.get("baseline", ""),
              "reference": row["method"] in REFERENCES, "cells": cells(row, columns), "logit_share": logit_share(row)}
             for row in main]
    return {
        "headers": [header for _, header in columns],
        "findings": faithfulness_findings(main, tests),
        "rows": table,
        "n_images": sorted({int(r["n_images"]) for r in main}),
        "steps": int(main[0]["steps"]) if main else 0,
        "baseline": ", ".join(dict.fromkeys(str(r["baseline"]) for r in main)),
        "grids": _grids(main),
        "family": int(tests[0]["family"]) if tests else 0,
        "sensitivity": _sensitivity(rows),
        "figure": figure,
        "unscored": unscored,
        "per_run": [f for f in (figures.add(r.run.figures / "faithfulness_curves.png", f"{r.name}_faithfulness_curves.png",
                                            f"{r.model}: faithfulness curves") for r in results) if f] if figure is None else [],
    }


def _sensitivity(rows: list[dict]) -> dict[str, Any] | None:
    """The grid-sensitivity appendix: each map set's two gaps on every grid it was scored on (under the
    first baseline), and its rank among its model's map sets on each grid."""
    grids = list(dict.fromkeys(str(r.get("grid", "pixel")) for r in rows))
    if len(grids) < 2:
        return None
    baseline = str(rows[0].get("baseline", ""))
    chosen = [r for r in rows if str(r.get("baseline", "")) == baseline]
    by_set: dict[tuple, dict[str, dict]] = {}
    for r in chosen:
        by_set.setdefault((r["run"], r["model"], r.get("label") or r["method"]), {})[str(r.get("grid", "pixel"))] = r
    ranks: dict[tuple, int] = {}
    for grid in grids:
        for measure in ("srg", "srg_accuracy"):
            for run in {k[0] for k in by_set}:
                scored = [(k, v[grid][measure]) for k, v in by_set.items() if k[0] == run and grid in v
                          and measure in v[grid]]
                for rank, (k, _) in enumerate(sorted(scored, key=lambda kv: -kv[1]), start=1):
                    ranks[(k, grid, measure)] = rank
    table = []
    for key, per_grid in by_set.items():
        row_cells = []
        for grid in grids:
            for measure in ("srg", "srg_accuracy"):
                r = per_grid.get(grid)
                row_cells.append(f"{r[measure]:+.3f} (#{ranks[(key, grid, measure)]})" if r and measure in r else "-")
        table.append({"model": key[1], "method": key[2], "cells": row_cells})
    names = {"pixel": "pixels"}
    return {"baseline": baseline, "headers": [f"{names.get(g, g + ' x ' + g)}: {m}" for g in grids
                                              for m in ("SRG prob", "SRG acc")], "rows": table}


ANALYSIS_FIGURES = {
    "agreement": "Agreement of the maps on the same images: between models (same method) and between methods (same model)",
    "concentration": "Concentration (Gini index) of the maps of correctly classified and misclassified images",
}


def _analysis_context(folder: Path | None, figures: Figures) -> dict[str, Any] | None:
    """The "What the models look at, in numbers" section from `folder/analysis/analysis.json`
    (xtl.analysis)."""
    from xtl.analysis import read_analysis

    if folder is None:
        return None
    data = read_analysis(folder / "analysis")
    if data is None:
        return None
    interval = lambda r, key="": (f"{r[key + 'mean']:.3f} [{r[key + 'low']:.3f}, {r[key + 'high']:.3f}]"
                                  if r.get(key + "mean") is not None else "–")
    stats = data.get("statistics", [])
    names = list(data.get("statistics_described", {}))
    overall = []
    for s in data.get("sets", []):
        mine = {(r["group"], r["statistic"]): r for r in stats if r["model"] == s["model"] and r["method"] == s["method"]}
        overall.append({"model": s["model"], "method": s["method"], "grid": "x".join(map(str, s["grid"])), "n": s["n"],
                        "cells": [interval(mine[("all", k)]) if ("all", k) in mine else "–" for k in names],
                        "correct": interval(mine.get(("correct", "gini"), {})),
                        "misclassified": interval(mine.get(("misclassified", "gini"), {})),
                        "n_wrong": s["misclassified"]})
    rates = [{"model": r["model"], "method": r["method"], "grid": r["grid"], "flat": f"{r['flat']} of {r['n']}",
              "peaks": f"{r['single_token_peaks']} of {r['n']}", "sparseness": interval(r, "sparseness_"),
              "complexity": (f"{100 * r['effective_complexity_mean']:.0f} % [{100 * r['effective_complexity_low']:.0f}, "
                             f"{100 * r['effective_complexity_high']:.0f}]" if r.get("effective_complexity_mean") is not None else "–")}
             for r in data.get("rates", [])]
    number = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    claims = [{"key": c["key"], "statement": c["statement"], "verdict": c["verdict"], "sentence": c["sentence"],
               "tests": [{"method": r["method"], "role": r.get("role", "test"),
                          "difference": number(r.get("difference"), "+.3f"),
                          "interval": "–" if r.get("low") is None else f"[{r['low']:+.3f}, {r['high']:+.3f}]",
                          "p": number(r.get("p_value"), ".3g"), "p_holm": number(r.get("p_holm"), ".3g"),
                          "n": " vs ".join(map(str, r.get("n", []))), "sanity": r.get("sanity", ""),
                          "verdict": r.get("verdict", ""), "in_verdict": r.get("in_verdict", False),
                          "plain": ("–" if r.get("plain_difference") is None else
                                    f"{r['plain_difference']:+.3f} [{r['plain_low']:+.3f}, {r['plain_high']:+.3f}]")
                          if "plain_difference" in r else None}
                         for r in c.get("methods", [])],
               "seeds": [{"seed": r["seed"], "verdict": r["verdict"], "difference": number(r.get("difference"), "+.3f"),
                          "interval": "–" if r.get("low") is None else f"[{r['low']:+.3f}, {r['high']:+.3f}]",
                          "methods": ", ".join(r.get("methods", [])) or "none"}
                         for r in c.get("seeds", [])]}
              for c in data.get("claims", [])]
    seeds = data.get("seeds") or {}
    accuracy = [{"model": r["model"], "per_seed": ", ".join(f"{s}: {v:.3f}" for s, v in zip(r["seeds"], r["per_seed"])),
                 "mean": f"{r['mean']:.3f}", "range": f"{r['min']:.3f} to {r['max']:.3f}",
                 "sd": number(r.get("sd"), ".3f"),
                 "primary": f"{r['primary']:.3f} [{r['primary_low']:.3f}, {r['primary_high']:.3f}]"}
                for r in seeds.get("accuracy", [])]
    sensitivity = [{"model": r["model"], "method": r["method"], "n": r["n"], "spearman": interval(r),
                    "status": next((x["status"] for x in data.get("sanity", [])
                                    if x["model"] == r["model"] and x["method"] == r["method"]), "")}
                   for r in data.get("class_sensitivity", [])]
    shuffled_accuracy = {}
    for model, path in (data.get("data_randomisation_runs") or {}).items():
        try:
            shuffled_accuracy[model] = f"{RunDir(path).metrics()['accuracy']:.3f}"
        except (OSError, ValueError, KeyError, XtlError):
            shuffled_accuracy[model] = "–"
    data_randomisation = [{"model": r["model"], "method": r["method"], "n": r["n"], "spearman": interval(r),
                           "accuracy": shuffled_accuracy.get(r["model"], "–")}
                          for r in data.get("data_randomisation", [])]
    randomisation = []
    for model in dict.fromkeys(r["model"] for r in data.get("randomisation", [])):
        mine = [r for r in data["randomisation"] if r["model"] == model]
        layers = list(dict.fromkeys(r["layer"] for r in sorted(mine, key=lambda r: r["order"])))
        table = {}
        for r in mine:
            table.setdefault(r["method"], {})[r["layer"]] = (f"{r['spearman']:.2f}" if r["spearman"] is not None else
                                                             "no map" if r.get("undefined") == r["n"] else "–")
        randomisation.append({"model": model, "layers": layers, "n": max(r["n"] for r in mine),
                              "rows": [{"method": m, "cells": [cells.get(l, "–") for l in layers]} for m, cells in table.items()]})
    pairs = [{"a": p["a"], "b": p["b"], "kind": p["kind"], "n": p["n"], "spearman": interval(p, "spearman_"),
              "iou": interval(p, "iou_")} for p in data.get("agreement", {}).get("pairs", [])]
    shown = [f for f in (figures.add(folder / "analysis" / "figures" / f"{name}.png", f"analysis_{name}.png", caption)
                         for name, caption in ANALYSIS_FIGURES.items()) if f]
    return {
        "normalisation": data.get("normalisation", ""),
        "descriptions": [data["statistics_described"][k] for k in names],
        "overall": overall,
        "rates": rates,
        "complexity": data.get("complexity_sentences", []),
        "claims": claims,
        "seeds": {"seeds": seeds.get("seeds", []), "primary": data.get("seed"), "accuracy": accuracy,
                  "pairs": [p["sentence"] for p in seeds.get("pairs", [])]} if accuracy else None,
        "class_sensitivity": sensitivity,
        "data_randomisation": data_randomisation,
        "pairs": pairs,
        "figures": shown,
        "randomisation": randomisation,
        "randomisation_sentences": data.get("randomisation_sentences", []),
        "randomisation_note": data.get("randomisation_note"),
        "robustness": [{"model": r["model"], "method": r["method"], "n": r["n"], "samples": r["samples"],
                        "max_sensitivity": interval(r, "max_sensitivity_"), "local_lipschitz": interval(r, "local_lipschitz_")}
                       for r in data.get("robustness", [])],
        "robustness_sentences": data.get("robustness_sentences", []),
        "robustness_settings": data.get("robustness_settings", {}),
        "settings": data.get("settings", {}),
    }


def _localisation_context(folder: Path | None, figures: "Figures") -> dict[str, Any] | None:
    """The "Localisation" section: the grid pointing game of `folder/grid_pointing`
    (xtl.analysis.grid_pointing), where it was played."""
    from xtl.analysis.grid_pointing import EVEN_SHARE, grid_pointing_summary, interval

    if folder is None:
        return None
    place = folder / "grid_pointing"
    try:
        game = grid_pointing_summary(place)
    except (OSError, ValueError, XtlError):
        game = {}
    shortcut = _shortcut_context(folder / "shortcut", figures)
    if not game:
        return {"game": None, "shortcut": shortcut} if shortcut else None
    if "not_played" in game:
        return {"game": None, "not_played": game["not_played"], "shortcut": shortcut}
    rows = [{"run": r["run"], "method": r["method"], "reading": r["reading"], "share": interval(r, "share"),
             "pointing": interval(r, "pointing"), "flat": int(r["flat_maps"]), "maps": int(r["maps"]),
             "seconds": f"{float(r['seconds']):.1f}"} for r in game["rows"]]
    shown = [figures.add(place / "grid_pointing.png", "grid_pointing.png",
                         "Grid pointing game: share of each map's positive relevance in the explained class's quadrant")]
    for run in dict.fromkeys(r["run"] for r in game["rows"]):
        shown.append(figures.add(place / f"grid_pointing_gallery_{run}.png", f"grid_pointing_gallery_{run}.png",
                                 f"{run}: two mosaics, each class's map; white: its quadrant"))
    settings = game["settings"]
    family = int(game["tests"][0]["family"]) if game["tests"] else 0
    return {"game": {"rows": rows, "sentences": game["sentences"], "figures": [f for f in shown if f],
                     "mosaics": settings.get("mosaics"), "layout": settings.get("layout"),
                     "min_confidence": settings.get("min_confidence"), "candidates": game["candidates"],
                     "test_images": game["test_images"], "even": EVEN_SHARE, "family": family},
            "not_played": None, "shortcut": shortcut}


def _shortcut_context(place: Path, figures: "Figures") -> dict[str, Any] | None:
    """The planted shortcut of `place` (`xtl benchmark shortcut --out RUNFOLDER/shortcut`), where it ran."""
    import json

    from xtl.analysis.shortcut import REFERENCES, reality_summary, shortcut_sentences, shortcut_summary

    try:
        rows, reality_rows = shortcut_summary(place), reality_summary(place)
        info = json.loads((place / "shortcut.json").read_text())
    except (OSError, ValueError, XtlError):
        return None
    if not rows or not isinstance(info, dict):
        return None
    settings = info.get("settings", {})
    ci = lambda r, k: f"{float(r[k]):.3f} [{float(r[k + '_low']):.3f}, {float(r[k + '_high']):.3f}]"  # noqa: E731
    verdict = lambda r, k: "" if str(r.get(k, "")) in ("", "nan") else str(r[k])  # noqa: E731
    table = [{"model": r["model"], "method": r["method"], "data": r["data"], "reading": r["reading"],
              "share": ci(r, "marker_share"), "pointing": ci(r, "pointing"),
              "versus": [verdict(r, f"minus_{ref}_verdict") for ref in REFERENCES],
              "auc": ci(r, "auc") if r["method"] not in REFERENCES else "0.5 (one map for both)",
              "auc_verdict": verdict(r, "auc_verdict")} for r in rows]
    reality = [{"model": r["model"], "measure": r["measure"].replace("_", " "), "n": int(r["n_images"]),
                "shortcut": ci(r, "shortcut"), "clean": ci(r, "clean"), "difference": ci(r, "difference"),
                "verdict": verdict(r, "verdict")} for r in reality_rows]
    shown = [figures.add(path, path.name, f"{path.stem.replace('shortcut_gallery_', '')}: marked test images (marker outlined), each "
                         "method's map of the shortcut class for the shortcut and the clean model")
             for path in sorted(place.glob("shortcut_gallery_*.png"))]
    return {"rows": table, "reality": reality, "references": list(REFERENCES),
            "sentences": shortcut_sentences(rows, reality_rows, settings.get("shortcut_class", "")),
            "settings": settings, "epochs": info.get("epochs"), "family": int(rows[0].get("family", 0)),
            "figures": [f for f in shown if f]}


def _reproducibility_context(results: list[ModelResult], config: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "pipeline": yaml.safe_dump(config, sort_keys=False) if config else None,
        "runs": [{"name": r.name, "config": yaml.safe_dump(r.config, sort_keys=False),
                  "weights": r.config.get("weights") or r.derived.get("model", {}).get("weights", "?"),
                  "pretrained": r.config.get("pretrained"), "versions": r.versions} for r in results],
        "xtl": xtl.__version__,
        "machine": f"{platform.node()} ({platform.machine()}, Python {platform.python_version()})",
    }


def _template():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("xtl.report", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2")


def _grids(rows: list[dict]) -> str:
    """What was masked, per model: "pixels" or "G x G cells" (older tables: pixels)."""
    by_model = {}
    for row in rows:
        grid = str(row.get("grid") or "pixel")
        by_model[row["model"]] = "pixels" if grid in ("pixel", "none", "") else f"{grid} x {grid} cells"
    if len(set(by_model.values())) <= 1:
        return next(iter(by_model.values()), "pixels")
    return "; ".join(f"{what} for {model}" for model, what in by_model.items())
