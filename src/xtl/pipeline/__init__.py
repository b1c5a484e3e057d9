"""`xtl run`: split -> fine-tune each model -> evaluate -> explain -> faithfulness -> analysis -> report.

Everything lands in one folder, `<runs_dir>/<name>/`:

    pipeline.yaml          the effective configuration
    steps.json             finished steps with a fingerprint of what they depended on
    figures/               class distribution, side-by-side galleries, combined faithfulness curves
    faithfulness_combined.csv
    analysis/              the stored maps measured: statistics, agreement, the paper's claims (xtl.analysis)
    grid_pointing/         the grid pointing game on the models (xtl.analysis.grid_pointing)
    <model>/               one run directory per model (see xtl.runs): the primary seed's
    seeds/seed-<s>/<model>/   each further fine-tuning seed's run (key seeds): evaluated, and explained
                           with the methods the claims test
    sanity/shuffled-labels/<model>/   the data-randomisation check's model (key data_randomisation)
    report/report.html     the self-contained report, its PNG figures beside it

A step whose fingerprint is in `steps.json` is skipped, so a re-run after a finished run only
reads files; a killed run continues where it stopped (fine-tuning from its last epoch,
explanations from their last shard).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml
from rich.console import Console

from xtl.config import RunConfig
from xtl.errors import XtlError
from xtl.io import check_output_folder, read_yaml, write_json, write_text
from xtl.pipeline.config import PipelineConfig, dump, load_config, parse_assignments, preset_config
from xtl.runs import RunDir, split_spec

__all__ = ["PipelineConfig", "load_config", "parse_assignments", "preset_config", "run_pipeline", "model_folder"]

STEPS = ("data", "finetune", "evaluate", "explain", "compare", "faithfulness", "analysis", "grid_pointing", "report")


def model_folder(model: str) -> str:
    """A model name as a folder name (`timm:vit_small` -> `timm_vit_small`)."""
    return model.replace(":", "_").replace("/", "_")


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StepLog:
    """`steps.json`: which steps finished, for which inputs, in how many seconds."""

    path: Path
    steps: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "StepLog":
        if not path.is_file():
            return cls(path)
        todo = "delete it (finished work is found again) or pass --force"
        try:
            steps = json.loads(path.read_bytes().decode())
        except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
            why = ("binary, not text" if isinstance(err, UnicodeDecodeError) else "a folder, not a file"
                   if isinstance(err, IsADirectoryError) else "empty" if path.stat().st_size == 0 else "not JSON")
            raise XtlError(f"step log {path} is damaged ({why}); {todo}") from None
        if not isinstance(steps, dict) or not all(isinstance(v, dict) for v in steps.values()):
            raise XtlError(f"step log {path} is damaged (not a mapping of steps); {todo}")
        return cls(path, steps)

    def done(self, key: str, print_: str) -> bool:
        return self.steps.get(key, {}).get("fingerprint") == print_

    def finish(self, key: str, print_: str, seconds: float, outputs: list[str] = ()) -> None:
        self.steps[key] = {"fingerprint": print_, "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if outputs:
            self.steps[key]["outputs"] = list(outputs)
        write_json(self.path, self.steps)

    def outputs(self, key: str) -> list[str]:
        """The files a finished step wrote (relative to the folder), as `finish` recorded them."""
        found = self.steps.get(key, {}).get("outputs", [])
        return [p for p in found if isinstance(p, str)] if isinstance(found, list) else []


class Pipeline:
    def __init__(self, config: PipelineConfig, progress: bool, console: Console) -> None:
        self.config = config
        self.folder = config.folder
        self.progress = progress
        self.console = console
        self.log = StepLog.load(self.folder / "steps.json")
        self.run_configs = {m: config.run_config(m) for m in config.models}
        self.runs = {m: RunDir(self.folder / model_folder(m)) for m in config.models}
        # the further seeds' runs: seed -> model -> (RunConfig, RunDir)
        self.replicates = {seed: {m: (config.run_config(m, seed=seed), RunDir(self.folder / "seeds" / f"seed-{seed}" / model_folder(m)))
                                  for m in config.models} for seed in config.all_seeds[1:]}
        # the data-randomisation check's models: model -> (RunConfig on shuffled labels, RunDir)
        self.shuffled = {m: (replace(self.run_configs[m], shuffle_labels=True),
                             RunDir(self.folder / "sanity" / "shuffled-labels" / model_folder(m)))
                         for m in config.models} if config.data_randomisation else {}
        self.frozen_cache: dict = {}  # the frozen blocks' outputs, shared by a model's seeds (xtl.train.finetune)
        self.ran: list[str] = []
        self.redoing: str | None = None  # why the step running now is done again, if it was done before
        self._splits: dict[str, Any] = {}
        self._explained: dict[str, list[Path]] = {}  # the files each model's explain step wrote

    # ------------------------------------------------------------------ plumbing

    def step(self, key: str, inputs: Any, work: Callable[[], None], what: str,
             outputs: Callable[[], list[Path]] = lambda: [], after: tuple[str, ...] = ()) -> None:
        """Run `work` unless the log has it done for the same `inputs`, with every output it wrote still
        there (`outputs()` after the work, recorded in the log) and none of the steps it uses (`after`)
        redone in this run; a step whose output is missing says so and redoes itself."""
        print_ = fingerprint(inputs)
        self.redoing = None
        if self.log.done(key, print_):
            recorded = [self.folder / p for p in self.log.outputs(key)] or outputs()
            missing = [p for p in recorded if not p.exists()]
            redone = [k for k in after if k in self.ran]
            if not missing and not redone:
                self.console.print(f"{what}: done already", style="dim", markup=False, highlight=False)
                return
            self.redoing = (f"{_relative(missing[0], self.folder)} is missing" if missing
                            else f"step {redone[0]} was redone")
            self.console.print(f"{what}: {self.redoing}; doing it again", markup=False, highlight=False)
        self.console.rule(what)
        start = time.perf_counter()
        work()
        written = [_relative(p, self.folder) for p in outputs()]
        self.log.finish(key, print_, time.perf_counter() - start, written)
        self.ran.append(key)

    def split(self, config: RunConfig):
        from xtl.data import load_split

        key = fingerprint(config.source, split_spec(config).__dict__)
        if key not in self._splits:
            self._splits[key] = load_split(config.source, split_spec(config), config.data_path, config.num_workers)
        return self._splits[key]

    def device(self, config: RunConfig):
        """Where the steps after fine-tuning run: the setting `device`, else the model's accelerator."""
        from xtl.device import resolve_device

        return resolve_device(self.config.device, config.accelerator)

    # ------------------------------------------------------------------ steps

    def run(self) -> Path:
        first = self.run_configs[self.config.models[0]]
        figures = self.folder / "figures"
        self.step("data", [first.source, split_spec(first).__dict__], lambda: self.data(first), "data: split and class distribution",
                  outputs=lambda: [self.folder / "data.json", figures / "class_distribution.png"])
        for model, run in self.runs.items():
            config = self.run_configs[model]
            trained = fingerprint(config.learning_settings())
            self.step(f"finetune:{model}", trained, lambda: self.finetune(model), f"{model}: fine-tune ({self.sizes(config)})",
                      outputs=lambda: [run.config_path, run.weights_path])
            self.step(f"evaluate:{model}", trained, lambda: self.evaluate(model), f"{model}: evaluate",
                      outputs=lambda: [run.file("metrics.json"), run.file("predictions.csv")], after=(f"finetune:{model}",))
            self.step(f"explain:{model}", [trained, self.explain_settings()], lambda: self.explain(model), f"{model}: explain",
                      outputs=lambda: self._explained.get(model, []), after=(f"finetune:{model}", f"evaluate:{model}"))
        for seed, runs in self.replicates.items():
            for model, (config, run) in runs.items():
                trained = fingerprint(config.learning_settings())
                key = f"{model}@seed-{seed}"
                self.step(f"finetune:{key}", trained, lambda: self.finetune(model, seed), f"{model}, seed {seed}: fine-tune",
                          outputs=lambda: [run.config_path, run.weights_path])
                self.step(f"evaluate:{key}", trained, lambda: self.evaluate(model, seed), f"{model}, seed {seed}: evaluate",
                          outputs=lambda: [run.file("metrics.json"), run.file("predictions.csv")], after=(f"finetune:{key}",))
                self.step(f"explain:{key}", [trained, self.explain_settings()], lambda: self.explain_replicate(model, seed),
                          f"{model}, seed {seed}: explain (the claims' methods)",
                          outputs=lambda: [run.path / "explanations" / "test"], after=(f"finetune:{key}", f"evaluate:{key}"))
        for model, (config, run) in self.shuffled.items():
            trained = fingerprint(config.learning_settings())
            key = f"{model}@shuffled-labels"
            self.step(f"finetune:{key}", trained, lambda: self.finetune(model, shuffled=True),
                      f"{model}: fine-tune on shuffled labels (data randomisation)",
                      outputs=lambda: [run.config_path, run.weights_path])
            self.step(f"evaluate:{key}", trained, lambda: self.evaluate(model, shuffled=True),
                      f"{model}, shuffled labels: evaluate", outputs=lambda: [run.file("metrics.json"), run.file("predictions.csv")],
                      after=(f"finetune:{key}",))
        trained_all = [fingerprint(c.learning_settings()) for c in self.run_configs.values()]
        replicated = [fingerprint(c.learning_settings()) for runs in self.replicates.values() for c, _ in runs.values()]
        replicated += [fingerprint(c.learning_settings()) for c, _ in self.shuffled.values()]
        every = tuple(f"{step}:{m}" for m in self.runs for step in ("finetune", "evaluate"))
        if len(self.runs) > 1:
            self.step("compare", [trained_all, self.explain_settings()], self.compare, "side by side: same images, every model",
                      outputs=lambda: [p for p in (figures / "compare_correct.png", figures / "compare_misclassified.png")
                                       if p.is_file()], after=every)
        self.step("faithfulness", [trained_all, self.faithfulness_settings()], self.faithfulness, "faithfulness",
                  outputs=lambda: [self.folder / "faithfulness_combined.csv",
                                   *[r.file("faithfulness.csv") for r in self.runs.values()]], after=every)
        explained = tuple(f"{step}:{m}" for m in self.runs for step in ("finetune", "evaluate", "explain"))
        explained += tuple(f"{step}:{m}@seed-{seed}" for seed, runs in self.replicates.items() for m in runs
                           for step in ("finetune", "evaluate", "explain"))
        explained += tuple(f"{step}:{m}@shuffled-labels" for m in self.shuffled for step in ("finetune", "evaluate"))
        self.step("analysis", [trained_all, replicated, self.explain_settings(), self.analysis_settings()], self.analysis,
                  "analysis: what the models look at, in numbers", outputs=lambda: [self.folder / "analysis" / "analysis.json"],
                  after=explained)
        if self.config.grid_pointing_mosaics:
            self.step("grid_pointing", [trained_all, self.grid_pointing_settings()], self.grid_pointing,
                      "grid pointing game: mosaics of four classes, each explained",
                      outputs=lambda: [self.folder / "grid_pointing" / "grid_pointing.json"], after=every)
        report = self.folder / "report" / "report.html"
        upstream = {k: v for k, v in self.log.steps.items() if k != "report"}
        self.step("report", [upstream, self.config.to_dict()], self.report, "report", outputs=lambda: [report])
        return report

    def sizes(self, config: RunConfig) -> str:
        sizes = "paper split" if config.split == "paper" else f"{config.train_size}/{config.val_size}/{config.test_size}"
        return f"{sizes} at {config.input_size or 'native'} px, {config.epochs} epoch{'s' if config.epochs > 1 else ''}, {config.preset} recipe"

    def data(self, config: RunConfig) -> None:
        from xtl.data.figures import plot_class_distribution

        split = self.split(config)
        plot_class_distribution(split, self.folder / "figures" / "class_distribution.png")
        write_json(self.folder / "data.json", {
            # the source actually read (the report shows it): the configured one, or its stand-in
            # where the default ../shared folder is absent (xtl.data.fallback)
            "source": split.source, "configured_source": config.source,
            "class_names": split.class_names, "counts": split.summary(),
            "sizes": {name: len(part) for name, part in split.parts.items()},
        })

    def _which(self, model: str, seed: int | None, shuffled: bool) -> tuple[RunConfig, RunDir]:
        if shuffled:
            return self.shuffled[model]
        return self.replicates[seed][model] if seed is not None else (self.run_configs[model], self.runs[model])

    def finetune(self, model: str, seed: int | None = None, shuffled: bool = False) -> None:
        from xtl.train import finetune

        config, run = self._which(model, seed, shuffled)
        if run.config_path.is_file():
            before, now = run.config().learning_settings(), config.learning_settings()
            changed = sorted(k for k, v in now.items() if before.get(k) != v)
            if changed:
                details = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed[:4])
                raise XtlError(f"run directory {run.path} was trained with other settings ({details}); "
                               "pass --force to train again or --name for a new folder")
            for stale in ("metrics.json", "predictions.csv"):
                run.file(stale).unlink(missing_ok=True)
        if self.redoing and not run.weights_path.is_file():
            # the last checkpoint is of a finished run: resuming it would train nothing and keep no model
            run.last_checkpoint.unlink(missing_ok=True)
        finetune(config, self.split(config), run, resume=True, progress=self.progress, frozen_cache=self.frozen_cache)

    def evaluate(self, model: str, seed: int | None = None, shuffled: bool = False) -> None:
        from xtl.evaluate import evaluate

        config, run = self._which(model, seed, shuffled)
        metrics = evaluate(run, self.split(config), device=self.device(config))
        low, high = metrics["accuracy_ci95"]
        who = f"{model}, shuffled labels" if shuffled else model if seed is None else f"{model}, seed {seed}"
        self.console.print(f"{who}: test accuracy {metrics['accuracy']:.3f} [{low:.3f}, {high:.3f}], "
                           f"ROC-AUC {metrics['roc_auc_macro_ovr']:.3f}", markup=False)

    def explain_settings(self) -> list:
        c = self.config
        return [c.explain_methods, c.explain_images, c.explain_batch_size, c.explain_target, c.gallery_size,
                c.explain_every_image]

    def explain(self, model: str) -> None:
        from xtl.explain.runner import RunExplainer, applicable_methods, explain_run

        run, c = self.runs[model], self.config
        # stored maps are keyed by their settings and weights (xtl.explain.stored): a killed step resumes
        device = self.device(self.run_configs[model])
        paths = explain_run(run, c.explain_methods, "test", c.explain_images, c.explain_batch_size, c.explain_target,
                            device=device, progress=self.progress, gallery_size=c.gallery_size)
        if c.explain_every_image:
            # the same sets of maps, of every image, after the others: a set holds one layout of shards,
            # and the last, shorter batch of the first N is replaced by a whole one here, never the reverse
            explainer = RunExplainer(run, "test", device)
            every = applicable_methods(explainer.spec.family, c.explain_every_image)
            if every:
                explainer.stream(every, None, c.explain_batch_size, c.explain_target, self.progress)
        self._explained[model] = [paths["maps"], paths["correct"], paths["misclassified"]]

    def claim_methods(self) -> list[str]:
        """The explained methods that apply to every model: those the cross-model claim tests."""
        from xtl.explain.runner import applicable_methods
        from xtl.models import get_spec

        families = {get_spec(m).family for m in self.config.models}
        return [m for m in self.config.explain_methods if all(applicable_methods(f, [m]) for f in families)]

    def explain_replicate(self, model: str, seed: int) -> None:
        """A further seed's maps of what the claims test: the methods that apply to every model on the
        first `explain_images` test images, and `explain_every_image`'s of every image; no galleries."""
        from xtl.explain.runner import RunExplainer, applicable_methods

        config, run = self.replicates[seed][model]
        c = self.config
        explainer = RunExplainer(run, "test", self.device(config))
        shared_methods = applicable_methods(explainer.spec.family, self.claim_methods())
        if shared_methods:
            explainer.stream(shared_methods, c.explain_images, c.explain_batch_size, c.explain_target, self.progress)
        every = applicable_methods(explainer.spec.family, c.explain_every_image)
        if every:
            explainer.stream(every, None, c.explain_batch_size, c.explain_target, self.progress)

    def compare(self) -> None:
        from xtl.evaluate import read_predictions
        from xtl.explain.runner import compare_runs, shared_picks

        runs = list(self.runs.values())
        n_classes = len(runs[0].class_names)
        correct, wrong = shared_picks([read_predictions(r) for r in runs], n_classes, self.config.gallery_size)
        c = self.config
        figures = self.folder / "figures"
        for picked, name, title in ((correct, "compare_correct", "Classified correctly by every model, one per class"),
                                    (wrong, "compare_misclassified", "Misclassified by at least one model")):
            if picked:
                compare_runs(runs, c.explain_methods, figures / f"{name}.png", target=c.explain_target,
                             device=c.device, image_ids=picked, title=title)
            else:
                (figures / f"{name}.png").unlink(missing_ok=True)

    def faithfulness_settings(self) -> list:
        c = self.config
        from xtl.faithfulness.cache import PROTOCOL

        return [c.faithfulness_methods or c.explain_methods, c.faithfulness_images, c.faithfulness_steps,
                c.baselines, c.faithfulness_batch_size, c.faithfulness_grid, c.faithfulness_sensitivity_grids, PROTOCOL]

    def faithfulness(self) -> None:
        from xtl.faithfulness import faithfulness_run, faithfulness_table

        c = self.config
        pixels = lambda g: None if g == "none" else g  # noqa: E731
        results = faithfulness_run(
            list(self.runs.values()), c.faithfulness_methods or c.explain_methods, c.faithfulness_images,
            steps=c.faithfulness_steps, baseline=c.baselines, batch_size=c.faithfulness_batch_size,
            grid=pixels(c.faithfulness_grid), extra_grids=[pixels(g) for g in c.faithfulness_sensitivity_grids],
            combined=self.folder, device=c.device,
            progress=self.progress or not sys.stderr.isatty(),  # a log gets one plain line per batch and method
        )
        if len(self.runs) == 1:  # the report reads the combined tables in every case
            run = self.runs[c.models[0]]
            for own, combined in (("faithfulness.csv", "faithfulness_combined.csv"),
                                  ("faithfulness_images.csv", "faithfulness_combined_images.csv"),
                                  ("faithfulness_tests.csv", "faithfulness_combined_tests.csv")):
                shutil.copyfile(run.file(own), self.folder / combined)
            shutil.copyfile(run.figures / "faithfulness_curves.png", self.folder / "figures" / "faithfulness_combined.png")
        Console(width=None if sys.stdout.isatty() else 150, markup=False).print(
            faithfulness_table([row for r in results for row in r.rows()]))

    def analysis_settings(self) -> list:
        from xtl.analysis.run import ANALYSIS_VERSION, PIPELINE_RANDOMISATION

        return [ANALYSIS_VERSION, PIPELINE_RANDOMISATION, self.config.explain_every_image]

    def analysis(self) -> None:
        from xtl.analysis import analyse_runs
        from xtl.analysis.run import PIPELINE_RANDOMISATION as cheap

        seeds = self.config.all_seeds
        replicates = {seed: [run for _, run in runs.values()] for seed, runs in self.replicates.items()}
        result = analyse_runs(list(self.runs.values()), self.folder / "analysis", methods=self.config.explain_methods,
                              randomisation_images=cheap["images"], randomisation_layers=cheap["layers"],
                              robustness_images=cheap["robustness"], device=self.config.device,
                              seed=seeds[0], replicates=replicates,
                              shuffled={str(self.run_configs[m].model): run for m, (_, run) in self.shuffled.items()})
        for claim in result["claims"]:
            self.console.print(f"{claim['key']}: {claim['verdict']}", markup=False, highlight=False)

    def grid_pointing_settings(self) -> list:
        from xtl.analysis.grid_pointing import PROTOCOL

        c = self.config
        return [c.explain_methods, c.grid_pointing_mosaics, c.grid_pointing_layout, PROTOCOL]

    def grid_pointing(self) -> None:
        from xtl.analysis.grid_pointing import SETTINGS_JSON, GridSettings, NotPlayable, grid_pointing, grid_pointing_table

        c = self.config
        settings = GridSettings(mosaics=c.grid_pointing_mosaics, layout=c.grid_pointing_layout)
        out = self.folder / "grid_pointing"
        say = lambda line: self.console.print(line, markup=False, highlight=False)  # noqa: E731
        try:
            result = grid_pointing(list(self.runs.values()), out, c.explain_methods, settings, device=c.device, log=say)
        except NotPlayable as err:  # weak models: the game says so in the report; the run goes on
            shutil.rmtree(out, ignore_errors=True)
            write_json(out / SETTINGS_JSON, {"settings": asdict(settings), "not_played": str(err)})
            say(f"grid pointing game not played: {err}")
            return
        Console(width=None if sys.stdout.isatty() else 150, markup=False).print(grid_pointing_table(result["rows"]))

    def report(self) -> None:
        from xtl.report import build_report

        path = build_report(list(self.runs.values()), self.folder / "report", folder=self.folder,
                            config=self.config.to_dict(), title=self.config.title)
        self.console.print(f"report: {path}", markup=False)


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(Path(path).relative_to(folder))
    except ValueError:
        return str(path)


