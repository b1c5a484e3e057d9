"""Faithfulness of runs (or of a pretrained ImageNet classifier): explain the same images with every
method, score the maps with the random and uniform maps beside them, write the table and the curves.

    runs/<name>/faithfulness.csv            one row per method: each metric's mean AUC and std over images
    runs/<name>/faithfulness_curves.csv     the mean curve of every method and metric
    runs/<name>/figures/faithfulness_curves.png
    <first run or --out>/faithfulness_combined.csv, figures/faithfulness_combined.png   (several runs)
    runs/<name>/faithfulness_cache/<key>/<method>/batch_*.safetensors
                                            each finished batch's scores: a killed job resumes from them

Deletion and insertion score the maps of the predicted class; positive and negative perturbation
(Chefer et al.) are reported for the maps of the predicted and of the true class, the accuracy
always against the true label. The two sets of maps differ only on misclassified images, so only
those are explained and scored a second time.

`grid` perturbs cells of a G x G grid instead of pixels (`xtl.faithfulness.perturbation`); the
runs take `grid="native"`: the source images' own resolution (32 for CIFAR-10, whatever the
model's input size), which needs square source images. Progress: a bar on a terminal; elsewhere
(a log file) one plain line per batch of images and one per method at the end.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

from xtl.errors import XtlError, gpu_out_of_memory, sigterm_as_interrupt
from xtl.explain import METHODS, explain
from xtl.explain.base import upsample_and_normalise
from xtl.explain.runner import RunExplainer, applicable_methods, read_stored_maps
from xtl.faithfulness.figures import plot_curves
from xtl.faithfulness.metrics import METRICS, Curve
from xtl.faithfulness.perturbation import (
    check_grid_size,
    check_scoring_options,
    make_progress,
    predict_classes,
    random_maps,
    score_maps,
    uniform_maps,
)
from xtl.io import atomic_path, write_text
from xtl.models import ModelSpec
from xtl.runs import RunDir

DEFAULT_METHODS = {
    "cnn": ["gradcam", "gradcam++", "layercam", "saliency", "integrated_gradients", "lrp_epsilon"],
    "vit": ["transformer_attribution", "attention_rollout", "raw_attention", "gradcam", "saliency",
            "integrated_gradients"],
}
REFERENCES = ("random", "uniform")
CACHE = "faithfulness_cache"  # finished batches of a faithfulness job, so a killed one resumes
ACCURACY_METRICS = [m.name for m in METRICS.values() if m.quantity == "accuracy"]
console = Console(stderr=True)


@dataclass
class MethodScores:
    method: str
    curves: dict[str, Curve]  # metric name -> curves of the predicted class's maps; "<metric>_true" for the true class's
    explain_seconds: float
    score_seconds: float  # model time of the predicted class's maps, shared end points excluded


@dataclass
class ModelScores:
    name: str  # the run (or output) directory's name
    model: str
    n_images: int
    steps: int
    baseline: str
    methods: list[MethodScores]
    grid: int | None = None  # cells per side of the perturbed grid; None: pixels

    def rows(self) -> list[dict]:
        return [self._row(m) for m in self.methods]

    def _row(self, m: MethodScores) -> dict:
        row = {"run": self.name, "model": self.model, "method": m.method, "n_images": self.n_images,
               "steps": self.steps, "baseline": self.baseline, "grid": grid_label(self.grid)}
        for column, curve in m.curves.items():
            row[column] = float(curve.auc.mean())
            row[f"{column}_std"] = float(curve.auc.std()) if len(curve.auc) > 1 else 0.0
        row["explain_s"] = round(m.explain_seconds, 3)
        row["score_s"] = round(m.score_seconds, 3)
        row["score_images_per_s"] = round(self.n_images / m.score_seconds, 3) if m.score_seconds > 0 else float("nan")
        return row


# ----------------------------------------------------------------------------- one model, one batch of images


def score_model(model: nn.Module, spec: ModelSpec, images: torch.Tensor, labels: torch.Tensor, methods: list[str],
                steps: int = 10, baseline: str = "zero", batch_size: int = 64, explain_batch_size: int = 8,
                seed: int = 0, method_options: dict[str, dict] | None = None, progress: bool | Progress = False,
                title: str = "", cache: Path | None = None, grid: int | None = None,
                pixel_std: Sequence[float] | None = None,
                stored: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[MethodScores]:
    """Explain `images` with each method, score the maps and the random/uniform references.

    The images go through in batches of `explain_batch_size`. With `cache` (a folder), each
    batch's scores of each method are kept there as they finish, under a key of the model's
    weights, the images and every setting: a killed job run again computes only what is missing.
    `grid`: perturb a G x G grid of cells (None: pixels); the random reference is then random per
    cell. `seed`: of the random maps and of ROAD's noise (batch k's noise from seed + k).
    `pixel_std`: the std the images were normalised with (ROAD's noise; None: `spec.std`).
    `progress`: True = a bar on a terminal, plain lines on stderr otherwise; or a bar to add to.
    `stored`: method -> (raw maps, their target classes) of the first images, as `xtl explain` stored
    them: an image whose stored target is the class predicted here is scored on its stored map
    instead of being explained again (the same computation; its explain time counts as 0 here).
    """
    check_scoring_options(steps, batch_size, baseline, grid)
    check_grid_size(grid, tuple(images.shape[-2:]))
    pixel_std = tuple(spec.std if pixel_std is None else pixel_std)
    labels = labels.cpu().long()
    n = images.shape[0]
    names = list(methods) + list(REFERENCES)
    shape = (n, *images.shape[-2:])
    references = {"random": random_maps(shape, seed, images.device, grid), "uniform": uniform_maps(shape, images.device)}
    batches = [slice(s, min(s + explain_batch_size, n)) for s in range(0, n, explain_batch_size)]
    if cache is not None:
        settings = dict(steps=steps, baseline=baseline, batch_size=batch_size, explain_batch_size=explain_batch_size,
                        seed=seed, method_options=method_options or {})
        if grid is not None:  # only where not the default: the caches of per-pixel scoring stay valid
            settings["grid"] = grid
        if baseline == "road":
            settings["pixel_std"] = list(pixel_std)
        cache = Path(cache) / _fingerprint(model, images, labels, settings)
    done: dict[str, list[MethodScores]] = {name: [] for name in names}
    held = progress if isinstance(progress, Progress) else None
    lines = progress is True and not sys.stderr.isatty()
    on_interrupt = lambda: f"finished batches are kept in {cache}; the same command continues" if cache else None  # noqa: E731
    started = time.perf_counter()
    with make_progress() if progress is True and not lines else nullcontext(held) as bar, \
            sigterm_as_interrupt(on_interrupt), _out_of_memory_message(title, batch_size, explain_batch_size):
        task = bar.add_task(f"{title}: explain and score", total=len(batches)) if bar is not None else None
        for k, part in enumerate(batches):
            kept = {name: _read_batch(cache, name, k, part) for name in names} if cache is not None else {}
            todo = [name for name in names if kept.get(name) is None]
            if todo:
                computed = _score_batch(model, spec, images[part], labels[part], [m for m in methods if m in todo],
                                        {r: references[r][part] for r in REFERENCES if r in todo}, steps, baseline,
                                        batch_size, explain_batch_size, method_options or {}, grid=grid,
                                        seed=seed + k, pixel_std=pixel_std,
                                        stored={m: (raw[part], t[part]) for m, (raw, t) in (stored or {}).items()
                                                if len(t) >= part.stop})
                for name, scores in computed.items():
                    if cache is not None:
                        _write_batch(cache, name, k, part, scores)
                    kept[name] = scores
            for name in names:
                done[name].append(kept[name])
            if bar is not None:
                bar.advance(task)
            if lines:
                _print_line(f"faithfulness {title}: batch {k + 1}/{len(batches)} ({part.stop} of {n} images) " + (
                    "; ".join(f"{name} {kept[name].explain_seconds + kept[name].score_seconds:.1f} s" for name in todo)
                    + (f"; {len(names) - len(todo)} read from the cache" if len(todo) < len(names) else "")
                    if todo else "read from the cache") + f" ({time.perf_counter() - started:.1f} s elapsed)")
    results = [_concatenate(name, done[name]) for name in names]
    if lines:
        for result in results:
            _print_line(f"faithfulness {title}: {result.method} scored on {n} images "
                        f"({result.explain_seconds + result.score_seconds:.1f} s, "
                        f"{time.perf_counter() - started:.1f} s elapsed)")
    return results


def _print_line(text: str) -> None:
    """A progress line for a log: plain text, at once."""
    print(text, file=sys.stderr, flush=True)


def grid_label(grid: int | None) -> str:
    """How a grid is written in tables: "pixel" (None) or the cells per side."""
    return "pixel" if grid is None else str(grid)


def _score_batch(model, spec, images, labels, methods, references, steps, baseline, batch_size, explain_batch_size,
                 method_options, grid: int | None = None, seed: int = 0,
                 pixel_std: Sequence[float] | None = None, stored: dict | None = None) -> dict[str, MethodScores]:
    """One batch of images: the methods' maps (`stored` ones where they explain the predicted
    classes) and the given reference maps, scored."""
    predicted = predict_classes(model, images, batch_size)
    wrong = torch.nonzero(predicted.cpu() != labels).flatten()
    maps, seconds = {}, {}
    for method in methods:
        raw, targets = (stored or {}).get(method, (None, None))
        if raw is None or method_options.get(method):
            maps[method], seconds[method] = _explain_all(model, spec, images, predicted, method, explain_batch_size,
                                                         method_options.get(method, {}), None, "")
            continue
        # stored maps where they explain the class predicted here; the others (an image whose
        # prediction flips between float32 and bf16) are explained again
        maps[method], seconds[method] = upsample_and_normalise(raw.to(images.device), tuple(images.shape[-2:])), 0.0
        other = torch.nonzero(targets.cpu() != predicted.cpu()).flatten().to(images.device)
        if len(other):
            maps[method][other], seconds[method] = _explain_all(model, spec, images[other], predicted[other], method,
                                                                explain_batch_size, {}, None, "")
    maps.update(references)
    perturbation = dict(grid=grid, seed=seed, pixel_std=pixel_std)
    scores = score_maps(model, images, labels, maps, predicted.cpu(), steps, baseline, batch_size, **perturbation)
    true_scores = _true_class_scores(model, spec, images, labels, wrong, methods, steps, baseline, batch_size,
                                     explain_batch_size, method_options, None, "", seconds, perturbation)
    results = {}
    for name, s in scores.items():
        curves = dict(s.curves)
        for metric in ACCURACY_METRICS:
            curves[f"{metric}_true"] = _merge(s.curves[metric], true_scores.get(name, {}).get(metric), wrong)
        results[name] = MethodScores(name, curves, seconds.get(name, 0.0), s.seconds)
    return results


def _concatenate(name: str, parts: list[MethodScores]) -> MethodScores:
    """The batches' scores of one method as one set over all images."""
    if not parts:
        return MethodScores(name, {}, 0.0, 0.0)
    curves = {column: Curve(curve.x, torch.cat([p.curves[column].values for p in parts]),
                            torch.cat([p.curves[column].auc for p in parts]))
              for column, curve in parts[0].curves.items()}
    return MethodScores(name, curves, sum(p.explain_seconds for p in parts), sum(p.score_seconds for p in parts))


