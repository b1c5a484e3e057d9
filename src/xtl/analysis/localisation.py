"""Localisation with known ground truth: do the maps point at the object?

A generated, seeded benchmark (`generate`): a CIFAR-10 object, resized to a random side (24 to 40
px by default), is pasted at a random place on a larger canvas (64 x 64). The label is the pasted
object's class; the ground-truth mask is the pasted square (a hard box: the object's own CIFAR
background inside the square counts as object; CIFAR has no segmentation to do better). The
canvas behind it is, by an even draw per image, either another CIFAR image of another class,
upscaled to the canvas, or a procedural texture (smoothed colour noise or stripes). A background
image is never of the object's class, so a background says nothing about the label beyond ruling
that one class out (a classifier of backgrounds alone is right at most 1 time in 9 on the CIFAR
half and 1 in 10 on the texture half): a model must look at the object.

`run_benchmark` writes the canvases as an image folder (train/ and test/ `<class>/*.png`, the test
masks in `masks.npz`), fine-tunes each model on it through the ordinary path (`xtl.train.finetune`
with the `quick` recipe, `xtl.evaluate.evaluate`), explains the true class of each test image with
each method and scores every map against the mask with the pointing game and relevance-mass and
relevance-rank accuracy (Arras et al. 2022; `xtl.analysis.metrics`), each with a percentile
bootstrap 95 % interval over the images. Two reference maps are scored the same way: `random`
(uniform noise) and `centre` (a Gaussian at the canvas centre). `xtl localisation` is the command.

Maps are compared with the mask on the canvas grid: a map finer than the canvas (gradients at the
model's input size) is area-averaged down to it, a coarser one (a CAM grid, a ViT's patch grid) is
upsampled bilinearly. Signed methods keep their positive part (Arras et al. score positive
relevance only).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xtl.errors import XtlError
from xtl.settings import MAX_CANVAS, Rule, check_values

CSV_NAME = "localisation.csv"
FIGURE_NAME = "localisation.png"
REFERENCE_METHODS = ("random", "centre")
METRICS = ("pointing_game", "relevance_mass", "relevance_rank")
# cheap methods per family, scored by default (every other registered one may be named)
DEFAULT_METHODS = {
    "cnn": ("gradcam", "saliency", "input_x_gradient", "integrated_gradients", "lrp_epsilon"),
    "vit": ("transformer_attribution", "attnlrp", "attention_rollout", "gradcam", "saliency", "input_x_gradient",
            "integrated_gradients"),
}
DEFAULT_MODELS = ("efficientnet_lite0", "vit_s14_dinov2")
# input sizes: the 64 px canvas upsampled 1.5x (a 3 x 3 Grad-CAM grid for EfficientNet-Lite0, 6 x 6 patches for
# ViT-S/14); the quick recipe's 128 and 112 px took minutes more on a 2-core CPU
DEFAULT_INPUT_SIZES = {"cnn": 96, "vit": 84}
# integrated gradients' steps here (its default is 32): the benchmark must stay a few minutes on a CPU
METHOD_OPTIONS = {"integrated_gradients": {"n_steps": 8}}

_COUNT = Rule(at_least=1)
RULES = {
    "canvas": Rule(at_least=16, at_most=MAX_CANVAS), "object_min": Rule(at_least=4), "object_max": Rule(at_least=4),
    "train_images": Rule(at_least=2), "val_images": _COUNT, "images": _COUNT, "seed": Rule(at_least=0),
    "texture_share": Rule(at_least=0, at_most=1),
}


@dataclass(frozen=True)
class BenchmarkSettings:
    """What the generated data set is; the same settings give the same images."""

    canvas: int = 64  # side of the square canvas, px
    object_min: int = 24  # side of the pasted object, px: drawn evenly in [object_min, object_max]
    object_max: int = 40
    train_images: int = 1000
    val_images: int = 200
    images: int = 100  # test canvases, each scored
    seed: int = 0
    texture_share: float = 0.5  # share of canvases with a procedural texture behind the object (else a CIFAR image)

    def __post_init__(self) -> None:
        check_values({k: v for k, v in asdict(self).items()}, RULES)
        if self.object_min > self.object_max:
            raise XtlError(f"option --object-min {self.object_min} must be <= --object-max {self.object_max}")
        if self.object_max > self.canvas:
            raise XtlError(f"option --object-max {self.object_max} must be <= --canvas {self.canvas} (the object "
                           "must fit on the canvas)")


@dataclass
class Canvases:
    """Generated images of one part: uint8 [N, H, W, 3], the object's mask [N, H, W] and what was drawn."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray  # the pasted object's class
    boxes: np.ndarray  # [N, 4]: top, left, side, side
    backgrounds: list[str] = field(default_factory=list)  # "texture:noise", "texture:stripes" or "cifar:<class>"
    objects: list[str] = field(default_factory=list)  # the object's source file, relative to the source folder


