"""Explain a run's evaluated model: stream maps of a whole split to disk, draw the galleries."""

from __future__ import annotations

import sys
import time
from functools import cached_property
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from xtl.data.stream import consecutive_batches, image_batches
from xtl.distributed import SINGLE, Ranks
from xtl.errors import XtlError, sigterm_as_interrupt
from xtl.explain import METHODS, explain, methods_for
from xtl.explain.gallery import (
    GalleryRow,
    gallery_name,
    pick_correct_per_class,
    pick_misclassified,
    render_gallery,
)
from xtl.explain.stored import (
    chosen_set,
    drop_overlapping,
    images_digest,
    load_shard,
    method_folder,
    open_set,
    set_info,
    set_key,
    shard_files,
    shard_metadata,
)
from xtl.inference import LoadedRun
from xtl.io import atomic_path
from xtl.models import class_probabilities
from xtl.runs import RunDir, check_same_data, run_title

DEFAULT_METHOD = {"cnn": "gradcam", "vit": "transformer_attribution", "other": "saliency"}
console = Console(stderr=True)


def progress_bar(progress: bool, on: Console | None = None) -> Progress:
    """The bar of `stream`: one task per method, described by the run's folder name, shown literally."""
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not progress, console=on or console)


def as_run(run: RunDir | str | Path) -> RunDir:
    """A run folder given as a `RunDir`, a str or a Path, as a `RunDir`."""
    if isinstance(run, RunDir):
        return run
    if isinstance(run, (str, Path)) or hasattr(run, "__fspath__"):
        return RunDir(Path(run))
    raise XtlError(f"run must be a run folder (a str, a Path or an xtl.runs.RunDir), not {type(run).__name__}")