# ----------------------------------------------------------------------------- the cache of finished batches


def _fingerprint(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: dict) -> str:
    """A key of everything a batch's scores depend on: weights, images, labels, settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for tensor in (images, labels):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _batch_path(cache: Path, name: str, k: int, part: slice) -> Path:
    return cache / name / f"batch_{k:05d}_{part.start}-{part.stop - 1}.safetensors"


def _write_batch(cache: Path, name: str, k: int, part: slice, scores: MethodScores) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for column, curve in scores.curves.items():
        tensors.update({f"{column}.x": curve.x, f"{column}.values": curve.values, f"{column}.auc": curve.auc})
    metadata = {"explain_s": repr(scores.explain_seconds), "score_s": repr(scores.score_seconds)}
    with atomic_path(_batch_path(cache, name, k, part)) as tmp:
        save_file({key: t.detach().cpu().clone() for key, t in tensors.items()}, str(tmp), metadata=metadata)


def _read_batch(cache: Path, name: str, k: int, part: slice) -> MethodScores | None:
    """A finished batch's scores, or None (not there, or unreadable: then it is computed again)."""
    from safetensors import safe_open

    path = _batch_path(cache, name, k, part)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        columns = sorted({key.rsplit(".", 1)[0] for key in tensors})
        curves = {c: Curve(tensors[f"{c}.x"], tensors[f"{c}.values"], tensors[f"{c}.auc"]) for c in columns}
        return MethodScores(name, curves, float(metadata["explain_s"]), float(metadata["score_s"]))
    except Exception:
        return None