# ----------------------------------------------------------------------------- generation


def cifar_files(source: str | Path) -> tuple[list[str], dict[str, list[list[str]]]]:
    """Class names and, per partition (train, test), each class's image files (relative, sorted)."""
    root = Path(source)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise XtlError(f"option --source: {root} is not an image folder with train/<class>/ and test/<class>/")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise XtlError(f"option --source: {root}/train has {len(classes)} class folder(s); the benchmark needs 2 or more")
    files: dict[str, list[list[str]]] = {}
    for part in ("train", "test"):
        per_class = []
        for name in classes:
            folder = root / part / name
            names = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png")) \
                if folder.is_dir() else []
            if not names:
                raise XtlError(f"option --source: class folder {folder} has no images")
            per_class.append([f"{part}/{name}/{n}" for n in names])
        files[part] = per_class
    return classes, files


def _read(root: Path, key: str) -> np.ndarray:
    with Image.open(root / key) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _resize(pixels: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR), dtype=np.uint8)


def texture(rng: np.random.Generator, side: int) -> tuple[np.ndarray, str]:
    """A procedural background: smoothed colour noise or stripes of two random colours."""
    if rng.random() < 0.5:
        coarse = rng.integers(0, 256, size=(int(rng.integers(4, 12)),) * 2 + (3,), dtype=np.uint8)
        return _resize(coarse, side), "texture:noise"
    angle, period = rng.uniform(0, math.pi), rng.uniform(4, 16)
    y, x = np.mgrid[0:side, 0:side]
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
    a, b = rng.integers(0, 256, size=(2, 3))
    pixels = wave[..., None] * a + (1 - wave[..., None]) * b + rng.normal(0, 8, size=(side, side, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), "texture:stripes"


def generate(source: str | Path, settings: BenchmarkSettings, part: str, n: int) -> Canvases:
    """`n` canvases of one part ("train", "val" or "test"; train and val draw from CIFAR's train
    partition, test from its test partition), the same for the same settings and part."""
    root = Path(source)
    classes, files = cifar_files(root)
    pool = files["test" if part == "test" else "train"]
    rng = np.random.default_rng([settings.seed, ("train", "val", "test").index(part)])
    side = settings.canvas
    images = np.empty((n, side, side, 3), dtype=np.uint8)
    masks = np.zeros((n, side, side), dtype=bool)
    labels = np.arange(n) % len(classes)  # balanced classes, in a random order
    labels = labels[rng.permutation(n)]
    boxes = np.empty((n, 4), dtype=np.int64)
    backgrounds, objects = [], []
    for i, label in enumerate(labels):
        if rng.random() < settings.texture_share:
            canvas, kind = texture(rng, side)
        else:
            other = int(rng.integers(len(classes) - 1))
            other += other >= label  # any class but the object's, evenly
            canvas = _resize(_read(root, pool[other][rng.integers(len(pool[other]))]), side)
            kind = f"cifar:{classes[other]}"
        key = pool[label][rng.integers(len(pool[label]))]
        size = int(rng.integers(settings.object_min, settings.object_max + 1))
        top, left = (int(v) for v in rng.integers(0, side - size + 1, size=2))
        canvas = canvas.copy()
        canvas[top:top + size, left:left + size] = _resize(_read(root, key), size)
        images[i], masks[i, top:top + size, left:left + size] = canvas, True
        boxes[i] = (top, left, size, size)
        backgrounds.append(kind)
        objects.append(key)
    return Canvases(images=images, masks=masks, labels=labels.astype(np.int64), boxes=boxes,
                    backgrounds=backgrounds, objects=objects)


def write_image_folder(source: str | Path, settings: BenchmarkSettings, folder: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """The benchmark as an image folder xtl trains on: `train/<class>/*.png` (training and validation
    canvases; the run's seeded split takes `val_images` of them for validation), `test/<class>/*.png`,
    the test masks in `masks.npz` (`keys`, `masks`) and what was drawn in `canvases.csv`. Returns the
    class names and the test masks by image key (`test/<class>/<name>.png`)."""
    from xtl.io import atomic_path, write_csv

    import shutil

    classes, _ = cifar_files(source)
    if folder.is_dir() and any(folder.iterdir()):
        # canvases of earlier settings would join the training or test images: written anew, but only
        # in a folder this function wrote (its canvases.csv says so)
        if not (folder / "canvases.csv").is_file():
            raise XtlError(f"option --out: {folder} exists and was not written by xtl localisation; give another --out")
        for part in ("train", "test"):
            shutil.rmtree(folder / part, ignore_errors=True)
    rows, test_masks = [], {}
    for part, n in (("train", settings.train_images + settings.val_images), ("test", settings.images)):
        drawn = generate(source, settings, part, n)
        for name in classes:
            (folder / part / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            key = f"{part}/{classes[drawn.labels[i]]}/{i:05d}.png"
            Image.fromarray(drawn.images[i]).save(folder / key)
            if part == "test":
                test_masks[key] = drawn.masks[i]
            top, left, size, _ = drawn.boxes[i].tolist()
            rows.append({"key": key, "label": classes[drawn.labels[i]], "top": top, "left": left, "side": size,
                         "background": drawn.backgrounds[i], "object": drawn.objects[i]})
    keys = sorted(test_masks)
    with atomic_path(folder / "masks.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, keys=np.array(keys), masks=np.stack([test_masks[k] for k in keys]))
    write_csv(folder / "canvases.csv", rows)
    return classes, test_masks


# ----------------------------------------------------------------------------- scoring


def to_canvas(raw: torch.Tensor, side: int, signed: bool) -> torch.Tensor:
    """Raw maps [B, h, w] on the canvas grid [B, side, side]: area-averaged when finer, bilinear when
    coarser; the positive part of a signed map."""
    maps = raw.detach().float()[:, None]
    if maps.shape[-1] >= side:
        maps = F.adaptive_avg_pool2d(maps, side)
    else:
        maps = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)
    maps = maps[:, 0]
    return maps.clamp(min=0) if signed else maps


def reference_maps(kind: str, n: int, side: int, seed: int = 0) -> torch.Tensor:
    """`random`: uniform noise per image (seeded); `centre`: a Gaussian at the canvas centre, sigma a
    quarter of the side (the centre bias of a photographer, for reference)."""
    if kind == "random":
        return torch.rand(n, side, side, generator=torch.Generator().manual_seed(seed))
    centre = (side - 1) / 2
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    gauss = torch.exp(-((y - centre) ** 2 + (x - centre) ** 2) / (2 * (side / 4) ** 2))
    return gauss.expand(n, side, side).clone()


def score_maps(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image pointing game (0/1), relevance-mass and relevance-rank accuracy of maps [B, H, W]
    against boolean masks [B, H, W] (`xtl.analysis.metrics`), and which maps are flat.

    A flat map (one value everywhere: no relevance, or a signed map with no positive part) points
    nowhere: it scores a miss in the pointing game (the metric alone would count every pixel as the
    maximum, a hit), and for mass and rank what spreading relevance evenly gives, the mask's share
    of the canvas (the metric alone: NaN, and the first K pixels)."""
    from xtl.analysis.metrics import pointing_game, relevance_mass_accuracy, relevance_rank_accuracy

    masks = masks.bool()
    flat = maps.flatten(1)
    is_flat = flat.amax(1) == flat.amin(1)
    share = masks.flatten(1).float().mean(1)
    pointing = pointing_game(maps, masks).float()
    mass = relevance_mass_accuracy(maps, masks).float()
    rank = relevance_rank_accuracy(maps, masks).float()
    return {"pointing_game": torch.where(is_flat, torch.zeros_like(pointing), pointing),
            "relevance_mass": torch.where(is_flat, share, mass),
            "relevance_rank": torch.where(is_flat, share, rank),
            "flat": is_flat}


def bootstrap_interval(values: torch.Tensor, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean of per-image values (NaN-free)."""
    v = values.double().cpu().numpy()
    if len(v) == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_resamples, len(v)))
    means = v[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summary_row(model: str, method: str, scores: dict[str, torch.Tensor], **extra) -> dict:
    row = {"model": model, "method": method, "n_images": len(scores["pointing_game"])}
    for name in METRICS:
        values = scores[name]
        low, high = bootstrap_interval(values)
        row.update({name: float(values.mean()), f"{name}_low": low, f"{name}_high": high})
    row["flat_maps"] = int(scores["flat"].sum()) if "flat" in scores else 0
    row.update(extra)
    return row


CSV_COLUMNS = ["model", "method", "n_images", *[f"{m}{s}" for m in METRICS for s in ("", "_low", "_high")],
               "flat_maps", "mask_share", "accuracy", "seconds"]


# ----------------------------------------------------------------------------- the benchmark


@dataclass
class ModelResult:
    model: str
    run: Path
    accuracy: float
    rows: list[dict]
    gallery: dict[str, torch.Tensor]  # method -> canvas maps of the first gallery images


def check_methods(models: Sequence[str], methods: Sequence[str] | None) -> dict[str, list[str]]:
    """The methods scored for each model (its family's defaults, or the named ones that apply to it);
    one line naming an unknown method, or a model none of the named methods applies to."""
    from xtl.explain import METHODS
    from xtl.models import get_spec

    known = set(METHODS) | set(REFERENCE_METHODS)
    for name in methods or ():
        if name not in known:
            raise XtlError(f"option --methods: unknown method '{name}'; known: {', '.join(sorted(known))}")
    chosen = {}
    for model in models:
        family = get_spec(model).family
        if methods:
            names = [m for m in methods if m in REFERENCE_METHODS or family in METHODS[m].families]
            if not [m for m in names if m not in REFERENCE_METHODS] and any(m not in REFERENCE_METHODS for m in methods):
                raise XtlError(f"option --methods: none of {', '.join(methods)} applies to {model} (a {family.upper()})")
        else:
            names = [*DEFAULT_METHODS.get(family, DEFAULT_METHODS["cnn"]), *REFERENCE_METHODS]
        chosen[model] = names
    return chosen


def _run_name(model: str) -> str:
    return model.replace(":", "_").replace("/", "_")


def train_model(model: str, data_folder: Path, run_path: Path, settings: BenchmarkSettings, epochs: int,
                input_size: int | None, pretrained: bool | None, device: str | None, progress: bool) -> "RunDir":  # noqa: F821
    """Fine-tune `model` on the benchmark's folder with the `quick` recipe (frozen early blocks for the
    models it was measured on), or reuse a finished run in `run_path` of the same settings."""
    from xtl.config import preset
    from xtl.data import load_split
    from xtl.evaluate import evaluate
    from xtl.models import get_spec
    from xtl.runs import RunDir, split_spec
    from xtl.train import finetune

    family = get_spec(model).family
    config = preset(
        "quick", model, source=str(data_folder.resolve()), split="random", stratified=False,
        train_size=settings.train_images, val_size=settings.val_images, test_size=settings.images,
        seed=settings.seed, epochs=epochs, input_size=input_size or DEFAULT_INPUT_SIZES.get(family, 128),
        pretrained=pretrained, accelerator=None if device is None else _accelerator(device),
    )
    config.extra = {"localisation": asdict(settings)}
    run = RunDir(run_path)
    if run.config_path.is_file():
        same = (run.weights_path.is_file() and run.file("metrics.json").is_file()
                and run.config().learning_settings() == config.learning_settings())
        if same:
            return run
        raise XtlError(f"option --out: {run_path} holds a run of other settings; give another --out "
                       "(or delete that folder)")
    data = load_split(config.source, split_spec(config))
    finetune(config, data, run, progress=progress)
    evaluate(run, data, device=device)
    return run


def _accelerator(device: str) -> str:
    from xtl.device import resolve_device

    return "auto" if device == "auto" else resolve_device(device).type


def score_model(run, masks_by_key: dict[str, np.ndarray], methods: Sequence[str], side: int, device: str | None,
                batch_size: int = 16, gallery_size: int = 4, on_method: Callable[[str], None] | None = None) -> ModelResult:
    """Explain the true class of every test image of `run` with each method and score the maps."""
    from xtl.explain import explain
    from xtl.inference import LoadedRun

    loaded = LoadedRun(run, split="test", device=device)
    part = loaded.part
    masks = torch.from_numpy(np.stack([masks_by_key[k] for k in part.keys]))
    labels = part.labels
    accuracy = float((loaded.probabilities.argmax(1) == labels).float().mean())
    model_name = run.config().model
    rows, gallery = [], {}
    n = len(labels)
    for method in methods:
        if on_method:
            on_method(method)
        start = time.perf_counter()
        if method in REFERENCE_METHODS:
            maps = reference_maps(method, n, side, seed=run.config().seed)
        else:
            chunks = []
            for s in range(0, n, batch_size):
                x = loaded.inputs(slice(s, s + batch_size))
                explanation = explain(loaded.model, x, labels[s:s + batch_size].to(loaded.device), method,
                                      spec=loaded.spec, **METHOD_OPTIONS.get(method, {}))
                chunks.append(to_canvas(explanation.raw.cpu(), side, explanation.signed))
            maps = torch.cat(chunks)
        seconds = time.perf_counter() - start
        scores = score_maps(maps, masks)
        rows.append(summary_row(model_name, method, scores, mask_share=float(masks.float().mean()),
                                accuracy=accuracy, seconds=round(seconds, 2)))
        gallery[method] = maps[:gallery_size]
    return ModelResult(model=model_name, run=run.path, accuracy=accuracy, rows=rows,
                       gallery={"images": part.images[:gallery_size], "masks": masks[:gallery_size], **gallery})


def run_benchmark(out: Path, models: Sequence[str] = DEFAULT_MODELS, methods: Sequence[str] | None = None,
                  settings: BenchmarkSettings = BenchmarkSettings(), epochs: int = 2,
                  source: str | Path = "../shared/data/cifar10", input_size: int | None = None,
                  pretrained: bool | None = None, device: str | None = None, progress: bool = True,
                  log: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Generate the benchmark in `out/data`, fine-tune each model in `out/runs/<model>`, score its
    methods and write `localisation.csv`, `localisation.png` and `gallery_<model>.png` in `out`.
    Returns the table's rows."""
    from xtl.io import write_csv, write_json

    chosen = check_methods(models, methods)
    out = Path(out)
    data_folder = out / "data"
    log(f"data: {settings.train_images + settings.val_images} training and {settings.images} test canvases "
        f"of {settings.canvas} px in {data_folder}")
    _, masks_by_key = write_image_folder(source, settings, data_folder)
    write_json(out / "benchmark.json", {"settings": asdict(settings), "models": list(models), "epochs": epochs,
                                        "methods": chosen, "source": str(source)})
    rows, results = [], []
    for model in models:
        start = time.perf_counter()
        run = train_model(model, data_folder, out / "runs" / _run_name(model), settings, epochs, input_size,
                          pretrained, device, progress)
        log(f"{model}: fine-tuned in {time.perf_counter() - start:.1f} s ({run.path})")
        result = score_model(run, masks_by_key, chosen[model], settings.canvas, device,
                             on_method=lambda m, model=model: log(f"{model}: {m}"))
        results.append(result)
        rows.extend(result.rows)
        write_csv(out / CSV_NAME, rows, CSV_COLUMNS)  # after each model: a stopped run keeps what it scored
    plot_scores(rows, out / FIGURE_NAME)
    for result in results:
        plot_gallery(result, out / f"gallery_{_run_name(result.model)}.png")
    return rows


# ----------------------------------------------------------------------------- figures and the table


def plot_scores(rows: list[dict], path: Path) -> None:
    """One panel per metric: a bar per model and method with its 95 % interval."""
    from xtl.io import pyplot, save_figure

    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(max(6.0, 0.45 * len(rows) + 2), 3.0 * len(METRICS)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[:, 0], METRICS):
        x, ticks = 0.0, []
        for k, model in enumerate(models):
            for r in (r for r in rows if r["model"] == model):
                value, low, high = (float(r[f"{metric}{s}"]) for s in ("", "_low", "_high"))
                reference = r["method"] in REFERENCE_METHODS
                ax.bar(x, value, color="lightgrey" if reference else colours[k % len(colours)],
                       edgecolor="black", linewidth=0.5,
                       yerr=[[value - low], [high - value]], capsize=2, label=model if not ticks or ticks[-1][2] != model else None)
                ticks.append((x, r["method"], model))
                x += 1
            x += 0.8
        ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k % len(colours)]) for k in range(len(models))]
    handles.append(plt.Rectangle((0, 0), 1, 1, color="lightgrey"))
    axes[0, 0].legend(handles, [*models, "reference maps"], fontsize=7, loc="upper right")
    axes[0, 0].set_title("Localisation on pasted CIFAR-10 objects (bars: mean; whiskers: bootstrap 95 % interval)",
                         fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_gallery(result: ModelResult, path: Path) -> None:
    """A few test canvases with the mask's outline, and each method's map of them."""
    from xtl.io import pyplot, save_figure

    plt = pyplot()
    images, masks = result.gallery["images"], result.gallery["masks"]
    methods = [m for m in result.gallery if m not in ("images", "masks")]
    n = len(images)
    fig, axes = plt.subplots(n, len(methods) + 1, figsize=(1.4 * (len(methods) + 1), 1.5 * n), squeeze=False)
    for i in range(n):
        for j, name in enumerate(["image", *methods]):
            ax = axes[i, j]
            ax.axis("off")
            if name == "image":
                ax.imshow(images[i].permute(1, 2, 0).numpy())
            else:
                ax.imshow(result.gallery[name][i].numpy(), cmap="jet")
            ax.contour(masks[i].float().numpy(), levels=[0.5], colors="white", linewidths=0.8)
            if i == 0:
                ax.set_title(name, fontsize=6)
    fig.suptitle(f"{result.model}: maps of the true class; white: the pasted object", fontsize=8)
    save_figure(fig, path)


def localisation_summary(folder: str | Path) -> list[dict]:
    """The rows of `folder/localisation.csv` (numbers as floats, model and method as text), or [] when
    there is none; for the report."""
    from xtl.io import read_csv

    path = Path(folder) / CSV_NAME
    if not path.is_file():
        return []
    rows = read_csv(path, floats=True, text=("model", "method"))
    return [dict(r) for r in rows]


def localisation_table(rows: list[dict]):
    """The scores as a rich table: mean and [95 % interval] per metric, model and method."""
    from rich.table import Table

    table = Table("model", "method", "pointing game", "relevance mass", "relevance rank", "acc", "s",
                  title=f"Localisation: {int(rows[0]['n_images']) if rows else 0} test canvases, maps of the true class")
    for r in rows:
        table.add_row(str(r["model"]), str(r["method"]),
                      *(f"{float(r[m]):.3f} [{float(r[m + '_low']):.3f}, {float(r[m + '_high']):.3f}]" for m in METRICS),
                      f"{float(r['accuracy']):.3f}", f"{float(r['seconds']):.1f}")
    return table