def run_pipeline(config: PipelineConfig, force: bool = False, progress: bool = True,
                 console: Console | None = None) -> Path:
    """Run every step that is not done yet; returns the report's path."""
    # markup=False: the lines hold paths, run and model names (user text), printed as they are
    console = console or Console(stderr=True, width=None if sys.stderr.isatty() else 150, markup=False)
    folder = config.folder
    _claim_folder(folder, config, force, console)
    pipeline = Pipeline(config, progress, console)
    report = pipeline.run()
    _print_results(pipeline, console)
    return report


def _claim_folder(folder: Path, config: PipelineConfig, force: bool, console: Console) -> None:
    """Make `folder` this configuration's: new, the same configuration's, or (with --force) emptied."""
    saved = folder / "pipeline.yaml"
    check_output_folder(Path(config.runs_dir), "option --runs-dir:")
    check_output_folder(folder, "option --name: the run folder")
    if folder.exists() and any(folder.iterdir()) and not saved.is_file():
        raise XtlError(f"folder {folder} exists and is not an xtl run folder (no pipeline.yaml); choose another --name")
    if force and saved.is_file():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if saved.is_file():
        try:
            before = read_yaml(saved)
        except (OSError, ValueError, yaml.YAMLError):  # UnicodeDecodeError is a ValueError
            before = None
        if not isinstance(before, dict):  # only this message reads it: steps.json says what is done
            console.print(f"{saved} is damaged; it is written anew (steps.json keeps the finished steps)",
                          markup=False, highlight=False)
            before = {}
        now = config.to_dict()
        changed = sorted(k for k in now if before.get(k) != now[k])
        if changed:
            console.print(f"configuration changed since the last run ({', '.join(changed)}): "
                                       "redoing only the steps that depend on it")
    write_text(saved, dump(config))


def _print_results(pipeline: Pipeline, console: Console) -> None:
    out = Console(width=None if sys.stdout.isatty() else 150, markup=False)
    for model, run in pipeline.runs.items():
        m = run.metrics()
        low, high = m["accuracy_ci95"]
        out.print(f"{model}: test accuracy {m['accuracy']:.3f} [{low:.3f}, {high:.3f}], ROC-AUC {m['roc_auc_macro_ovr']:.3f}")
    if not pipeline.ran:
        console.print("nothing to do: every step is done (pass --force to redo them)")