def _out_of_memory_message(title: str, batch_size: int, explain_batch_size: int):
    return gpu_out_of_memory(lambda: (
        f"out of GPU memory scoring {title or 'the model'} with --batch-size {batch_size} and --explain-batch-size "
        f"{explain_batch_size}; try smaller ones (finished batches are kept and reused by the next run "
        f"with the same settings)"
    ))


def _explain_all(model, spec, images, targets, method, batch_size, options, bar, title) -> tuple[torch.Tensor, float]:
    """Maps [B, H, W] of `method` for `targets`, `batch_size` images at a time."""
    task = bar.add_task(f"{title}: {method}", total=len(images)) if bar is not None else None
    started = time.perf_counter()
    chunks = []
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        batch = images[part].contiguous(memory_format=torch.channels_last)  # as in scoring: faster on the CPU
        chunks.append(explain(model, batch, targets[part].to(images.device), method, spec, **options).maps)
        if bar is not None:
            bar.advance(task, len(chunks[-1]))
    maps = torch.cat(chunks) if chunks else torch.empty(0, *images.shape[-2:], device=images.device)
    return maps, time.perf_counter() - started


def _true_class_scores(model, spec, images, labels, wrong, methods, steps, baseline, batch_size, explain_batch_size,
                       method_options, bar, title, seconds, perturbation: dict) -> dict[str, dict[str, Curve]]:
    """Accuracy curves of the true class's maps on the misclassified images (class-discriminative methods)."""
    chosen = [m for m in methods if METHODS[m].class_discriminative]
    if not len(wrong) or not chosen:
        return {}
    index = wrong.to(images.device)
    maps = {}
    for method in chosen:
        maps[method], extra = _explain_all(model, spec, images[index], labels[wrong].to(images.device), method,
                                           explain_batch_size, method_options.get(method, {}), bar, f"{title} (true class)")
        seconds[method] += extra
    scores = score_maps(model, images[index], labels[wrong], maps, labels[wrong], steps, baseline, batch_size,
                        ACCURACY_METRICS, bar if bar is not None else False, f"{title}: score (true class)",
                        **perturbation)
    return {name: s.curves for name, s in scores.items()}