def read_stored_maps(run: RunDir | str | Path, method: str, split: str = "test", target: str | None = None,
                     images: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """What `explain_run` stored for `method`, in shard order from the split's first image: raw maps
    [N, h, w] on the method's grid, the classes they explain [N] and the images' ids [N]; None when
    there are none. One set of maps (`xtl.explain.stored.chosen_set`): of the run's current weights,
    of `images` (`images_digest`) where given, of `target` where there is one. A shard that is
    damaged, crafted or copied from another set (`load_shard`), or maps of two grids in one set, are
    one `XtlError` naming the file: they are never mixed in. `run`: a `RunDir` or the run folder's path."""
    run = as_run(run)
    shards = shard_files(chosen_set(run, method, split, target, images))
    parts = [load_shard(s) for s in shards]
    if not parts:
        return None
    grids = {tuple(p["raw"].shape[1:]) for p in parts}
    if len(grids) > 1:
        raise XtlError(f"stored maps of {method} in {shards[0].parent} mix grids {sorted(grids)}; remove the folder, "
                       "and xtl explain writes it anew")
    return tuple(torch.cat([p[key] for p in parts]) for key in ("raw", "targets", "ids"))


def stored_maps_for(run: RunDir | str | Path, method: str, split: str, ids: list[int], target: str | None = None,
                    images: str | None = None) -> dict[int, tuple[torch.Tensor, int]]:
    """The maps `explain_run` stored for `method` of the images `ids` (one set, as `read_stored_maps`
    chooses it): image id -> (raw map [h, w], the class it explains). Reads each shard's ids and only
    the rows wanted, each shard checked first (`load_shard`: a damaged or foreign one is one line);
    images without a stored map are left out (the caller computes those). `run`: a `RunDir` or a path."""
    run = as_run(run)
    wanted = {int(i) for i in ids}
    found: dict[int, tuple[torch.Tensor, int]] = {}
    for shard in shard_files(chosen_set(run, method, split, target, images)):
        if len(found) == len(wanted):
            break
        tensors = load_shard(shard)
        for k, image_id in enumerate(int(i) for i in tensors["ids"].tolist()):
            if image_id in wanted and image_id not in found:
                found[image_id] = (tensors["raw"][k].float(), int(tensors["targets"][k]))
    return found


def _intact(shard: Path) -> bool:
    """Whether a finished shard is there and passes `load_shard`; a damaged or foreign one is written anew."""
    if not shard.is_file():
        return False
    try:
        load_shard(shard)
    except XtlError:
        return False
    return True


def applicable_methods(family: str, methods: list[str] | None) -> list[str]:
    """The requested methods that apply to `family` (all requested must exist)."""
    if not methods:
        return [DEFAULT_METHOD[family]] if DEFAULT_METHOD[family] in METHODS else methods_for(family)[:1]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise XtlError(f"option --methods: unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(METHODS))}")
    return [m for m in methods if family in METHODS[m].families]


class PlainProgress:
    """Progress as plain lines where stderr is not a terminal (a piped or logged run, no live bar):
    `<what>: 48/100 images, <detail> (12.4 s elapsed)`, at most one line per `every` seconds,
    and always one for the last image."""

    every = 5.0  # seconds
    clock = staticmethod(time.perf_counter)

    def __init__(self, what: str, detail: str, total: int, enabled: bool) -> None:
        self.what, self.detail, self.total, self.enabled = what, detail, total, enabled
        self.start = self.last = self.clock()

    def update(self, done: int) -> None:
        now = self.clock()
        if not self.enabled or (done < self.total and now - self.last < self.every):
            return
        self.last = now
        print(f"{self.what}: {done}/{self.total} images, {self.detail} ({now - self.start:.1f} s elapsed)",
              file=sys.stderr, flush=True)


class RunExplainer(LoadedRun):
    """A loaded run (`xtl.inference.LoadedRun`: model, preprocessing, split, probabilities) that
    explains images of its split: maps streamed to disk, gallery rows."""

    def explain_positions(self, positions: list[int], method: str, target: str = "predicted",
                          images: torch.Tensor | None = None, **options):
        """`images`: the uint8 images at `positions` where already decoded (a streamed split's batch
        decoded ahead in a worker process), else they are read from the split."""
        images = self.inputs(positions) if images is None else self.preprocess(images.to(self.device))
        targets = self.predicted(positions, images) if target == "predicted" else self.part.labels[positions].to(self.device)
        return explain(self.model, images, targets, method=method, **options)

    def predicted(self, positions: list[int], images: torch.Tensor) -> torch.Tensor:
        """The predicted class of the images at `positions` (preprocessed `images`): the evaluation's,
        as `predictions.csv`, the galleries and the report show it, where it was stored for these
        images, else this batch's own prediction in the same precision (`class_probabilities`). The
        map explains it, so a map never explains a class other than the one shown as predicted."""
        if self._saved is not None:
            return self._saved[positions].argmax(1).to(self.device)
        return class_probabilities(self.model, images).argmax(1)

    @cached_property
    def images_digest(self) -> str:
        """A hash of the split's ids, labels and images: part of the key of stored maps."""
        return images_digest(self.part)

    def stream(self, methods: list[str], n_images: int | None, batch_size: int, target: str, progress: bool,
               options: dict[str, dict] | None = None, ranks: Ranks = SINGLE) -> Path:
        """Raw maps of the first `n_images` of the split, one shard per batch, in a folder per method
        keyed by everything they depend on (`xtl.explain.stored`); finished shards of the same key
        are kept and reused, maps of other settings or weights never. `options`: method -> options.
        `ranks` (`xtl.distributed`): each process writes the shards of its own batches (the same files
        one process writes); rank 0 opens the sets first, and all have finished when this returns."""
        out = self.run.path / "explanations" / self.split_name
        n = len(self.part) if n_images is None else min(n_images, len(self.part))
        batches = [list(positions) for positions in consecutive_batches(n, batch_size)]
        names = [f"batch_{k:05d}_{positions[0]}-{positions[-1]}.safetensors" for k, positions in enumerate(batches)]
        options = options or {}
        folders = {}
        for method in methods:
            info = set_info(self.run, self.split_name, method, target, batch_size, options.get(method), self.images_digest)
            if ranks.is_zero:
                folders[method] = open_set(self.run, info)
                drop_overlapping(folders[method], names)
            else:  # rank 0 makes it (and removes what it replaces) alone
                folders[method] = method_folder(self.run, self.split_name, method) / set_key(info)
        ranks.barrier()
        # with several processes rank 0 reports its own share (its batches, its images)
        own = [positions for k, positions in enumerate(batches) if ranks.mine(k)]
        what = f"explain {self.run.path.name}" + (f" (process 1 of {ranks.world})" if ranks.world > 1 else "")
        lines = PlainProgress(what, "+".join(methods), sum(map(len, own)), enabled=not sys.stderr.isatty() and ranks.is_zero)
        done = 0
        with progress_bar(progress and ranks.is_zero) as bar, \
                sigterm_as_interrupt(lambda: f"finished shards are kept in {out}; the same command continues"):
            tasks = {m: bar.add_task(f"{self.run.path.name}: {m}", total=len(own)) for m in methods}
            # each shard checked once: those missing or spoiled are (re)written
            lacking = {(m, k) for k in range(len(batches)) if ranks.mine(k) for m in methods
                       if not _intact(folders[m] / names[k])}
            # the batches some method still lacks, decoded ahead (a streamed split: in worker processes)
            todo = sorted({k for _, k in lacking})
            decoded = image_batches(self.part.images, [batches[k] for k in todo])
            # batch by batch, every method on each: "images done" means done by every method
            for k, positions in enumerate(batches):
                if not ranks.mine(k):
                    continue
                images = next(decoded) if todo and todo[0] == k else None
                if images is not None:
                    todo.pop(0)
                for method in methods:
                    shard = folders[method] / names[k]
                    if (method, k) in lacking:
                        try:
                            self._write_shard(shard, positions, method, target, options.get(method) or {}, images)
                        except torch.cuda.OutOfMemoryError:
                            raise XtlError(f"out of GPU memory explaining {self.run.path} with {method} and --batch-size "
                                           f"{batch_size}; try a smaller --batch-size (finished shards are kept)") from None
                    bar.advance(tasks[method])
                done += len(positions)
                lines.update(done)
        ranks.barrier()  # every process's shards written: the set is whole
        return out

    def _write_shard(self, shard: Path, positions: list[int], method: str, target: str, options: dict,
                     images: torch.Tensor | None = None) -> None:
        from safetensors.torch import save_file

        result = self.explain_positions(positions, method, target, images, **options)
        tensors = {
            "raw": result.raw.cpu().contiguous(),
            "targets": result.targets.cpu().contiguous(),
            "ids": torch.as_tensor(self.part.ids[positions]).contiguous(),
        }
        with atomic_path(shard) as tmp:
            save_file(tensors, str(tmp), metadata=shard_metadata(shard))

    def gallery_maps(self, positions: list[int], method: str, target: str = "predicted") -> tuple[list[torch.Tensor], list[int]]:
        """Raw maps (sign kept) of the images at `positions` and the classes they explain: the maps
        `xtl explain` stored where they explain the class `target` asks for (the true class, or the
        predicted one), the others computed now."""
        if not positions:
            return [], []
        wanted = (self.probabilities[positions].argmax(1) if target == "predicted" else self.part.labels[positions]).tolist()
        ids = [int(i) for i in self.part.ids[positions].tolist()]
        stored = stored_maps_for(self.run, method, self.split_name, ids, target, self.images_digest)
        maps: list[torch.Tensor | None] = [None] * len(positions)
        targets = [int(t) for t in wanted]
        for k, image_id in enumerate(ids):
            if image_id in stored and stored[image_id][1] == targets[k]:
                maps[k] = stored[image_id][0]
        missing = [k for k, m in enumerate(maps) if m is None]
        if missing:
            result = self.explain_positions([positions[k] for k in missing], method, target)
            for j, k in enumerate(missing):
                maps[k], targets[k] = result.raw[j].cpu(), int(result.targets[j])
        return maps, targets

    def gallery_rows(self, positions: list[int], methods: list[str], target: str = "predicted") -> list[GalleryRow]:
        maps = {m: self.gallery_maps(positions, m, target) for m in methods}
        rows = []
        for k, pos in enumerate(positions):
            label = int(self.part.labels[pos])
            guess = int(self.probabilities[pos].argmax())
            caption = f"true: {self.class_names[label]}\npred: {self.class_names[guess]}"
            rows.append(GalleryRow(self.part.images[pos], label, self.probabilities[pos],
                                   {m: maps[m][0][k] for m in methods}, caption,
                                   targets={m: maps[m][1][k] for m in methods},
                                   signed={m: bool(METHODS[m].signed) for m in methods}))
        return rows


def explain_run(
    run: RunDir,
    methods: list[str] | None = None,
    split: str = "test",
    n_images: int | None = None,
    batch_size: int = 16,
    target: str = "predicted",
    device: str | None = None,
    progress: bool = True,
    gallery_size: int = 10,
    ranks: Ranks = SINGLE,
) -> dict[str, Path]:
    """Maps of the split streamed to `explanations/`, and the two galleries in `figures/`, named after
    the methods (`gallery_name`: explaining again with other methods keeps the earlier galleries) and
    drawn from the stored maps. `ranks` (`xtl.distributed.launch`): the batches of maps shared out
    among processes, the galleries drawn by rank 0 once all maps are stored."""
    explainer = RunExplainer(run, split, ranks.device or device)
    chosen = applicable_methods(explainer.spec.family, methods)
    if not chosen:
        raise XtlError(f"option --methods: none of {', '.join(methods or [])} applies to {explainer.spec.family.upper()} model {explainer.spec.name}")
    maps_dir = explainer.stream(chosen, n_images, batch_size, target, progress, ranks=ranks)
    paths = {"maps": maps_dir, "correct": run.figures / gallery_name("correct", chosen),
             "misclassified": run.figures / gallery_name("misclassified", chosen)}
    if not ranks.is_zero:
        return paths
    labels, probs = explainer.part.labels, explainer.probabilities
    name = run_title(run.path.name, explainer.spec.name)
    correct = pick_correct_per_class(labels, probs.argmax(1), len(explainer.class_names), limit=gallery_size)
    wrong = pick_misclassified(labels, probs, limit=gallery_size)
    render_gallery(explainer.gallery_rows(correct, chosen, target), explainer.class_names, paths["correct"],
                   f"{name}: correctly classified {split} images, one per class")
    render_gallery(explainer.gallery_rows(wrong, chosen, target), explainer.class_names, paths["misclassified"],
                   f"{name}: most confidently misclassified {split} images")
    return paths


def compare_runs(runs: list[RunDir], methods: list[str] | None, path: Path, split: str = "test",
                 target: str = "predicted", device: str | None = None, per_class: int = 1,
                 image_ids: list[int] | None = None, title: str | None = None) -> Path:
    """The same images explained by every run and method: `image_ids`, or by default the first
    `per_class` images of each class that every run's split holds. Each row shows every model's
    top-5 probabilities; the maps come from what `xtl explain` stored where it can. Runs of other
    data sets are refused (`check_same_data`)."""
    check_same_data(runs, "side-by-side galleries")
    explainers = [RunExplainer(run, split, device) for run in runs]
    first = explainers[0]
    common = set(first.part.ids.tolist())
    for other in explainers[1:]:
        common &= set(other.part.ids.tolist())
    if not common:
        raise XtlError(f"runs {', '.join(str(r.path) for r in runs)} share no {split} images")
    position_of = [{int(i): k for k, i in enumerate(e.part.ids.tolist())} for e in explainers]
    chosen_ids = [i for i in image_ids if i in common] if image_ids is not None else []
    for c in range(len(first.class_names) if image_ids is None else 0):
        ids = sorted(i for i in common if int(first.part.labels[position_of[0][i]]) == c)
        chosen_ids += ids[:per_class]
    if not chosen_ids:
        raise XtlError(f"runs {', '.join(str(r.path) for r in runs)} share none of the chosen {split} images")
    rows = []
    columns_per_run = []
    for e, positions in zip(explainers, position_of):
        run_rows = e.gallery_rows([positions[i] for i in chosen_ids], applicable_methods(e.spec.family, methods), target)
        columns_per_run.append(run_rows)
    for k, image_id in enumerate(chosen_ids):
        maps, targets, signed, bars = {}, {}, {}, []
        for e, run_rows in zip(explainers, columns_per_run):
            row = run_rows[k]
            maps.update({f"{e.spec.name}\n{m}": v for m, v in row.maps.items()})
            targets.update({f"{e.spec.name}\n{m}": v for m, v in row.targets.items()})
            signed.update({f"{e.spec.name}\n{m}": v for m, v in row.signed.items()})
            bars.append((e.spec.name, row.probabilities))
        base = columns_per_run[0][k]
        caption = f"true: {first.class_names[base.label]}"  # each model's prediction tops its bars
        rows.append(GalleryRow(base.image, base.label, base.probabilities, maps, caption, targets, signed, bars))
    title = (title or "Same test images") + ", " + " vs ".join(e.spec.name for e in explainers)
    render_gallery(rows, first.class_names, path, title)
    return path


def shared_picks(predictions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_classes: int,
                 limit: int = 10) -> tuple[list[int], list[int]]:
    """Image ids for side-by-side galleries from every run's (ids, labels, probabilities):
    one image per class that every run classifies correctly, and up to `limit` images that some
    run gets wrong (most runs wrong first, then the most confident mistake)."""
    common = set(predictions[0][0].tolist())
    for ids, _, _ in predictions[1:]:
        common &= set(ids.tolist())
    label_of, wrong_by, confidence = {}, {}, {}
    for ids, labels, probs in predictions:
        guesses = probs.argmax(1)
        for i, label, guess, p in zip(ids.tolist(), labels.tolist(), guesses.tolist(), probs.max(1).values.tolist()):
            if i in common:
                label_of[i] = label
                wrong_by[i] = wrong_by.get(i, 0) + int(guess != label)
                if guess != label:
                    confidence[i] = max(confidence.get(i, 0.0), p)
    correct = []
    for c in range(n_classes):
        candidates = sorted(i for i in common if label_of[i] == c and wrong_by[i] == 0)
        correct += candidates[:1]
    wrong = sorted((i for i in common if wrong_by[i] > 0), key=lambda i: (-wrong_by[i], -confidence[i], i))[:limit]
    return correct, wrong
