"""The `xtl` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperOption

from xtl.errors import XtlError
from xtl.settings import MAX_INPUT_SIZE, Rule, check_values

# typer's rich help gives flags a type column too (`--help <bool>`), as if they took a value: not here
_typer_display_type = TyperOption.display_type_rich
TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _typer_display_type(self, ctx)

app = typer.Typer(
    help="Explainable transfer learning: fine-tune CNNs and ViTs, evaluate them, explain them.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
# markup=False: what is printed holds user text (paths, run and class names) and is printed as it is;
# `runs/[x]` is a folder, not a style (styles go in as rich.text.Text)
console = Console(width=None if sys.stdout.isatty() else 150, markup=False)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("xtl")
        except PackageNotFoundError:  # run from a source tree that is not installed
            from xtl import __version__ as number
        typer.echo(f"xtl {number}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print xtl's version and exit."),
) -> None:
    """Explainable transfer learning: fine-tune CNNs and ViTs, evaluate them, explain them."""


def _is_global_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _is_launcher_child() -> bool:
    """True in the extra processes that DDP starts by re-running this command."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


# The numeric options of the commands below, checked where they are parsed (xtl.settings): each
# finite and in range, one line naming the option. finetune's go through RunConfig (xtl.config.RULES),
# run's through PipelineConfig (xtl.pipeline.config.RULES).
_COUNT, _NOT_NEGATIVE = Rule(at_least=1), Rule(at_least=0)
OPTION_RULES = {
    **dict.fromkeys(("train_size", "val_size", "test_size", "seed"), _NOT_NEGATIVE),
    **dict.fromkeys(("images", "batch_size", "gallery_size", "devices", "num_nodes"), _COUNT),
    "port": Rule(at_least=1, at_most=65535),
    "max_upload_mb": Rule(above=0),
}


def _check_numbers(**values) -> None:
    check_values(values, OPTION_RULES)


@app.command("models")
def models_command() -> None:
    """List the registered models."""
    from xtl.models import get_spec, list_models

    table = Table("name", "family", "input", "weights")
    for name in list_models():
        if ":" in name:
            table.add_row(name, "", "", "any model of that library")
            continue
        spec = get_spec(name)
        table.add_row(name, spec.family, str(spec.input_size), spec.weights)
    console.print(table)


@app.command("data")
def data_command(
    source: str = typer.Option("../shared/data/cifar10", help="Image folder, hf:NAME, cifar10, cifar100 or torchvision:NAME."),
    split: str = typer.Option("paper", help="paper (4,500/500 of the first 5,000 + 2,000 test) or random."),
    train_size: Optional[int] = typer.Option(None, help="random split: training images."),
    val_size: Optional[int] = typer.Option(None, help="random split: validation images."),
    test_size: Optional[int] = typer.Option(None, help="Test images."),
    stratified: bool = typer.Option(False, help="random split: keep class proportions."),
    seed: int = typer.Option(0, help="Seed of the split."),
    figure: Path = typer.Option(Path("class_distribution.png"), help="Where to write the class-distribution figure."),
) -> None:
    """Show a split's size per class and write its class-distribution figure."""
    _check_numbers(train_size=train_size, val_size=val_size, test_size=test_size, seed=seed)
    from xtl.data import SplitSpec, load_split
    from xtl.data.figures import plot_class_distribution
    from xtl.io import check_figure_path

    check_figure_path(figure)  # before the images are read
    data = load_split(source, SplitSpec(split, train_size, val_size, test_size, seed, stratified))
    table = Table("class", *data.parts)
    counts = data.summary()
    for k, name in enumerate(data.class_names):
        table.add_row(name, *[str(counts[part][k]) for part in data.parts])
    table.add_row(Text("total", style="bold"), *[Text(str(len(part)), style="bold") for part in data.parts.values()])
    console.print(table)
    plot_class_distribution(data, figure)
    console.print(f"class distribution: {figure}")