def _merge(predicted: Curve, true_on_wrong: Curve | None, wrong: torch.Tensor) -> Curve:
    """The predicted class's curves with the misclassified images' rows from the true class's maps."""
    if true_on_wrong is None:
        return predicted
    values, auc = predicted.values.clone(), predicted.auc.clone()
    values[wrong], auc[wrong] = true_on_wrong.values, true_on_wrong.auc
    return Curve(predicted.x, values, auc)


# ----------------------------------------------------------------------------- runs


def faithfulness_run(run_dirs: list[RunDir], methods: list[str] | None = None, n_images: int = 100,
                     split: str = "test", steps: int = 10, baseline: str = "zero", batch_size: int = 64,
                     explain_batch_size: int = 8, seed: int = 0, device: str | None = None, progress: bool = True,
                     combined: Path | None = None, method_options: dict[str, dict] | None = None,
                     resume: bool = True, grid: int | str | None = None) -> list[ModelScores]:
    """Score each run's methods on the first `n_images` of its split; write each run's table and
    figure, and the combined table and figure (into `combined`, default the first run) when
    several runs are given. With `resume`, finished batches are kept in and read back from
    `<run>/faithfulness_cache/` (False: compute everything, keep nothing, e.g. to time it).
    `grid`: cells per side of the perturbed grid, "native" (the source images' own resolution,
    e.g. 32 for CIFAR-10) or None (pixels of the model's input)."""
    check_options(n_images, split, explain_batch_size)
    check_scoring_options(steps, batch_size, baseline, grid, native=True)
    _check_methods(methods)
    for run in run_dirs:
        run.read()
    results = []
    for run in run_dirs:
        explainer = RunExplainer(run, split, device)
        chosen = _chosen_methods(explainer.spec.family, methods, explainer.spec.name)
        n = min(n_images, len(explainer.part))
        images = explainer.preprocess(explainer.part.images[:n].to(explainer.device))
        cells = resolve_grid(grid, explainer.model, explainer.spec, explainer.part.images, images[:1], f"run {run.path}")
        scores = score_model(explainer.model, explainer.spec, images, explainer.part.labels[:n], chosen, steps, baseline,
                             batch_size, explain_batch_size, seed, method_options, progress, run.path.name,
                             cache=run.file(CACHE) if resume else None, grid=cells,
                             pixel_std=explainer.preprocess.std, stored=_stored_maps(run, split, chosen, explainer.part.ids[:n]))
        result = ModelScores(run.path.name, explainer.spec.name, n, steps, baseline, scores, cells)
        write_outputs(run.path, result)
        results.append(result)
    if len(results) > 1:
        write_combined(combined or run_dirs[0].path, results)
    return results


