"""Faithfulness of runs (or of a pretrained ImageNet classifier): explain the same images with every
method, score the maps with the random and uniform maps beside them, write the table and the curves.

This module is the orchestration; beside it: `settings` (the one checked `FaithfulnessSettings`),
`results` (the scores, the CSVs and figures they are written to), `cache` (finished batches, so a
killed job resumes), `tables` (the terminal and Markdown tables).

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

import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from xtl.device import resolve_device
from xtl.distributed import SINGLE, Ranks
from xtl.errors import XtlError, gpu_out_of_memory, sigterm_as_interrupt
from xtl.explain import METHODS, explain
from xtl.explain.base import upsample_and_normalise
from xtl.explain.runner import applicable_methods, read_stored_maps
from xtl.explain.stored import images_digest
from xtl.faithfulness.cache import CACHE, batch_path, cache_folder, read_batch, write_batch
from xtl.faithfulness.metrics import Curve
from xtl.faithfulness.perturbation import (
    COMMON_GRID,
    NAMED_GRIDS,
    RandomMaps,
    check_grid_size,
    forward_logits,
    make_progress,
    predict_classes,
    score_maps,
    uniform_maps,
)
from xtl.faithfulness.readings import read_raw, readings_of, set_name, split_name
from xtl.faithfulness.results import (  # noqa: F401  (write_csv, read_rows, grid_label: re-exported)
    ACCURACY_METRICS,
    MethodScores,
    ModelScores,
    grid_label,
    read_rows,
    write_combined,
    write_csv,
    write_outputs,
)
from xtl.faithfulness.settings import DEFAULT_BASELINES, DEFAULT_METHODS, REFERENCES, FaithfulnessSettings
from xtl.faithfulness.tables import faithfulness_table, markdown_table, table_columns  # noqa: F401  (re-exported)
from xtl.inference import LoadedRun
from xtl.models import ModelSpec
from xtl.runs import RunDir

console = Console(stderr=True)


# ----------------------------------------------------------------------------- one model, one batch of images


def score_model(model: nn.Module, spec: ModelSpec | None, images: torch.Tensor, labels: torch.Tensor, methods: list[str],
                settings: FaithfulnessSettings | None = None, progress: bool | Progress = False, title: str = "",
                cache: Path | None = None, pixel_std: Sequence[float] | None = None,
                stored: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                ranks: Ranks = SINGLE) -> list[MethodScores]:
    """Explain `images` with each method, score the maps and the random/uniform references.

    `model`: any classifier (see `xtl.explain.explain`); `spec`: its description, or None.
    `images`: preprocessed [N, 3, H, W], or an `xtl.inference.SplitInputs` that makes them a batch at a
    time (so `xtl faithfulness` holds a batch, not the N images: the references too are made per batch).

    `settings`: how (default `FaithfulnessSettings()`). Its grid is cells per side, None (pixels),
    "common" (`COMMON_GRID` cells, or the input's pixels where it is smaller: without the source images
    there is no source resolution to use) or "model" (`model_grid`); "native" needs the source images,
    which only a run has (`faithfulness_run`). The images go through in batches of `settings.explain_batch_size`. With
    `cache` (a folder), each batch's scores of each method are kept there as they finish, under a
    key of the model's weights, the images and every setting: a killed job run again computes only
    what is missing. A grid perturbs G x G cells; the random reference is then random per cell.
    `settings.seed`: of the random maps and of ROAD's noise (batch k's noise from seed + k).
    `pixel_std`: the std the images were normalised with (ROAD's noise; None: `spec.std`).
    `progress`: True = a bar on a terminal, plain lines on stderr otherwise; or a bar to add to.
    `stored`: method -> (raw maps, their target classes) of the first images, as `xtl explain` stored
    them: an image whose stored target is the class predicted here is scored on its stored map
    instead of being explained again (the same computation; its explain time counts as 0 here).
    `ranks` (`xtl.distributed`): with several processes (which need `cache`), each computes its own
    batches into the cache and rank 0 then reads them all back: the scores of one process, returned
    on rank 0 ([] on the others).
    """
    from xtl.models import describe_model

    spec = describe_model(model, spec)  # None: the attached description, or what inspection tells
    settings = settings or FaithfulnessSettings()
    if settings.grid in NAMED_GRIDS:
        settings = settings.with_grid(_grid_of_inputs(settings.grid, model, spec, images))
    grid = settings.cells
    check_grid_size(grid, tuple(images.shape[-2:]))
    pixel_std = tuple(spec.std if pixel_std is None else pixel_std)
    labels = labels.cpu().long()
    n = images.shape[0]
    names = [set_name(m, r) for m in methods for r in readings_of(m)] + list(REFERENCES)
    references = _References((n, *images.shape[-2:]), settings.seed, images.device, grid)
    step = settings.explain_batch_size
    batches = [slice(s, min(s + step, n)) for s in range(0, n, step)]
    if cache is not None:
        cache = cache_folder(cache, model, images, labels, settings, pixel_std)

    def compute(k: int, part: slice, todo: list[str], decoded: _Ahead) -> dict[str, MethodScores]:
        """Batch k's scores of the names in `todo` (ROAD noise from seed + k), each put in the cache."""
        wanted = [m for m in methods if any(set_name(m, r) in todo for r in readings_of(m))]
        computed = _score_batch(model, spec, decoded.take(k), labels[part], wanted,
                                references(part, todo), settings, seed=settings.seed + k, pixel_std=pixel_std,
                                stored={m: (raw[part], t[part]) for m, (raw, t) in (stored or {}).items()
                                        if len(t) >= part.stop})
        computed = {name: scores for name, scores in computed.items() if name in todo}
        for name, scores in computed.items():
            if cache is not None:
                write_batch(cache, name, k, part, scores)
        return computed

    if ranks.world > 1:
        if cache is None:
            raise XtlError("faithfulness on several processes merges through the cache of finished batches; give a cache")
        _score_own_batches(compute, images, settings, cache, batches, names, ranks)
        if not ranks.is_zero:
            return []
        progress = False  # every batch is read back from the cache now
    done: dict[str, list[MethodScores]] = {name: [] for name in names}
    held = progress if isinstance(progress, Progress) else None
    lines = progress is True and not sys.stderr.isatty()
    on_interrupt = lambda: f"finished batches are kept in {cache}; the same command continues" if cache else None  # noqa: E731
    started = time.perf_counter()
    with make_progress() if progress is True and not lines else nullcontext(held) as bar, \
            sigterm_as_interrupt(on_interrupt), _out_of_memory_message(title, settings):
        task = bar.add_task(f"{title}: explain and score", total=len(batches)) if bar is not None else None
        decoded = _Ahead(images, batches, [k for k in range(len(batches)) if not _cached(cache, names, k, batches[k])])
        for k, part in enumerate(batches):
            kept = {name: read_batch(cache, name, k, part) for name in names} if cache is not None else {}
            todo = [name for name in names if kept.get(name) is None]
            if todo:
                kept.update(compute(k, part, todo, decoded))
            for name in names:
                done[name].append(kept[name])
            if bar is not None:
                bar.advance(task)
            if lines:
                _print_line(f"faithfulness {title}: batch {k + 1}/{len(batches)} ({part.stop} of {n} images) " + (
                    "; ".join(f"{name} {kept[name].explain_seconds + kept[name].score_seconds:.1f} s" for name in todo)
                    + (f"; {len(names) - len(todo)} read from the cache" if len(todo) < len(names) else "")
                    if todo else "read from the cache") + f" ({time.perf_counter() - started:.1f} s elapsed)")
    results = [MethodScores.concatenate(name, done[name]) for name in names]
    if lines:
        for result in results:
            _print_line(f"faithfulness {title}: {result.method} scored on {n} images "
                        f"({result.explain_seconds + result.score_seconds:.1f} s, "
                        f"{time.perf_counter() - started:.1f} s elapsed)")
    return results


def _score_own_batches(compute, images, settings, cache, batches, names, ranks: Ranks) -> None:
    """This process's batches (`ranks.mine`) scored into the cache, as one process scores them; then
    a barrier, so that every batch is in the cache when rank 0 reads them all."""
    with sigterm_as_interrupt(lambda: f"finished batches are kept in {cache}; the same command continues"), \
            _out_of_memory_message(f"rank {ranks.rank}", settings):
        decoded = _Ahead(images, batches, [k for k in range(len(batches))
                                           if ranks.mine(k) and not _cached(cache, names, k, batches[k])])
        for k, part in enumerate(batches):
            if not ranks.mine(k):
                continue
            todo = [name for name in names if read_batch(cache, name, k, part) is None]
            if todo:
                compute(k, part, todo, decoded)
    ranks.barrier()


class _References:
    """The random and uniform reference maps of a batch's rows: the rows of `random_maps(shape, ...)` and
    `uniform_maps(shape)` of all the images, made a batch at a time (`RandomMaps`)."""

    def __init__(self, shape: tuple[int, int, int], seed: int, device, grid: int | None) -> None:
        self.random, self.device = RandomMaps(shape, seed, device, grid), device

    def __call__(self, part: slice, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        maps = {}
        if "random" in wanted:
            maps["random"] = self.random.rows(part)
        if "uniform" in wanted:
            maps["uniform"] = uniform_maps((part.stop - part.start, *self.random.shape[1:]), self.device)
        return maps


class _Ahead:
    """The images of batches `wanted` (indices into `batches`), made in order ahead of use where
    `images` makes them a batch at a time (`xtl.inference.SplitInputs`: a streamed split decoded in
    worker processes); `take(k)` also serves a batch that was not foreseen (read directly)."""

    def __init__(self, images, batches: list[slice], wanted: list[int]) -> None:
        self.images, self.batches, self.wanted = images, batches, list(wanted)
        self.stream = images.batches([batches[k] for k in wanted]) if hasattr(images, "batches") and wanted else None

    def take(self, k: int) -> torch.Tensor:
        if self.stream is not None:
            while self.wanted and self.wanted[0] < k:  # foreseen, then found in the cache after all
                self.wanted.pop(0)
                next(self.stream)
            if self.wanted and self.wanted[0] == k:
                self.wanted.pop(0)
                return next(self.stream)
        return self.images[self.batches[k]]


def _cached(cache: Path | None, names: list[str], k: int, part: slice) -> bool:
    """Whether every name's scores of batch k are in the cache (its files exist)."""
    return cache is not None and all(batch_path(cache, name, k, part).is_file() for name in names)


def _print_line(text: str) -> None:
    """A progress line for a log: plain text, at once."""
    print(text, file=sys.stderr, flush=True)


def _score_batch(model, spec, images, labels, methods, references, settings: FaithfulnessSettings, seed: int = 0,
                 pixel_std: Sequence[float] | None = None, stored: dict | None = None) -> dict[str, MethodScores]:
    """One batch of images: the methods' maps (`stored` ones where they explain the predicted
    classes), each signed method's in its three readings, and the given reference maps, scored
    (`seed`: of this batch's ROAD noise). Keyed by map set name (`readings.set_name`)."""
    method_options, explain_batch_size = settings.method_options, settings.explain_batch_size
    predicted = predict_classes(model, images, settings.batch_size)
    wrong = torch.nonzero(predicted.cpu() != labels).flatten()
    size = tuple(images.shape[-2:])
    maps, seconds, extras = {}, {}, {}
    logits = None
    for method in methods:
        raw, targets = (stored or {}).get(method, (None, None))
        if raw is None or method_options.get(method):
            raw, seconds[method] = _explain_all(model, spec, images, predicted, method, explain_batch_size,
                                                method_options.get(method, {}), None, "")
        else:
            # stored maps where they explain the class predicted here; the others (an image whose
            # prediction flips between float32 and bf16) are explained again
            raw, seconds[method] = raw.to(images.device).float().clone(), 0.0
            other = torch.nonzero(targets.cpu() != predicted.cpu()).flatten().to(images.device)
            if len(other):
                raw[other], seconds[method] = _explain_all(model, spec, images[other], predicted[other], method,
                                                           explain_batch_size, {}, None, "")
        maps.update(_read_maps(method, raw, size))
        if METHODS[method].decomposes_logit:
            if logits is None:  # float32, as the maps are computed
                logits = torch.cat(forward_logits(model, len(images), lambda s: images[s], settings.batch_size, bf16=False))
            explained = logits.gather(1, predicted.cpu()[:, None])[:, 0].double()
            extras[method] = {"logit_share": raw.flatten(1).sum(1).double().cpu() / explained}
    maps.update(references)
    perturbation = dict(grid=settings.cells, seed=seed, pixel_std=pixel_std)
    scores = score_maps(model, images, labels, maps, predicted.cpu(), settings.steps, settings.baseline,
                        settings.batch_size, **perturbation)
    true_scores = _true_class_scores(model, spec, images, labels, wrong, methods, settings, seconds, perturbation)
    results = {}
    for name, s in scores.items():
        method, reading = split_name(name)
        curves = dict(s.curves)
        for metric in ACCURACY_METRICS:
            curves[f"{metric}_true"] = _merge(s.curves[metric], true_scores.get(name, {}).get(metric), wrong)
        results[name] = MethodScores(method, curves, seconds.get(method, 0.0), s.seconds, reading,
                                     extras.get(method, {}))
    return results


def _read_maps(method: str, raw: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Map set name -> maps at input size in [0, 1], one per reading of the method (`readings`)."""
    return {set_name(method, r): upsample_and_normalise(read_raw(raw, r), size) for r in readings_of(method)}


def _out_of_memory_message(title: str, settings: FaithfulnessSettings):
    return gpu_out_of_memory(lambda: (
        f"out of GPU memory scoring {title or 'the model'} with --batch-size {settings.batch_size} and "
        f"--explain-batch-size {settings.explain_batch_size}; try smaller ones (finished batches are kept and reused by the next run "
        f"with the same settings)"
    ))


def _explain_all(model, spec, images, targets, method, batch_size, options, bar, title) -> tuple[torch.Tensor, float]:
    """Raw maps [B, h, w] of `method` for `targets` (on its own grid, sign kept), `batch_size` images at a time."""
    task = bar.add_task(f"{title}: {method}", total=len(images)) if bar is not None else None
    started = time.perf_counter()
    chunks = []
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        batch = images[part].contiguous(memory_format=torch.channels_last)  # as in scoring: faster on the CPU
        chunks.append(explain(model, batch, targets[part].to(images.device), method, spec, **options).raw.float())
        if bar is not None:
            bar.advance(task, len(chunks[-1]))
    raw = torch.cat(chunks) if chunks else torch.empty(0, *images.shape[-2:], device=images.device)
    return raw.to(images.device), time.perf_counter() - started


def _true_class_scores(model, spec, images, labels, wrong, methods, settings: FaithfulnessSettings, seconds,
                       perturbation: dict) -> dict[str, dict[str, Curve]]:
    """Accuracy curves of the true class's maps on the misclassified images (class-discriminative methods);
    their explain time is added to `seconds`."""
    chosen = [m for m in methods if METHODS[m].class_discriminative]
    if not len(wrong) or not chosen:
        return {}
    index = wrong.to(images.device)
    maps = {}
    for method in chosen:
        raw, extra = _explain_all(model, spec, images[index], labels[wrong].to(images.device), method,
                                  settings.explain_batch_size, settings.method_options.get(method, {}), None,
                                  " (true class)")
        maps.update(_read_maps(method, raw, tuple(images.shape[-2:])))
        seconds[method] += extra
    scores = score_maps(model, images[index], labels[wrong], maps, labels[wrong], settings.steps, settings.baseline,
                        settings.batch_size, ACCURACY_METRICS, False, "score (true class)", **perturbation)
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
                     split: str = "test", steps: int = 10, baseline: str | Sequence[str] = DEFAULT_BASELINES,
                     batch_size: int = 64, explain_batch_size: int = 8, seed: int = 0, device: str | None = None,
                     progress: bool = True, combined: Path | None = None,
                     method_options: dict[str, dict] | None = None, resume: bool = True,
                     grid: int | str | None = "common", extra_grids: Sequence[int | str | None] = (),
                     ranks: Ranks = SINGLE) -> list[ModelScores]:
    """Score each run's methods on the first `n_images` of its split under each baseline; write each
    run's tables (`results.write_outputs`: means, per-image scores, paired tests) and figure, and the
    combined ones (into `combined`, default the first run) when several runs are given. With `resume`,
    finished batches are kept in and read back from `<run>/faithfulness_cache/` (False: compute
    everything, keep nothing, e.g. to time it).
    `ranks` (`xtl.distributed.launch`): the batches shared out among processes, which always go through
    the cache; rank 0 writes the tables and returns the scores, the others return [].
    `baseline`: one name or several (`DEFAULT_BASELINES`: zero and ROAD's imputation), each scored in full.
    `grid`: cells per side of the perturbed grid, "common" (the default: one grid for every run, fixed
    before any result, `common_grid`), "native" (the source images' own resolution), "model" (each
    model's own grid), a number, or None (pixels of the model's input). `extra_grids`: more grids scored
    under the first baseline only (the grid-sensitivity table). Returns one `ModelScores` per run,
    baseline and grid, the main grid's first."""
    baselines = baseline_list(baseline)
    grids = [grid] + [g for g in extra_grids if g != grid]
    checked = [FaithfulnessSettings(steps=steps, baseline=b, grid=g, batch_size=batch_size,
                                    explain_batch_size=explain_batch_size, seed=seed, n_images=n_images, split=split,
                                    methods=methods, method_options=method_options or {})
               for b in baselines for g in grids]
    settings = checked[0]
    for run in run_dirs:
        run.read()
    loaded_runs = []
    for run in run_dirs:
        loaded = LoadedRun(run, split, ranks.device or device)
        n = min(settings.n_images, len(loaded.part))
        loaded_runs.append((run, loaded, n, loaded.lazy_inputs(n)))  # made a batch at a time: memory does not grow with n
    commons = {common_grid(loaded.part.images, images[:1], f"run {run.path}") for run, loaded, _, images in loaded_runs}
    common = commons.pop() if len(commons) == 1 else COMMON_GRID  # the same for every model of the job
    results = []
    for run, loaded, n, images in loaded_runs:
        chosen = _chosen_methods(loaded.spec.family, settings.methods, loaded.spec.name)
        stored = _stored_maps(run, split, chosen, loaded.part.ids[:n], images_digest(loaded.part))
        mine = []
        for g in grids:
            cells = common if g == "common" else resolve_grid(g, loaded.model, loaded.spec, loaded.part.images,
                                                               images[:1], f"run {run.path}")
            for b in baselines if g == grid else baselines[:1]:
                scores = score_model(loaded.model, loaded.spec, images, loaded.part.labels[:n], chosen,
                                     replace(settings, baseline=b).with_grid(cells), progress,
                                     f"{run.path.name} ({b}, grid {grid_label(cells)})",
                                     cache=run.file(CACHE) if resume or ranks.world > 1 else None,
                                     pixel_std=loaded.preprocess.std, stored=stored, ranks=ranks)
                if ranks.is_zero:
                    mine.append(ModelScores(run.path.name, loaded.spec.name, n, steps, b, scores, cells,
                                            ids=[str(i) for i in loaded.part.ids[:n]]))
        if not ranks.is_zero:
            continue
        write_outputs(run.path, mine)
        results.extend(mine)
    if len(run_dirs) > 1 and results:
        write_combined(combined or run_dirs[0].path, results)
    ranks.barrier()  # the tables are written when every process returns
    return results


def baseline_list(baseline: str | Sequence[str]) -> list[str]:
    """One baseline or several (a list, or names separated by commas), each once, in order."""
    names = baseline.split(",") if isinstance(baseline, str) else list(baseline)
    names = list(dict.fromkeys(str(n).strip() for n in names if str(n).strip()))
    if not names:
        raise XtlError("option --baseline must name at least one baseline")
    return names


def _stored_maps(run: RunDir, split: str, methods: list[str], ids,
                 images: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The maps `xtl explain` stored for these images in this order (its first images are the same
    ones), per method: (raw maps, targets); one set of the run's current weights and of the split
    `images` (`xtl.explain.stored.images_digest`), of the predicted class where there is one
    (each map's class is checked against the prediction); methods without such maps are left out."""
    found = {}
    ids = torch.as_tensor(ids)
    for method in methods:
        stored = read_stored_maps(run, method, split, target="predicted", images=images)
        if stored is None:
            continue
        raw, targets, stored_ids = stored
        k = min(len(stored_ids), len(ids))
        if k and torch.equal(stored_ids[:k].long(), ids[:k].long()):
            found[method] = (raw[:k], targets[:k])
    return found


def resolve_grid(grid: int | str | None, model: nn.Module, spec: ModelSpec, source_images: torch.Tensor,
                 one_input: torch.Tensor, what: str) -> int | None:
    """A grid choice as cells per side: "common" (`common_grid`), "native" (the source images' side),
    "model" (`model_grid`), a number, or None (pixels)."""
    if grid == "common":
        return common_grid(source_images, one_input, what)
    if grid == "native":
        return native_grid(source_images, what)
    if grid == "model":
        return model_grid(model, spec, one_input)
    return grid


def _grid_of_inputs(grid: str, model: nn.Module, spec: ModelSpec, images) -> int | None:
    """A named grid resolved from preprocessed inputs alone (`score_model`, no source images)."""
    side = min(images.shape[-2:])
    if grid == "common":
        return None if side <= COMMON_GRID else COMMON_GRID
    if grid == "model":
        return model_grid(model, spec, images[:1])
    raise XtlError("option --grid native needs the source images, which score_model does not see: "
                   "give the cells per side, or score a run (faithfulness_run)")


def common_grid(source_images: torch.Tensor, one_input: torch.Tensor, what: str) -> int | None:
    """The grid of `grid="common"`, fixed before any result and the same for every model of a job: the
    source images' own side where they are square and no finer than the input (CIFAR-10's 32 x 32 at
    any input size of 32 px or more: one cell per CIFAR pixel, as much detail as the data has),
    otherwise `COMMON_GRID` (28) cells per side, or the input's pixels where it is smaller than that.
    It does not depend on the model: unlike "model" (a 4 x 4 CAM grid for one model, 8 x 8 patches for
    another), it scores a pixel-precise map and a coarse map on one scale, and lets a fine map show
    what it knows."""
    height, width = source_images.shape[-2:]
    side = min(one_input.shape[-2:])
    if height == width and height <= side:
        return int(height)
    return None if side <= COMMON_GRID else COMMON_GRID


def model_grid(model: nn.Module, spec: ModelSpec, one_input: torch.Tensor) -> int:
    """The model's own grid at this input size: a ViT's patches per side, or the side of the output of
    a CNN's CAM layer (`spec.target_layer`), where its maps are made. Not the default: it differs
    between models (the two make-run models are scored on 4 x 4 and 8 x 8 cells), so it cannot put
    two models on one scale, and a pixel-precise map averaged over such cells is scored as a CAM
    would be (`common_grid` is the default; BENCHMARKS.md has the grid-sensitivity table)"""
    from xtl.explain.base import patch_grid
    from xtl.explain.cam import layer_outputs
    from xtl.models import submodule

    if spec.family == "vit":
        return int(patch_grid(spec, one_input)[0])
    if not spec.target_layer:
        raise XtlError(f"option grid: 'model' is the model's patch grid or CAM layer, and {spec.name} has neither "
                       "described; give a number of cells per side, native or none")
    with torch.inference_mode(), layer_outputs(submodule(model, spec.target_layer)) as outputs:
        model(one_input)
    return int(outputs[0].shape[-2])


def native_grid(source_images: torch.Tensor, what: str) -> int:
    """The grid of `grid="native"`: the side of the (uint8, unresized) source images."""
    height, width = source_images.shape[-2:]
    if height != width:
        raise XtlError(f"option --grid native needs square source images; {what} has {height}x{width}: give a number")
    return int(height)


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
                          baseline: str | Sequence[str] = DEFAULT_BASELINES, batch_size: int = 64,
                          explain_batch_size: int = 8, seed: int = 0, device: str | None = None, progress: bool = True,
                          method_options: dict[str, dict] | None = None, resume: bool = True,
                          grid: int | str | None = "common", extra_grids: Sequence[int | str | None] = ()
                          ) -> list[ModelScores]:
    """Score the methods on a pretrained ImageNet classifier (its own head) and the imagenet-sample images
    (`resume`: as in `faithfulness_run`, the cache in `<out>/faithfulness_cache/`; `baseline`, `grid`,
    `extra_grids`: as there; the sample is decoded at the model's input size, so "common" is 28 x 28
    cells and "native" is per pixel). One `ModelScores` per baseline and grid."""
    from xtl.data import Preprocess
    from xtl.models import build_model

    baselines = baseline_list(baseline)
    grids = [grid] + [g for g in extra_grids if g != grid]
    checked = [FaithfulnessSettings(steps=steps, baseline=b, grid=g, batch_size=batch_size,
                                    explain_batch_size=explain_batch_size, seed=seed, n_images=n_images,
                                    methods=methods, method_options=method_options or {})
               for b in baselines for g in grids]
    settings = checked[0]
    if not Path(folder).is_dir():
        raise XtlError(f"option --imagenet-sample: {folder} is not a directory")
    device = resolve_device(device)
    net, spec = build_model(model, n_classes=None)
    net = net.to(device).eval()
    chosen = _chosen_methods(spec.family, settings.methods, spec.name)
    raw, labels = load_imagenet_sample(Path(folder), n_images, spec.input_size)
    images = Preprocess(spec.input_size, spec.mean, spec.std)(raw.to(device))
    results = []
    for g in grids:
        # the photos are finer than the input they were decoded at: the common grid is the inputs' own
        cells = _grid_of_inputs(g, net, spec, images) if g == "common" else resolve_grid(g, net, spec, raw, images[:1],
                                                                                         str(folder))
        for b in baselines if g == grid else baselines[:1]:
            scores = score_model(net, spec, images, labels, chosen, replace(settings, baseline=b).with_grid(cells),
                                 progress, f"{spec.name} (ImageNet, {b}, grid {grid_label(cells)})",
                                 cache=Path(out) / CACHE if resume else None, pixel_std=spec.std)
            results.append(ModelScores(Path(out).name, spec.name, len(labels), steps, b, scores, cells))
    write_outputs(Path(out), results)
    return results