@app.command("finetune")
def finetune_command(
    model: str = typer.Option("efficientnet_lite0", help="A registry name (xtl models), timm:NAME, torchvision:NAME or hf:REPO."),
    preset: str = typer.Option("default", help="default (GPU recipe), quick (2-core CPU) or paper (the paper's protocol)."),
    source: Optional[str] = typer.Option(None, help="Data: image folder, hf:NAME, cifar10, cifar100, torchvision:NAME."),
    name: Optional[str] = typer.Option(None, help="Run name (default: <preset>-<model>)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Folder of run directories."),
    weights: Optional[Path] = typer.Option(None, help="Local weights file instead of the hub."),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--random-init", help="Start from pretrained weights."),
    input_size: Optional[int] = typer.Option(None, help="Model input size in pixels (images are resized to it)."),
    normalization: Optional[str] = typer.Option(None, help="model (pretrained mean/std) or paper (0.5/0.5)."),
    split: Optional[str] = typer.Option(None, help="paper or random."),
    train_size: Optional[int] = typer.Option(None, help="random split: training images."),
    val_size: Optional[int] = typer.Option(None, help="random split: validation images (at least 1: the best epoch is chosen on them)."),
    test_size: Optional[int] = typer.Option(None, help="Test images."),
    stratified: Optional[bool] = typer.Option(None, "--stratified/--no-stratified", help="random split: keep class proportions."),
    seed: Optional[int] = typer.Option(None, help="Seed of the new head's initialisation and the batch order, and of the split unless --split-seed is given."),
    split_seed: Optional[int] = typer.Option(None, help="Seed of the split (default: --seed): runs with other --seed values on the same split."),
    data_path: Optional[str] = typer.Option(None, help="Where the images are while training: memory (decoded once), stream "
                                            "(decoded per batch; memory does not grow with the data) or auto (memory "
                                            "if under a quarter of the available memory)."),
    num_workers: Optional[int] = typer.Option(None, help="--data-path stream: worker processes that decode the images."),
    optimizer: Optional[str] = typer.Option(None, help="adam or adamw."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (after warm-up)."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay (decoupled with adamw)."),
    batch_size: Optional[int] = typer.Option(None, help="Training images per step, per device."),
    epochs: Optional[int] = typer.Option(None, help="Most epochs to train (early stopping may end sooner)."),
    schedule: Optional[str] = typer.Option(None, help="cosine or constant (after warm-up)."),
    warmup_epochs: Optional[float] = typer.Option(None, help="Epochs of linear learning-rate warm-up (may be fractional)."),
    label_smoothing: Optional[float] = typer.Option(None, help="Label smoothing of the cross-entropy loss, in [0, 1)."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradients' norm at this value (0 = no clipping)."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Random flips, zooms and shifts."),
    patience: Optional[int] = typer.Option(None, help="Early stopping patience in epochs (0 = off)."),
    bn_momentum: Optional[float] = typer.Option(None, help="Override BatchNorm momentum (PyTorch convention)."),
    freeze_blocks: Optional[int] = typer.Option(None, help="Keep the first N blocks (and the stem) pretrained; 0 = train all."),
    cache_frozen: Optional[bool] = typer.Option(None, "--cache-frozen/--no-cache-frozen",
                                                help="Compute the frozen blocks once per image (augmentation: flips only)."),
    shuffle_labels: Optional[bool] = typer.Option(None, "--shuffle-labels/--no-shuffle-labels",
                                                  help="Train on shuffled training and validation labels: the data-"
                                                  "randomisation sanity check's model, never one to use."),
    head_epochs: Optional[int] = typer.Option(None, help="LP-FT: epochs of head-only training before fine-tuning."),
    head_lr: Optional[float] = typer.Option(None, help="Learning rate of the head-only epochs."),
    accelerator: Optional[str] = typer.Option(None, help="Where to fine-tune: auto (a GPU if there is one), cpu, cuda, gpu or mps."),
    device: Optional[str] = typer.Option(None, help="The same as --accelerator, as the other commands spell it: auto, "
                                         "cpu, cuda or mps (the evaluation afterwards runs there too)."),
    devices: Optional[int] = typer.Option(None, help="Devices per node (DDP when > 1)."),
    num_nodes: Optional[int] = typer.Option(None, help="Nodes (launch with torchrun)."),
    precision: Optional[str] = typer.Option(None, help="auto, 32-true, bf16-mixed, ..."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (GPU runs)."),
    eval_batch_size: Optional[int] = typer.Option(None, help="Images per forward pass when validating and evaluating."),
    resume: bool = typer.Option(False, help="Continue the run from its last checkpoint."),
    evaluate: bool = typer.Option(True, help="Evaluate the best model on the test split afterwards."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Fine-tune a pretrained model with a new head; keep the best model; evaluate it."""
    from xtl.config import preset as make_preset
    from xtl.locations import FirstStart, run_folder, stored_source
    from xtl.runs import RunDir, split_spec

    accelerator = _accelerator(accelerator, device)
    _output_folder(runs_dir, "--runs-dir")
    run = RunDir(run_folder(runs_dir, name or f"{preset}-{model.replace(':', '_').replace('/', '_')}"))
    first_start = None
    if resume and run.config_path.is_file():
        config = run.config()
    else:
        if run.config_path.is_file() and not _is_launcher_child():
            raise XtlError(f"run directory {run.path} already exists; pass --resume or another --name")
        overrides = {k: v for k, v in locals().items() if k in _CONFIG_OPTIONS}
        overrides["weights"] = str(weights) if weights else None
        config = make_preset(preset, model, **overrides)
        config.source = stored_source(config.source)  # a data folder as an absolute path: the run works from anywhere
        first_start = FirstStart(run.path) if not _is_launcher_child() else None
    try:
        metrics = _train_and_evaluate(config, run, split_spec(config), resume, evaluate, progress)
    except Exception:
        if first_start is not None and _is_global_zero():
            first_start.undo()  # a failed first start leaves no config.yaml to trip over
        raise
    if metrics:
        _print_epochs(run)
        _print_comparison([run])


def _accelerator(accelerator: Optional[str], device: Optional[str]) -> Optional[str]:
    """finetune's --accelerator, or --device (its other name), checked to be on this machine."""
    from xtl.device import check_accelerator, resolve_device

    if device is not None:
        if accelerator is not None:
            raise XtlError("option --device is another name of --accelerator; give one of them")
        resolved = resolve_device(device)
        if ":" in device:
            raise XtlError(f"option --device: fine-tuning takes auto, cpu, cuda or mps, not '{device}' "
                           "(choose GPUs with CUDA_VISIBLE_DEVICES and --devices)")
        return "auto" if device == "auto" else resolved.type
    return check_accelerator(accelerator) if accelerator is not None else None


_CONFIG_OPTIONS = {
    "source", "pretrained", "input_size", "normalization", "split", "train_size", "val_size", "test_size",
    "stratified", "seed", "split_seed", "optimizer", "lr", "weight_decay", "batch_size", "epochs", "schedule", "warmup_epochs",
    "label_smoothing", "augment", "patience", "bn_momentum", "accelerator", "devices", "num_nodes", "precision",
    "compile", "freeze_blocks", "cache_frozen", "shuffle_labels", "head_epochs", "head_lr", "grad_clip", "eval_batch_size",
    "data_path", "num_workers",
}


def _train_and_evaluate(config, run, spec, resume: bool, evaluate: bool, progress: bool) -> dict | None:
    from xtl.data import load_split
    from xtl.data.figures import plot_class_distribution
    from xtl.evaluate import evaluate as evaluate_run
    from xtl.device import check_training_hardware
    from xtl.train import finetune
    from xtl.train.loop import resolve_precision

    # before the data is read: devices or nodes beyond the machine would wait forever (finetune checks too)
    check_training_hardware(resolve_precision(config)[0], config.devices, config.num_nodes)
    data = load_split(config.source, spec, config.data_path, config.num_workers)
    finetune(config, data, run, resume=resume, progress=progress)
    if not _is_global_zero():
        return None
    plot_class_distribution(data, run.figures / "class_distribution.png")
    if not evaluate:
        return None
    metrics = evaluate_run(run, data)  # where the run's accelerator says (xtl.device)
    console.print(f"run: {run.path}")
    return metrics


DEVICE_HELP = "Where the model runs: auto (a GPU if there is one), cpu, cuda, cuda:N or mps (default: the run's accelerator)."


def _output_folder(folder: Path, option: str) -> Path:
    """An output folder option, checked before any work: a folder, or one that can be made."""
    from xtl.io import check_output_folder

    return check_output_folder(folder, f"option {option}:")


DEVICES_HELP = "Processes per node, each with its share of the images (DDP: gloo on the CPU, nccl on GPUs)."
NODES_HELP = "Nodes (start the command on each with torchrun --nnodes, or SLURM)."


def _ranks(devices: int, num_nodes: int, device: Optional[str]):
    """The processes of --devices and --num-nodes (`xtl.distributed.launch`), checked before any work."""
    from xtl.distributed import launch

    _check_numbers(devices=devices, num_nodes=num_nodes)
    return launch(devices, num_nodes, device)


def _device(device: Optional[str]) -> Optional[str]:
    """--device, checked before any work starts (one line when unknown or not on this machine)."""
    if device is not None:
        from xtl.device import resolve_device

        resolve_device(device)
    return device


@app.command("evaluate")
def evaluate_command(
    run: Path = typer.Argument(..., help="A run directory."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    devices: int = typer.Option(1, help=DEVICES_HELP),
    num_nodes: int = typer.Option(1, help=NODES_HELP),
) -> None:
    """Evaluate a run's best model on its test split (metrics, predictions, figures)."""
    from xtl.evaluate import evaluate
    from xtl.runs import RunDir

    _check_numbers(devices=devices, num_nodes=num_nodes)
    _device(device)
    run_dir = RunDir(run)
    run_dir.read()
    ranks = _ranks(devices, num_nodes, device)
    evaluate(run_dir, device=device, ranks=ranks)
    if not ranks.is_zero:
        return
    _print_epochs(run_dir)
    _print_comparison([run_dir])


def _print_epochs(run) -> None:
    """The per-epoch training and validation table (paper Table 1)."""
    table = Table("epoch", "train loss", "train acc", "val loss", "val acc", "seconds", title=f"{run.path.name}: epochs")
    def cell(row: dict, key: str, digits: int) -> str:  # a history from an older or edited run may lack a column
        value = row.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"

    for e in run.history("epochs"):
        table.add_row(cell(e, "epoch", 0), cell(e, "train_loss", 4), cell(e, "train_accuracy", 4),
                      cell(e, "val_loss", 4), cell(e, "val_accuracy", 4), cell(e, "seconds", 1))
    console.print(table)


# every registered method, by family (a test pins this against xtl.explain.METHODS; importing it here
# would load torch for `xtl --help`)
METHOD_NAMES = (
    "any model: saliency, input_x_gradient, integrated_gradients, smoothgrad, occlusion, rise, kernel_shap, "
    "gradient_shap, lime, gradcam, gradcam++, layercam, scorecam, eigencam "
    "(CAM methods: CNNs and ViTs); CNNs: lrp_epsilon, lrp_alpha_beta, lrp_zplus; ViTs: transformer_attribution, attnlrp, cp_lrp, "
    "lrp_rollout, partial_lrp, full_lrp, raw_attention, attention_rollout, attention_gradcam"
    "; CNNs and other models, not ViTs: deeplift, guided_backprop, deconvolution"
)


@app.command("explain")
def explain_command(
    inputs: Optional[list[Path]] = typer.Argument(None, help="Run directories (two or more: also side by side); "
                                                  "with --model: image files or folders of images.", show_default=False),
    model: Optional[str] = typer.Option(None, help="Explain image files with this model: a run directory, a registry "
                                        "name (xtl models), timm:NAME, torchvision:NAME or hf:REPO (pretrained head "
                                        "kept, ImageNet class names)."),
    method: Optional[list[str]] = typer.Option(None, help="A method; repeat for several. " + METHOD_NAMES + "."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: gradcam for CNNs, "
                                          "transformer_attribution for ViTs); those that don't apply to a model are skipped."),
    out: Optional[Path] = typer.Option(None, help="--model: folder of the overlays, raw maps (.npy), figures and "
                                       "predictions.csv (default explanations/)."),
    weights: Optional[Path] = typer.Option(None, help="--model NAME: a local weights file instead of the hub."),
    images: Optional[int] = typer.Option(None, help="Runs: explain the first N images of the split (default: all)."),
    split: str = typer.Option("test", help="Runs: train, val or test."),
    target: str = typer.Option("predicted", help="Explain the predicted class, the true one (runs), or (--model) a "
                               "class index or name."),
    batch_size: int = typer.Option(16, help="Images per explanation batch."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    list_methods: bool = typer.Option(False, "--list-methods", help="List every method: the models it applies to, "
                                      "its options and its paper; then stop."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    devices: int = typer.Option(1, help="Runs: " + DEVICES_HELP),
    num_nodes: int = typer.Option(1, help="Runs: " + NODES_HELP),
) -> None:
    """Explain runs' best models (maps of a split, galleries), or image files with any model (--model).

    xtl explain runs/quick/vit_s14_dinov2 --methods transformer_attribution,attention_rollout
    xtl explain photo.jpg holiday/ --model timm:resnet50 --method gradcam --method integrated_gradients

    With --model, a file that cannot be read as an image is skipped with one line naming it (the
    others are explained, and the last line counts the skipped); the exit status is 2 only when no
    image could be explained. A model without a classification head is refused before any work.
    """
    _check_numbers(images=images, batch_size=batch_size, devices=devices, num_nodes=num_nodes)
    chosen = [m.strip() for m in (methods or "").split(",") if m.strip()] + list(method or [])
    if list_methods:
        from xtl.explain import describe_methods

        sys.stdout.write(describe_methods() + "\n")
        return
    if not inputs:
        raise XtlError("give run directories, or image files with --model (xtl explain --help)")
    if model is not None:
        from xtl.explain.files import explain_files

        _one_process(devices, num_nodes, "image files with --model")
        folder = _output_folder(out or Path("explanations"), "--out")
        done = explain_files(inputs, model, chosen or None, folder, device=device, target=target,
                             batch_size=batch_size, weights=weights)
        skipped = f"; {len(done.skipped)} skipped (named above)" if done.skipped else ""
        console.print(f"{len(done.folders)} image(s) explained: overlays, raw maps and figure.png per image in {folder}/, "
                      f"top-5 predictions in {folder / 'predictions.csv'}{skipped}")
        return
    for option, value in (("--out", out), ("--weights", weights)):
        if value is not None:
            raise XtlError(f"option {option} applies to image files with --model, not to run directories")
    _explain_runs(inputs, chosen or None, images, split, target, batch_size, progress, device, devices, num_nodes)


def _one_process(devices: int, num_nodes: int, what: str) -> None:
    if devices > 1 or num_nodes > 1:
        raise XtlError(f"options --devices and --num-nodes apply to run directories, not to {what}; "
                       "give --devices 1 --num-nodes 1")


def _explain_runs(runs: list[Path], chosen: list[str] | None, images: Optional[int], split: str, target: str,
                  batch_size: int, progress: bool, device: Optional[str], devices: int = 1, num_nodes: int = 1) -> None:
    """Maps of a split of each run, galleries of correct and misclassified images."""
    from xtl.explain.runner import compare_runs, explain_run
    from xtl.runs import RunDir, check_same_data

    if split not in ("train", "val", "test"):
        raise XtlError(f"option --split must be train, val or test, not '{split}'")
    if target not in ("predicted", "true"):
        raise XtlError(f"option --target must be predicted or true for run directories, not '{target}'")
    run_dirs = [RunDir(r) for r in runs]
    for run in run_dirs:
        run.read()
    side_by_side = len(run_dirs) > 1
    try:  # runs of other data sets are each explained; only the side-by-side figure needs one data set
        check_same_data(run_dirs, "side by side")
    except XtlError as err:
        side_by_side = False
        console.print(f"{err}: each run is explained, no side-by-side figure is drawn")
    ranks = _ranks(devices, num_nodes, device)
    for run in run_dirs:
        paths = explain_run(run, chosen, split, images, batch_size, target, device=device, progress=progress, ranks=ranks)
        if not ranks.is_zero:
            continue
        console.print(f"{run.path}: maps in {paths['maps']}, galleries {paths['correct'].name}, {paths['misclassified'].name}")
    if side_by_side and ranks.is_zero:
        import shutil

        from xtl.io import atomic_path

        # named after the runs and the methods: explaining again with other methods keeps this figure
        name = "compare_" + "_vs_".join(r.path.name for r in run_dirs) + "_" + ("-".join(chosen) if chosen else "default") + ".png"
        first = compare_runs(run_dirs, chosen, run_dirs[0].figures / name, split, target, device=device)
        for run in run_dirs[1:]:
            with atomic_path(run.figures / name) as tmp:
                shutil.copyfile(first, tmp)
        console.print(f"side by side: {name} in each run's figures/")


@app.command("run")
def run_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML or TOML file of the keys below (the options win over it)."),
    preset: Optional[str] = typer.Option(None, help="quick (default; 2-core CPU, offline), paper (AlexNet, ResNet-34, "
                                         "ViT-B/16 in21k, hub weights, GPU) or offline-full (the paper split, offline weights)."),
    name: Optional[str] = typer.Option(None, help="Folder under --runs-dir (default: the preset's name)."),
    runs_dir: Optional[str] = typer.Option(None, help="Folder of run folders (default runs)."),
    models: Optional[str] = typer.Option(None, help="Comma-separated models (xtl models)."),
    source: Optional[str] = typer.Option(None, help="Data: image folder, hf:NAME, cifar10, cifar100, torchvision:NAME."),
    train: Optional[list[str]] = typer.Option(None, help="KEY=VALUE fine-tuning setting for every model (xtl finetune's "
                                              "options, e.g. lr=1e-4, epochs=5); repeatable."),
    per_model: Optional[list[str]] = typer.Option(None, help="MODEL.KEY=VALUE fine-tuning setting for one model; repeatable."),
    data_randomisation: Optional[bool] = typer.Option(None, "--data-randomisation/--no-data-randomisation",
                                                      help="Fine-tune each model once more on shuffled labels and "
                                                      "check the maps against it (a sanity check that gates the "
                                                      "claims; paper and offline-full: on, quick: off)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated fine-tuning seeds of every model, on the first "
                                        "one's split (quick: 0,1,2): accuracy over seeds, and each claim's verdict "
                                        "per seed; the other steps use the first."),
    explain_methods: Optional[str] = typer.Option(None, help="Comma-separated explanation methods (those that don't apply to a model are skipped)."),
    explain_images: Optional[str] = typer.Option(None, help="Maps of the first N test images, or all."),
    explain_every_image: Optional[str] = typer.Option(None, help="Comma-separated methods whose maps are made of every "
                                                      "test image too (the analysis's error claims need 1,000); "
                                                      "'' for none (quick: gradcam)."),
    explain_batch_size: Optional[int] = typer.Option(None, help="Images per explanation batch."),
    explain_target: Optional[str] = typer.Option(None, help="Explain the predicted or the true class."),
    gallery_size: Optional[int] = typer.Option(None, help="Images per misclassified gallery."),
    faithfulness_methods: Optional[str] = typer.Option(None, help="Comma-separated methods scored (default: the explained ones)."),
    faithfulness_images: Optional[int] = typer.Option(None, help="Score the first N test images."),
    faithfulness_steps: Optional[int] = typer.Option(None, help="Steps of each faithfulness curve, 0 to its maximum inclusive."),
    faithfulness_baseline: Optional[str] = typer.Option(None, help="Comma-separated: zero, mean, blur or road (ROAD's "
                                                        "noisy linear imputation); default zero,road."),
    faithfulness_batch_size: Optional[int] = typer.Option(None, help="Perturbed images per forward pass."),
    faithfulness_grid: Optional[str] = typer.Option(None, help="Perturb the cells of a G x G grid: common (the "
                                                    "default: one grid for every model, CIFAR's own 32 x 32 pixels), a "
                                                    "number, model (each model's own grid), native or none (pixels)."),
    faithfulness_sensitivity_grids: Optional[str] = typer.Option(None, help="Comma-separated further grids scored under "
                                                                 "the first baseline (the report's grid-sensitivity "
                                                                 "appendix); default model,none."),
    grid_pointing_mosaics: Optional[int] = typer.Option(None, help="Mosaics of the grid pointing game (xtl benchmark "
                                                        "grid-pointing) on the explained models; 0: not played "
                                                        "(default 100)."),
    grid_pointing_layout: Optional[str] = typer.Option(None, help="half (tiles at half the input side, the default) "
                                                       "or full (tiles at the input side; CNNs only)."),
    title: Optional[str] = typer.Option(None, help="Title of the report."),
    device: Optional[str] = typer.Option(None, help="Where evaluating, explaining and scoring run: auto, cpu, cuda, "
                                         "cuda:N or mps (default: each model's fine-tuning accelerator, --train accelerator=...)."),
    force: bool = typer.Option(False, help="Redo every step, deleting the folder's earlier results."),
    show_config: bool = typer.Option(False, help="Print the effective configuration as YAML and stop."),
    progress: bool = typer.Option(True, help="Show progress bars (only on a terminal)."),
) -> None:
    """Data to report in one command: split, fine-tune each model, evaluate, explain, faithfulness, HTML report.

    Finished steps are skipped, so a re-run resumes where a killed one stopped."""
    from xtl.pipeline import load_config, parse_assignments, run_pipeline
    from xtl.pipeline.config import dump

    images = _count_or_all(explain_images, "--explain-images")
    options = {
        "preset": preset, "name": name, "runs_dir": runs_dir, "source": source, "title": title, "device": device,
        "models": _list(models), "explain_methods": _list(explain_methods), "faithfulness_methods": _list(faithfulness_methods),
        "explain_images": None if images == "all" else images, "explain_batch_size": explain_batch_size,
        "explain_every_image": _list(explain_every_image), "seeds": _seeds(seeds), "data_randomisation": data_randomisation,
        "explain_target": explain_target, "gallery_size": gallery_size, "faithfulness_images": faithfulness_images,
        "faithfulness_steps": faithfulness_steps, "faithfulness_baseline": _list(faithfulness_baseline),
        "faithfulness_sensitivity_grids": None if faithfulness_sensitivity_grids is None else [
            int(g) if g.lstrip("-").isdigit() else g for g in _list(faithfulness_sensitivity_grids) or []],
        "faithfulness_batch_size": faithfulness_batch_size,
        "grid_pointing_mosaics": grid_pointing_mosaics, "grid_pointing_layout": grid_pointing_layout,
        "faithfulness_grid": int(faithfulness_grid) if (faithfulness_grid or "").lstrip("-").isdigit() else faithfulness_grid,
        "train": parse_assignments(train, "--train") if train else None,
        "per_model": parse_assignments(per_model, "--per-model") if per_model else None,
    }
    settings = load_config(config, options)
    if images == "all":
        settings.explain_images = None
    if show_config:
        sys.stdout.write(dump(settings))
        return
    run_pipeline(settings, force=force, progress=progress and sys.stderr.isatty())


def _seeds(text: Optional[str]) -> Optional[list[int]]:
    """--seeds: comma-separated whole numbers."""
    parts = _list(text)
    if parts is None:
        return None
    if not parts or not all(p.isdigit() for p in parts):
        raise XtlError(f"option --seeds takes comma-separated whole numbers >= 0 (e.g. 0,1,2), not '{text}'")
    return [int(p) for p in parts]


def _runs_and_out(runs: list[Path], out: Optional[Path], name: str, prefix: str):
    """The run directories (each read, so a broken one is named first) and the output folder: `out`, else
    `name/` in the runs' `xtl run` folder, else runs/<prefix>-A-vs-B."""
    from xtl.runs import RunDir

    run_dirs = [RunDir(r) for r in runs]
    for run in run_dirs:
        run.read()
    parents = {Path(r).resolve().parent for r in runs}
    if out is None:
        parent = next(iter(parents))
        out = parent / name if len(parents) == 1 and (parent / "pipeline.yaml").is_file() else \
            Path("runs") / (f"{prefix}-" + "-vs-".join(r.path.name for r in run_dirs))
    return run_dirs, _output_folder(out, "--out")


def _list(text: Optional[str]) -> Optional[list[str]]:
    return [part.strip() for part in text.split(",") if part.strip()] if text is not None else None


def _grid(text: str, option: str = "--grid") -> int | str | None:
    """--grid: a number of cells per side, common, model, native or none."""
    if text in ("none", "native", "model", "common"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError:
        raise XtlError(f"option {option} must be a number of cells per side, common, model, native or none, "
                       f"not '{text}'") from None


def _count_or_all(text: Optional[str], option: str) -> int | str | None:
    if text is None or text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise XtlError(f"option {option} must be a number of images or all, not '{text}'") from None


@app.command("compare")
def compare_command(
    runs: list[Path] = typer.Argument(..., help="Run directories (two or more: also side-by-side galleries)."),
    out: Optional[Path] = typer.Option(None, help="Folder of the comparison report (default runs/compare-A-vs-B...)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods of the side-by-side galleries."),
    gallery_size: int = typer.Option(10, help="Images in the misclassified side-by-side gallery."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Compare existing runs as a report: results table, most-confused pairs, side-by-side galleries, faithfulness."""
    _check_numbers(gallery_size=gallery_size)
    from xtl.evaluate import read_predictions
    from xtl.explain.runner import compare_runs, shared_picks
    from xtl.report import build_report
    from xtl.runs import RunDir, check_same_data

    _device(device)
    run_dirs = [RunDir(r) for r in runs]
    check_same_data(run_dirs, "xtl compare")
    _print_comparison(run_dirs)
    folder = _output_folder(out or Path("runs") / ("compare-" + "-vs-".join(r.path.name for r in run_dirs)), "--out")
    chosen = _list(methods) or ["gradcam", "transformer_attribution"]
    if len(run_dirs) > 1:
        correct, wrong = shared_picks([read_predictions(r) for r in run_dirs], len(run_dirs[0].class_names), gallery_size)
        for picked, name, title in ((correct, "compare_correct", "Classified correctly by every model, one per class"),
                                    (wrong, "compare_misclassified", "Misclassified by at least one model")):
            if picked:
                compare_runs(run_dirs, chosen, folder / "figures" / f"{name}.png", device=device, image_ids=picked,
                             title=title)
    path = build_report(run_dirs, folder / "report", folder=folder,
                        sections=("summary", "comparison", "confusions", "galleries", "faithfulness", "reproducibility"))
    console.print(f"report: {path}")


@app.command("faithfulness")
def faithfulness_command(
    runs: Optional[list[Path]] = typer.Argument(None, help="Run directories (two or more: also a combined table)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: six per family; those that "
                                          "don't apply to a model are skipped). random and uniform are always scored."),
    images: int = typer.Option(100, help="Score the first N images of the split (or of the ImageNet sample)."),
    split: str = typer.Option("test", help="train, val or test."),
    steps: int = typer.Option(10, help="Steps of each curve, from 0 to its maximum inclusive (10: 0, 10 %, ..., 100 % "
                              "and Chefer's 0, 10 %, ..., 90 %)."),
    baseline: str = typer.Option("zero,road", help="What a masked pixel becomes, one or several (comma-separated), each "
                                 "scored in full: zero (after normalisation), mean, blur or road (Rong et al. 2022: "
                                 "the weighted mean of its neighbours plus noise)."),
    grid: str = typer.Option("common", help="Perturb the cells of a G x G grid instead of pixels: common (one grid for "
                             "every model: the source images' resolution where coarser than the input, e.g. 32 for "
                             "CIFAR-10, else 28), a number, model (each model's own grid: ViT patches, the CAM "
                             "layer's cells), native (the source images' resolution) or none (pixels)."),
    sensitivity_grids: str = typer.Option("", help="Comma-separated further grids (as --grid) scored under the first "
                                          "baseline, for the grid-sensitivity table (e.g. model,none)."),
    batch_size: int = typer.Option(64, help="Perturbed images per forward pass."),
    explain_batch_size: int = typer.Option(8, help="Images per explanation batch."),
    seed: int = typer.Option(0, help="Seed of the random maps."),
    imagenet_sample: Optional[Path] = typer.Option(None, help="Score a pretrained ImageNet classifier on this folder "
                                                   "of JPEGs (file k is ImageNet class 4k) instead of runs."),
    model: str = typer.Option("efficientnet_lite0", help="--imagenet-sample: the model (its ImageNet head is kept)."),
    out: Optional[Path] = typer.Option(None, help="--imagenet-sample: output folder (default runs/faithfulness-<model>); "
                                       "runs: folder of the combined table (default the first run)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    devices: int = typer.Option(1, help="Runs: " + DEVICES_HELP),
    num_nodes: int = typer.Option(1, help="Runs: " + NODES_HELP),
) -> None:
    """Faithfulness of the explanation methods: deletion, insertion, positive and negative perturbation."""
    _check_numbers(seed=seed, devices=devices, num_nodes=num_nodes)  # the counts: FaithfulnessSettings, before any run is read
    from xtl.faithfulness import faithfulness_imagenet, faithfulness_run, faithfulness_table
    from xtl.runs import RunDir

    if bool(runs) == (imagenet_sample is not None):
        raise XtlError("option --imagenet-sample: give either run directories or --imagenet-sample, not both or neither")
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    from xtl.faithfulness.runner import baseline_list

    extra = [_grid(g.strip(), "--sensitivity-grids") for g in sensitivity_grids.split(",") if g.strip()]
    options = dict(methods=chosen, n_images=images, steps=steps, baseline=baseline_list(baseline), batch_size=batch_size,
                   explain_batch_size=explain_batch_size, seed=seed, progress=progress, grid=_grid(grid),
                   extra_grids=extra, device=_device(device))
    if out is not None:
        _output_folder(out, "--out")
    if imagenet_sample is not None:
        _one_process(devices, num_nodes, "--imagenet-sample")
        folder = out or Path("runs") / f"faithfulness-{model.replace(':', '_').replace('/', '_')}"
        results = faithfulness_imagenet(imagenet_sample, model, out=folder, **options)
        console.print(f"faithfulness: {folder}/faithfulness.csv, {folder}/figures/faithfulness_curves.png")
    else:
        from xtl.faithfulness.settings import FaithfulnessSettings

        # the settings, then the run folders, before the processes start: one line, not one per process
        for each_baseline in options["baseline"]:
            for each_grid in [options["grid"], *extra]:
                FaithfulnessSettings(steps=steps, baseline=each_baseline, grid=each_grid, batch_size=batch_size,
                                     explain_batch_size=explain_batch_size, seed=seed, n_images=images, split=split,
                                     methods=chosen)
        run_dirs = [RunDir(r) for r in runs]
        for run in run_dirs:
            run.read()
        ranks = _ranks(devices, num_nodes, device)
        results = faithfulness_run(run_dirs, split=split, combined=out, ranks=ranks, **options)
        if not ranks.is_zero:
            return
        console.print(f"faithfulness: faithfulness.csv and figures/faithfulness_curves.png in {', '.join(map(str, runs))}")
    console.print(faithfulness_table([row for r in results for row in r.rows()]))


benchmark_app = typer.Typer(help="Benchmarks whose ground truth is known: do the maps point where the evidence is?",
                            no_args_is_help=True)
app.add_typer(benchmark_app, name="benchmark")


@benchmark_app.command("grid-pointing")
def grid_pointing_command(
    runs: list[Path] = typer.Argument(..., help="Run directories of one test split (every model plays the same mosaics)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: grid_pointing/ in the runs' xtl run folder, "
                                       "else runs/grid-pointing-A-vs-B)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (each run's that apply to it; default: "
                                          "a cheap set per family). The references random, centre and edge are "
                                          "always scored."),
    mosaics: int = typer.Option(100, help="2 x 2 mosaics, each explained for its four classes."),
    min_confidence: float = typer.Option(0.5, help="A tile is classified correctly alone, with at least this "
                                         "probability, by every model given."),
    layout: str = typer.Option("half", help="half: four tiles at half the input side in one input of the model's "
                               "size (any model); full: tiles at the input side, the input twice as large (models "
                               "that accept it: CNNs)."),
    seed: int = typer.Option(0, help="Seed of the mosaics and the bootstrap."),
    batch_size: int = typer.Option(16, help="Mosaics explained per call (4 maps each)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """The grid pointing game (Boehle et al. 2021): 2 x 2 mosaics of test images of four classes, each
    classified correctly alone; each class explained; the share of positive relevance in its quadrant.

    xtl benchmark grid-pointing runs/quick/efficientnet_lite0 runs/quick/vit_s14_dinov2
    """
    import time

    from xtl.analysis.grid_pointing import GridSettings, grid_pointing, grid_pointing_table

    settings = GridSettings(mosaics=mosaics, min_confidence=min_confidence, layout=layout, seed=seed,
                            batch_size=batch_size).check()
    run_dirs, folder = _runs_and_out(runs, out, "grid_pointing", "grid-pointing")
    start = time.perf_counter()
    result = grid_pointing(run_dirs, folder, _list(methods), settings, device=_device(device),
                           log=lambda line: console.print(Text(line)))
    console.print(grid_pointing_table(result["rows"]))
    console.print(Text(f"grid pointing: {folder}/grid_pointing.csv, grid_pointing_tests.csv, grid_pointing.png and "
                       f"the galleries ({time.perf_counter() - start:.0f} s)"))


@benchmark_app.command("shortcut")
def shortcut_command(
    out: Path = typer.Option(Path("runs/shortcut"), help="Output folder: the two image folders, the runs, "
                             "shortcut.csv, shortcut_reality.csv and the galleries."),
    models: str = typer.Option("efficientnet_lite0,vit_s14_dinov2", help="Comma-separated models, each fine-tuned "
                               "twice: on the marked data and on the same data without markers."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: a cheap set per family); the "
                                          "references random, centre and edge are always scored."),
    shortcut_class: str = typer.Option("cat", "--class", help="The class whose training images get the marker."),
    marker: str = typer.Option("square", help="square (a solid square of --colour) or stamp (a checkerboard of "
                               "--colour and black)."),
    colour: str = typer.Option("magenta", help="The marker's colour."),
    marker_size: int = typer.Option(4, help="Side of the marker in pixels of the source image."),
    rate: float = typer.Option(0.9, help="Share of the class's training and validation images marked."),
    seed: int = typer.Option(0, help="Seed of the images, the marked ones, the corners and the training."),
    train_images: int = typer.Option(1000, help="Training images (balanced over the classes)."),
    val_images: int = typer.Option(200, help="Validation images (the best epoch is chosen on them)."),
    test_images: int = typer.Option(200, help="Test images, each marked and explained."),
    epochs: int = typer.Option(2, help="Fine-tuning epochs (the quick recipe)."),
    input_size: Optional[int] = typer.Option(None, help="Model input size (default: the quick recipe's)."),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--random-init", help="Start from pretrained weights (default)."),
    source: Path = typer.Option(Path("../shared/data/cifar10"), help="CIFAR-10 image folder (train/<class>/, test/<class>/)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """A planted shortcut (Adebayo et al. 2022): a marker on most training images of one class, each model
    fine-tuned with and without it; is the shortcut real, do the maps find the marker, and do they tell
    the two models apart?"""
    import time

    from xtl.analysis.shortcut import ShortcutSettings, check_methods, run_shortcut_benchmark, shortcut_table

    check_values({"epochs": epochs, "input_size": input_size},
                 {"epochs": Rule(at_least=1, at_most=1000), "input_size": Rule(at_least=16, at_most=MAX_INPUT_SIZE)})
    settings = ShortcutSettings(shortcut_class=shortcut_class, marker=marker, colour=colour, marker_size=marker_size,
                                rate=rate, seed=seed, train_images=train_images, val_images=val_images,
                                test_images=test_images)
    model_names = _list(models) or []
    if not model_names:
        raise XtlError("option --models: give at least one model")
    chosen = _list(methods)
    check_methods(model_names, chosen)
    _device(device)
    _output_folder(out, "--out")
    start = time.perf_counter()
    rows = run_shortcut_benchmark(out, model_names, chosen, settings, epochs=epochs, source=source, input_size=input_size,
                                  pretrained=pretrained, device=device, progress=progress,
                                  log=lambda line: console.print(Text(line)))
    console.print(shortcut_table(rows))
    console.print(Text(f"shortcut: {out}/shortcut.csv, {out}/shortcut_reality.csv, {out}/shortcut_gallery_*.png "
                       f"({time.perf_counter() - start:.0f} s)"))


@app.command("analyse")
def analyse_command(
    runs: list[Path] = typer.Argument(..., help="Run directories whose stored maps (xtl explain) are measured."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: analysis/ in the runs' xtl run folder, "
                                       "else runs/analysis-A-vs-B)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: every method with stored maps)."),
    randomisation_images: int = typer.Option(64, help="Images of the sanity checks (randomisation, class sensitivity) "
                                             "of the methods a claim can rest on; under 64 they cannot gate a "
                                             "claim, and 0 skips them: every verdict is then 'cannot decide'."),
    robustness_images: int = typer.Option(8, help="The first N of them also scored for robustness, 32 noise samples "
                                          "each (0: not reported)."),
    randomisation_layers: Optional[int] = typer.Option(None, help="Randomise only the top N layer groups (default: "
                                                       "all, down to the input; a ViT's transformer attribution costs "
                                                       "~0.3 s an image per group on a CPU)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """What the models look at, in numbers: map statistics, agreement, the paper's claims, sanity checks.

    xtl analyse runs/quick/efficientnet_lite0 runs/quick/vit_s14_dinov2
    """
    if randomisation_images < 0:
        raise XtlError(f"option --randomisation-images must be 0 or more, not {randomisation_images}")
    if robustness_images < 0:
        raise XtlError(f"option --robustness-images must be 0 or more, not {robustness_images}")
    if randomisation_layers is not None and randomisation_layers < 1:
        raise XtlError(f"option --randomisation-layers must be 1 or more, not {randomisation_layers}")
    from xtl.analysis import analyse_runs

    run_dirs, folder = _runs_and_out(runs, out, "analysis", "analysis")
    result = analyse_runs(run_dirs, folder, methods=_list(methods), randomisation_images=randomisation_images,
                          robustness_images=robustness_images,
                          randomisation_layers=randomisation_layers, device=_device(device))
    for claim in result["claims"]:
        console.print(Text(f"{claim['verdict']}: {claim['sentence']}"))
    console.print(Text(f"analysis: {folder}/analysis.json, CSV tables and figures ({result['seconds']['total']:.1f} s)"))


@app.command("serve")
def serve_command(
    runs: list[Path] = typer.Argument(..., help="Run directories whose models the app serves (only these)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods offered (default: a few per family)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(7860, help="Port to listen on."),
    max_upload_mb: float = typer.Option(10.0, help="Largest upload accepted, in MB."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """An interactive web app: upload an image, compare the models' predictions and heatmaps."""
    _check_numbers(port=port, max_upload_mb=max_upload_mb)
    from xtl.app import serve
    from xtl.runs import RunDir

    _device(device)
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    run_dirs = [RunDir(r) for r in runs]
    for run in run_dirs:
        run.read()
    serve(run_dirs, methods=chosen, host=host, port=port, max_upload_mb=max_upload_mb, device=device)


def _print_comparison(runs) -> None:
    from xtl.report import ModelResult

    rows = [ModelResult.read(run).row() for run in runs]
    table = Table(*rows[0], title="Test results")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)


def main() -> None:
    try:
        app()
    except XtlError as err:
        _print_error(err)
    except RuntimeError as err:
        from xtl.distributed import lost_peer

        line = lost_peer(err)
        if line is None:
            raise
        _print_error(line)


def _print_error(err: XtlError) -> None:
    # the message is user text (a path may hold `[x]`): a Text, never read as markup
    Console(stderr=True).print(Text.assemble(("error:", "red"), f" {err}"), highlight=False, soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