def _stored_maps(run: RunDir, split: str, methods: list[str], ids) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The maps `xtl explain` stored for these images in this order (its first images are the same
    ones), per method: (raw maps, targets); methods without such maps are left out."""
    found = {}
    ids = torch.as_tensor(ids)
    for method in methods:
        stored = read_stored_maps(run, method, split)
        if stored is None:
            continue
        raw, targets, stored_ids = stored
        k = min(len(stored_ids), len(ids))
        if k and torch.equal(stored_ids[:k].long(), ids[:k].long()):
            found[method] = (raw[:k], targets[:k])
    return found


def resolve_grid(grid: int | str | None, model: nn.Module, spec: ModelSpec, source_images: torch.Tensor,
                 one_input: torch.Tensor, what: str) -> int | None:
    """A grid choice as cells per side: "native" (the source images' side), "model" (`model_grid`), a
    number, or None (pixels)."""
    if grid == "native":
        return native_grid(source_images, what)
    if grid == "model":
        return model_grid(model, spec, one_input)
    return grid


def model_grid(model: nn.Module, spec: ModelSpec, one_input: torch.Tensor) -> int:
    """The model's own grid at this input size: a ViT's patches per side, or the side of the output of
    a CNN's CAM layer (`spec.target_layer`), where its maps are made. Measured on the `make run` models
    (BENCHMARKS.md), perturbing these cells separates the maps from the random and uniform references
    best: a masked cell is what the model's own maps can point at."""
    from xtl.explain.base import patch_grid
    from xtl.explain.cam import layer_outputs
    from xtl.models import submodule

    if spec.family == "vit":
        return int(patch_grid(spec, one_input)[0])
    with torch.inference_mode(), layer_outputs(submodule(model, spec.target_layer)) as outputs:
        model(one_input)
    return int(outputs[0].shape[-2])


def native_grid(source_images: torch.Tensor, what: str) -> int:
    """The grid of `grid="native"`: the side of the (uint8, unresized) source images."""
    height, width = source_images.shape[-2:]
    if height != width:
        raise XtlError(f"option --grid native needs square source images; {what} has {height}x{width}: give a number")
    return int(height)


def check_options(n_images: int, split: str, explain_batch_size: int = 8) -> None:
    if explain_batch_size < 1:
        raise XtlError(f"option --explain-batch-size must be at least 1, not {explain_batch_size}")
    if n_images < 1:
        raise XtlError(f"option --images must be at least 1, not {n_images}")
    if split not in ("train", "val", "test"):
        raise XtlError(f"option --split must be train, val or test, not '{split}'")


def _check_methods(methods: list[str] | None) -> None:
    unknown = [m for m in methods or [] if m not in METHODS and m not in REFERENCES]
    if unknown:
        raise XtlError(f"option --methods: unknown method(s) {', '.join(unknown)}; "
                       f"known: {', '.join(sorted(METHODS))} (random and uniform are always scored)")


def _chosen_methods(family: str, methods: list[str] | None, model: str) -> list[str]:
    """The requested explanation methods that apply to `family` (the references are added anyway)."""
    requested = [m for m in methods or [] if m not in REFERENCES]
    if methods and not requested:
        return []
    chosen = applicable_methods(family, requested or [m for m in DEFAULT_METHODS[family] if m in METHODS])
    if requested and not chosen:
        raise XtlError(f"option --methods: none of {', '.join(requested)} applies to {family.upper()} model {model}")
    return chosen


# ----------------------------------------------------------------------------- a pretrained ImageNet classifier


def load_imagenet_sample(folder: Path, n_images: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n_images` JPEGs in sorted order as uint8 [N, 3, size, size] and their ImageNet classes."""
    from xtl.data.sources import decode_image, images_to_uint8

    files = sorted(f for f in Path(folder).glob("*") if f.suffix.lower() in (".jpeg", ".jpg"))
    if not files:
        raise XtlError(f"option --imagenet-sample: no JPEG images in {folder}")
    files = files[:n_images]
    # the sample holds every fourth ImageNet class in wnid order, one image each: file k is class 4k
    labels = torch.arange(len(files)) * 4
    return images_to_uint8([decode_image(f) for f in files], store_size=size), labels


def faithfulness_imagenet(folder: Path, model: str = "efficientnet_lite0", methods: list[str] | None = None,
                          n_images: int = 200, out: Path = Path("runs/faithfulness-imagenet"), steps: int = 10,
                          baseline: str = "zero", batch_size: int = 64, explain_batch_size: int = 8, seed: int = 0,
                          device: str | None = None, progress: bool = True,
                          method_options: dict[str, dict] | None = None, resume: bool = True,
                          grid: int | str | None = None) -> ModelScores:
    """Score the methods on a pretrained ImageNet classifier (its own head) and the imagenet-sample images
    (`resume`: as in `faithfulness_run`, the cache in `<out>/faithfulness_cache/`; `grid`: as there,
    "native" being the model's input size, as the sample is decoded at it: per pixel)."""
    from xtl.data import Preprocess
    from xtl.models import build_model

    check_options(n_images, "test", explain_batch_size)
    check_scoring_options(steps, batch_size, baseline, grid, native=True)
    _check_methods(methods)
    if not Path(folder).is_dir():
        raise XtlError(f"option --imagenet-sample: {folder} is not a directory")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net, spec = build_model(model, n_classes=None)
    net = net.to(device).eval()
    chosen = _chosen_methods(spec.family, methods, spec.name)
    raw, labels = load_imagenet_sample(Path(folder), n_images, spec.input_size)
    images = Preprocess(spec.input_size, spec.mean, spec.std)(raw.to(device))
    cells = resolve_grid(grid, net, spec, raw, images[:1], str(folder))
    scores = score_model(net, spec, images, labels, chosen, steps, baseline, batch_size, explain_batch_size, seed,
                         method_options, progress, f"{spec.name} (ImageNet)",
                         cache=Path(out) / CACHE if resume else None, grid=cells, pixel_std=spec.std)
    result = ModelScores(Path(out).name, spec.name, len(labels), steps, baseline, scores, cells)
    write_outputs(Path(out), result)
    return result


# ----------------------------------------------------------------------------- files and tables


def write_outputs(directory: Path, result: ModelScores) -> None:
    write_csv(directory / "faithfulness.csv", result.rows())
    write_csv(directory / "faithfulness_curves.csv", curve_rows(result))
    plot_curves([result], directory / "figures" / "faithfulness_curves.png")


def write_combined(directory: Path, results: list[ModelScores]) -> None:
    write_csv(directory / "faithfulness_combined.csv", [row for r in results for row in r.rows()])
    plot_curves(results, directory / "figures" / "faithfulness_combined.png")


def curve_rows(result: ModelScores) -> list[dict]:
    return [{"method": m.method, "metric": metric, "x": round(float(x), 6), "mean": float(y)}
            for m in result.methods for metric, curve in m.curves.items()
            for x, y in zip(curve.x.tolist(), curve.values.mean(0).tolist())]


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def table_columns() -> list[tuple[str, str]]:
    """(CSV column, header) of the table: every metric of the predicted class, accuracy ones also of the true class."""
    columns = [(m.name, f"{m.name} {m.arrow}") for m in METRICS.values()]
    return columns + [(f"{name}_true", f"{name} (true) {METRICS[name].arrow}") for name in ACCURACY_METRICS]


def read_rows(path: Path) -> list[dict]:
    """Rows of a faithfulness CSV with numbers as numbers."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    text = {"run", "model", "method", "baseline", "grid"}
    return [{k: v if k in text else float(v) for k, v in row.items()} for row in rows]


def faithfulness_table(rows: list[dict]) -> Table:
    """Mean AUC ± 95 % CI half-width (normal approximation over images) per method; the best in bold."""
    columns = table_columns()
    table = Table("model", "method", *[header for _, header in columns], "explain s", "score img/s",
                  title=f"Faithfulness: AUC on {_images(rows)} images, {rows[0]['steps']:.0f} steps, "
                        f"baseline {rows[0]['baseline']}{_grid_words(rows)}")
    for group in _by_run(rows):
        for row, cells in _formatted(group, "[bold]{}[/bold]"):
            table.add_row(row["model"], row["method"], *cells, f"{row['explain_s']:.1f}", f"{row['score_images_per_s']:.1f}")
        table.add_section()
    return table


def markdown_table(rows: list[dict]) -> str:
    """The table as Markdown (for BENCHMARKS.md): mean AUC ± 95 % CI half-width, the best in bold."""
    columns = table_columns()
    lines = ["| model | images | method | " + " | ".join(h for _, h in columns) + " | explain s | score img/s |",
             "|---|---|---|" + "---|" * len(columns) + "---|---|"]
    for group in _by_run(rows):
        for row, cells in _formatted(group, "**{}**"):
            lines.append(f"| {row['model']} | {row['n_images']:.0f} | {row['method']} | " + " | ".join(cells)
                         + f" | {row['explain_s']:.1f} | {row['score_images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _by_run(rows: list[dict]) -> list[list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["run"], []).append(row)
    return list(groups.values())


def _grid_words(rows: list[dict]) -> str:
    grids = sorted({str(r.get("grid", "pixel")) for r in rows})
    return "" if grids == ["pixel"] else f", perturbed on a {'/'.join(grids)} grid"


def _images(rows: list[dict]) -> str:
    return "/".join(sorted({f"{r['n_images']:.0f}" for r in rows}))


def _formatted(rows: list[dict], emphasis: str) -> list[tuple[dict, list[str]]]:
    """Each row with its metric cells; the best explanation method of each column emphasised."""
    columns = [c for c, _ in table_columns()]
    best = {c: _best(rows, c) for c in columns}
    return [(row, [emphasis.format(_cell(row, c)) if best[c] == row["method"] else _cell(row, c) for c in columns])
            for row in rows]


def _best(rows: list[dict], column: str) -> str | None:
    metric = METRICS[column.removesuffix("_true")]
    candidates = [r for r in rows if r["method"] not in REFERENCES and column in r]
    if not candidates:
        return None
    pick = max if metric.higher_is_better else min
    return pick(candidates, key=lambda r: r[column])["method"]


def _cell(row: dict, column: str) -> str:
    if column not in row:
        return "-"
    half = 1.96 * row[f"{column}_std"] / math.sqrt(max(row["n_images"], 1))
    return f"{row[column]:.3f} ± {half:.3f}"
