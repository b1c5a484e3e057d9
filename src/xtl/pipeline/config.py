"""The configuration of `xtl run`: presets, a YAML or TOML file, command-line overrides, validated by key."""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from xtl.config import RunConfig, preset as training_preset
from xtl.errors import XtlError
from xtl.io import read_yaml
from xtl.settings import MAX_STEPS, Rule, check_known, check_settings, label

PRESETS = ("quick", "paper", "offline-full")
# What each pipeline preset fine-tunes with (xtl.config.preset names).
TRAINING_PRESET = {"quick": "quick", "paper": "paper", "offline-full": "default"}
QUICK_METHODS = ["gradcam", "transformer_attribution", "attnlrp", "attention_rollout", "saliency"]
FULL_METHODS = QUICK_METHODS + ["integrated_gradients", "lrp_epsilon", "cp_lrp", "occlusion", "kernel_shap"]
FAITHFULNESS_BASELINES = ("zero", "mean", "blur", "road")  # xtl.faithfulness.BASELINES, without importing torch
GRID_NAMES = ("common", "model", "native", "none")  # xtl.faithfulness's named grids, and none (pixels)


# What each key may hold beyond its type (xtl.settings); `faithfulness_grid`, `device`, the models and
# the methods have their own checks in `PipelineConfig.validate`.
RULES: dict[str, Rule] = {
    "preset": Rule(choices=PRESETS),
    "explain_target": Rule(choices=("predicted", "true")),
    **dict.fromkeys(("explain_batch_size", "gallery_size", "faithfulness_images", "faithfulness_batch_size"),
                    Rule(at_least=1)),
    "faithfulness_steps": Rule(at_least=1, at_most=MAX_STEPS),
    "explain_images": Rule(at_least=1, none="all"),
    "grid_pointing_mosaics": Rule(at_least=0, at_most=100_000, note="0: not played"),
    "grid_pointing_layout": Rule(choices=("half", "full")),
}


@dataclass
class PipelineConfig:
    """Everything `xtl run` does, from the data to the report. Each key is also a `xtl run` option."""

    preset: str = "quick"
    name: str | None = None  # folder under runs_dir (default: the preset's name)
    runs_dir: str = "runs"
    models: list[str] = field(default_factory=lambda: ["efficientnet_lite0", "vit_s14_dinov2"])
    source: str = "../shared/data/cifar10"
    train: dict[str, Any] = field(default_factory=dict)  # RunConfig keys for every model (xtl finetune's options)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> RunConfig keys for that model only
    # fine-tuning seeds of every model, on one split (the first seed's): the first is the primary run, which
    # every step uses; each further seed is fine-tuned, evaluated and explained with the methods the claims
    # test, so the report gives accuracy over seeds and says which seeds each verdict holds for (None: one
    # seed, `train.seed` or 0)
    seeds: list[int] | None = None
    # the data-randomisation sanity check (Adebayo et al. 2018): each model fine-tuned once more, with the
    # same recipe, on shuffled labels, and every gating method's maps compared with its (one more
    # fine-tuning per model: off in quick, whose 2-core budget does not hold it)
    data_randomisation: bool = False
    explain_methods: list[str] = field(default_factory=lambda: list(QUICK_METHODS))
    explain_images: int | None = 100  # maps of the first N test images (None: all)
    # methods whose maps are made of every test image as well (cheap ones: the error claims of the
    # analysis need at least 1,000 maps, xtl.analysis.run.ERROR_IMAGES); [] for none
    explain_every_image: list[str] = field(default_factory=list)
    explain_batch_size: int = 16
    explain_target: str = "predicted"
    gallery_size: int = 10
    faithfulness_methods: list[str] | None = None  # None: the explained methods
    faithfulness_images: int = 100
    # each curve from 0 to its maximum inclusive in steps of at most 1/steps (10: Chefer et al.'s 10 % steps)
    faithfulness_steps: int = 10
    # what masked pixels become, each scored in full: zero (the data set's mean colour) and ROAD's imputation
    faithfulness_baseline: list[str] | str = field(default_factory=lambda: ["zero", "road"])
    faithfulness_batch_size: int = 64
    # perturb the cells of a G x G grid, fixed before any result: "common" (one grid for every model: the
    # source images' pixels where coarser than the input, CIFAR's 32 x 32, else 28 x 28), a number, "model"
    # (each model's own grid: a ViT's patches, a CNN's CAM layer), "native" (the source images' pixels), or
    # "none" / null (the model input's pixels)
    faithfulness_grid: int | str | None = "common"
    # further grids scored under the first baseline: the report's grid-sensitivity appendix ([] for none)
    faithfulness_sensitivity_grids: list[int | str | None] = field(default_factory=lambda: ["model", "none"])
    # the grid pointing game on the explained models (xtl.analysis.grid_pointing): 2 x 2 mosaics of test
    # images every model classifies correctly alone, each explained for its four classes with the
    # explained methods; 0: not played. Layout "half" (tiles at half the input side) or "full"
    grid_pointing_mosaics: int = 100
    grid_pointing_layout: str = "half"
    title: str | None = None  # of the report
    # where evaluating, explaining and scoring run: auto, cpu, cuda, cuda:N or mps (None: each model's
    # fine-tuning accelerator, `train.accelerator`, which is where fine-tuning runs)
    device: str | None = None

    @property
    def folder(self) -> Path:
        return Path(self.runs_dir) / (self.name or self.preset)

    def validate(self, where: str = "option") -> None:
        check_settings(self, RULES, where)
        if self.name is not None:
            from xtl.locations import run_folder

            run_folder(self.runs_dir, self.name, label("name", where))  # inside runs_dir, never beside it
        if not self.models:
            raise XtlError(f"{label('models', where)} must name at least one model")
        if len(set(self.models)) != len(self.models):
            raise XtlError(f"{label('models', where)} names a model twice: {', '.join(self.models)}")
        for key, grids in (("faithfulness_grid", [self.faithfulness_grid]),
                           ("faithfulness_sensitivity_grids", self.faithfulness_sensitivity_grids)):
            for grid in grids:
                if grid is not None and not (grid in GRID_NAMES or (isinstance(grid, int) and not isinstance(grid, bool)
                                                                    and grid >= 1)):
                    raise XtlError(f"{label(key, where)} must be a number >= 1, common, model, native or none (pixels), "
                                   f"not {grid!r}")
        baselines = self.baselines
        unknown = [b for b in baselines if b not in FAITHFULNESS_BASELINES]
        if unknown or not baselines:
            raise XtlError(f"{label('faithfulness_baseline', where)} must be one or more of "
                           f"{', '.join(FAITHFULNESS_BASELINES)}, not {self.faithfulness_baseline!r}")
        if self.device is not None:
            from xtl.device import resolve_device

            resolve_device(self.device, option=label("device", where))
        for model, overrides in self.per_model.items():
            if model not in self.models:
                raise XtlError(f"{label('per_model', where)} names {model}, which is not in models ({', '.join(self.models)})")
            if not isinstance(overrides, dict):
                raise XtlError(f"{label('per_model', where)}: {model} must map keys to values, not {overrides!r}")
        if self.seeds is not None:
            seeds = self.seeds
            if (not isinstance(seeds, list) or not seeds
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
                raise XtlError(f"{label('seeds', where)} must be a list of one or more whole numbers >= 0, not {seeds!r}")
            if len(set(seeds)) != len(seeds):
                raise XtlError(f"{label('seeds', where)} names a seed twice: {seeds}")
        for model in self.models:
            self.run_config(model, where)  # every model's training settings must be valid too
        if self.seeds is not None:  # after the settings' own checks: a seed out of range is named as such
            fixed = ["train"] * ("seed" in self.train) + [m for m, o in self.per_model.items()
                                                          if isinstance(o, dict) and "seed" in o]
            if fixed:
                raise XtlError(f"{label('seeds', where)} and the key seed of {', '.join(fixed)} both set the fine-tuning "
                               "seed; give the seeds with the key seeds alone")
        for methods_key in ("explain_methods", "faithfulness_methods", "explain_every_image"):
            _check_methods(getattr(self, methods_key) or [], label(methods_key, where))

    @property
    def baselines(self) -> list[str]:
        """`faithfulness_baseline` as a list (one name, a comma-separated string, or a list)."""
        value = self.faithfulness_baseline
        return [b.strip() for b in value.split(",") if b.strip()] if isinstance(value, str) else list(value)

    @property
    def all_seeds(self) -> list[int]:
        """The fine-tuning seeds, the primary first: `seeds`, else the one `train` gives (0 by default)."""
        return list(self.seeds) if self.seeds else [int(self.train.get("seed", 0))]

    def run_config(self, model: str, where: str = "option", seed: int | None = None) -> RunConfig:
        """The fine-tuning configuration of one model: its training preset, then `train`, then `per_model`;
        with `seed` (one of `all_seeds`), that seed's run on the primary seed's split."""
        overrides = {"source": self.source, **self.train, **self.per_model.get(model, {})}
        if self.seeds and "seed" not in overrides:  # both given: refused by `validate`
            overrides["seed"] = self.seeds[0] if seed is None else seed
            if overrides["seed"] != self.seeds[0]:
                overrides.setdefault("split_seed", self.seeds[0])
        banned = sorted({"model", "preset"} & set(overrides))
        if banned:
            raise XtlError(f"{label('train', where)}: set {', '.join(banned)} with the keys 'models' and 'preset'")
        known = {f.name for f in fields(RunConfig)}
        check_known(overrides, known, label("train", where), listed=known - {"model", "preset"})
        config = training_preset(TRAINING_PRESET[self.preset], model)
        merged = {**config.to_dict(), **overrides}
        return RunConfig.from_dict(merged, where=where if where != "option" else "option --train")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_methods(methods: list[str], where: str) -> None:
    from xtl.explain import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise XtlError(f"{where}: unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(METHODS))}")


def preset_config(name: str) -> PipelineConfig:
    """The defaults of a pipeline preset.

    - `quick`: `make run`. EfficientNet-Lite0 and DINOv2 ViT-S/14 (offline weights) on a stratified
      4,500/500/1,000 subset at low resolution, frozen early blocks cached (xtl.config.preset), maps
      of 100 test images (Grad-CAM's of all 1,000, for the error claims), the first 64 scored on one common grid (CIFAR's 32 x 32) in 10 steps under the
      zero baseline, every signed map in three readings, with paired tests; fine-tuning seeds 0, 1 and 2
      (each claim's verdict per seed); no data randomisation. 58 minutes on a 2-core CPU (BENCHMARKS.md).
      (ROAD, the grid-sensitivity grids and data randomisation are the other presets' defaults.)
    - `paper`: the paper's experiment. AlexNet, ResNet-34 and ViT-B/16 (ImageNet-21k) from the hubs,
      the paper's split and hyperparameters; needs a GPU and network access for the weights.
    - `offline-full`: EfficientNet-Lite0 and DINOv2 ViT-S/14 with our recipe on the paper split.
    """
    if name == "quick":
        # the protocol of every preset on fewer images, under the zero baseline alone and without the
        # sensitivity grids: ROAD and the extra grids each cost about as much again as the zero baseline
        # on a 2-core CPU (BENCHMARKS.md), which the 10-minute budget does not hold
        # Grad-CAM, the cheapest method of both models (1.7 and 3.5 s per 100 maps on 2 cores,
        # BENCHMARKS.md), of all 1,000 test images: enough maps for the error claims
        # three fine-tuning seeds on one split: every verdict says which seeds it holds for
        return PipelineConfig(preset="quick", faithfulness_images=64, faithfulness_baseline=["zero"],
                              faithfulness_sensitivity_grids=[], explain_every_image=["gradcam"], seeds=[0, 1, 2])
    if name == "paper":
        return PipelineConfig(
            preset="paper", models=["alexnet", "resnet34", "vit_b16_in21k"], explain_methods=list(FULL_METHODS),
            explain_images=None, faithfulness_images=500, faithfulness_steps=10, data_randomisation=True,
            title="Explainable transfer learning: the paper's experiment",
        )
    if name == "offline-full":
        return PipelineConfig(
            preset="offline-full", train={"split": "paper"}, explain_methods=list(FULL_METHODS), explain_images=None,
            faithfulness_images=500, faithfulness_steps=10, data_randomisation=True,
        )
    RULES["preset"].check("preset", name, "option")
    raise AssertionError(name)  # every name in PRESETS has its defaults above


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML or TOML file, with a one-line error naming the file."""
    if not path.is_file():
        raise XtlError(f"config file {path} does not exist")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = read_yaml(path)
        else:
            raise XtlError(f"config file {path} must end in .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise XtlError(f"config file {path} cannot be parsed: {first_line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise XtlError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def load_config(path: Path | None = None, options: dict[str, Any] | None = None) -> PipelineConfig:
    """Preset defaults, then the file's keys, then the command line's (`options`, None = not given)."""
    file_values = read_config_file(path) if path is not None else {}
    where = str(path) if path is not None else "option"
    options = {k: v for k, v in (options or {}).items() if v is not None}
    check_known(file_values, (f.name for f in fields(PipelineConfig)), where)
    name = options.get("preset", file_values.get("preset", "quick"))
    RULES["preset"].check("preset", name, where if "preset" not in options else "option")
    config = preset_config(name)
    config = _merged(config, file_values)
    config.validate(where)
    config = _merged(config, options)
    config.validate("option")
    return config


def _merged(config: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """`values` over `config`; the mappings `train` and `per_model` merge key by key."""
    values = dict(values)
    if isinstance(values.get("train"), dict):
        values["train"] = {**config.train, **values["train"]}
    if isinstance(values.get("per_model"), dict):
        merged = {m: dict(v) for m, v in config.per_model.items()}
        for model, overrides in values["per_model"].items():
            merged[model] = {**merged.get(model, {}), **overrides} if isinstance(overrides, dict) else overrides
        values["per_model"] = merged
    return replace_unchecked(config, values)


def replace_unchecked(config: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """`dataclasses.replace` without running checks: wrong types are reported by `validate` with their source."""
    result = replace(config)
    result.__dict__.update(values)
    return result


def parse_assignments(items: list[str], option: str) -> dict[str, Any]:
    """`KEY=VALUE` strings (values read as YAML) as a mapping; `MODEL.KEY=VALUE` nests under MODEL."""
    from xtl.io import parse_yaml_scalar

    result: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise XtlError(f"option {option} takes KEY=VALUE, not '{item}'")
        value = parse_yaml_scalar(text, f"option {option}")
        head, dot, tail = key.strip().rpartition(".")
        if dot:
            result.setdefault(head, {})[tail] = value
        else:
            result[key.strip()] = value
    return result


def dump(config: PipelineConfig) -> str:
    from xtl.io import dump_yaml

    return dump_yaml(config.to_dict())
