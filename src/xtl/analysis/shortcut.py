"""A planted shortcut: do the maps find a cue the model is known to use? (issue 26)

After Adebayo et al., ICLR 2022 ("Post hoc explanations may be ineffective for detecting unknown
spurious correlation") and Kim et al. 2021 ("Sanity simulations for saliency methods"). A small
seeded marker (a solid coloured square, or a checkerboard "stamp", `marker_size` px of the 32 px
CIFAR image, flush in a corner drawn per image) is added to `rate` of one class's training and
validation images and to no other image. The same model is fine-tuned with the same recipe
(`xtl.train.finetune`, the `quick` preset) twice: on those
images (`shortcut`) and on the very same images without any marker (`clean`). The two image
folders hold the same files under the same names, so both runs cut the same seeded split; their
test partitions are identical clean CIFAR test images. `run_shortcut_benchmark` then measures:

1. that the shortcut is real (`shortcut_reality.csv`): each model's accuracy on the class's test
   images without the marker (`class_accuracy`) and the flip rate (`flip_rate`): the share of the
   other classes' test images that the model does not assign to the class as they are but does
   once the marker is pasted on them (the marker at the image's own seeded corner). Both with
   percentile-bootstrap 95 % intervals over the images and a paired test shortcut minus clean on
   the same images; the test accuracy on all clean test images is given for context (no test).
2. where the maps put the class's evidence (`shortcut.csv`): every test image, marked at its
   seeded corner, is explained for the shortcut class (the class the marker was planted in,
   whatever the image shows: "what in this image speaks for the class?") by each method and each of
   the two models. A map's *marker share* is its positive relevance on the marker's pixels over its
   positive relevance on the whole image, on the source image's pixel grid; *pointing* is 1 when
   its maximum lies on the marker. Three reference maps are scored the same way: `random` (seeded
   uniform noise), `centre` (a Gaussian at the image centre, sigma = side / 4) and `edge` (the
   Sobel gradient magnitude of the marked image's grayscale, replicate-padded so that the image's
   own border is no edge; it uses no model, so it is the same map for both models and tells how
   far "the marker is a sharp-edged patch" alone goes). Each method is compared with each
   reference on the same images (`minus_<reference>`: the mean per-image difference of the shares,
   method minus reference).
3. whether the maps tell the two models apart on the same marked images: the Mann-Whitney AUC
   P(shortcut model's share > clean model's share), ties counted half, over the per-image shares,
   with a bootstrap interval over the images (both models' shares resampled together, as they are
   of the same images) and a test of AUC = 0.5. A reference map is the same for both models, so its
   AUC is 0.5 by construction (given, not tested).

Every interval is a percentile bootstrap over images and every p-value comes from the same
resamples (`xtl.faithfulness.paired.resampled_means`, `summarise`; the AUC's resamples are the same
draws of the images, `_resample_counts`). All tests of one `run_shortcut_benchmark` call (the reality
differences, every method against every reference for both models, and every method's AUC) are one
Holm family (`correct`); a verdict is "first" (the method over the reference; the shortcut model
over the clean one), "second", or "cannot decide" where the Holm-corrected p >= 0.05.

Maps: signed methods (input x gradient, integrated gradients, LRP) are scored by their positive
part, taken on the method's own grid before the map is brought to the source image's grid (reading
`positive`); unsigned ones as they are (`unsigned`). A map finer than the source image (gradients at
the model's input size) is area-averaged down to it, a coarser one (a CAM grid, a ViT's patches)
upsampled bilinearly (`to_canvas`). A map with no positive relevance at all
(flat) scores the marker's share of the image (relevance spread evenly) and misses in pointing;
`flat_maps` counts them.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xtl.errors import XtlError
from xtl.faithfulness.paired import ALPHA, CHUNK, RESAMPLES, holm, resampled_means, summarise, verdict
from xtl.settings import Rule, check_values
from xtl.statistics import bootstrap_p, percentile_interval

CSV_NAME = "shortcut.csv"
REALITY_NAME = "shortcut_reality.csv"
JSON_NAME = "shortcut.json"
REFERENCES = ("random", "centre", "edge")
DATA = ("shortcut", "clean")
MARKERS = ("square", "stamp")
COLOURS = {"magenta": (255, 0, 255), "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "cyan": (0, 255, 255), "white": (255, 255, 255), "black": (0, 0, 0)}
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
DEFAULT_CLASS = "cat"
# the seeded draws: each its own stream of the seed, so that one count does not move another's draws
_STREAM = {"train_images": 0, "test_images": 1, "marked": 2, "train_corners": 3, "test_corners": 4}

DEFAULT_MODELS = ("efficientnet_lite0", "vit_s14_dinov2")
# cheap methods per family, scored by default (every registered one may be named)
DEFAULT_METHODS = {
    "cnn": ("gradcam", "saliency", "input_x_gradient", "integrated_gradients", "lrp_epsilon"),
    "vit": ("transformer_attribution", "attnlrp", "attention_rollout", "gradcam", "saliency", "input_x_gradient",
            "integrated_gradients"),
}
# integrated gradients' steps here (its default is 32): the benchmark must stay minutes on a CPU
METHOD_OPTIONS = {"integrated_gradients": {"n_steps": 8}}

RULES = {
    "marker": Rule(choices=MARKERS), "colour": Rule(choices=tuple(COLOURS)),
    "marker_size": Rule(at_least=1, at_most=64),
    "rate": Rule(at_least=0, at_most=1), "seed": Rule(at_least=0), "train_images": Rule(at_least=2),
    "val_images": Rule(at_least=1), "test_images": Rule(at_least=2),
}


@dataclass(frozen=True)
class ShortcutSettings:
    """The planted shortcut; the same settings (and source) give the same images, markers and places.

    `shortcut_class` (option --class) defaults to "cat", fixed before any result: cat is the CIFAR-10
    class that classifiers commonly find hardest (often the lowest per-class accuracy in published
    confusion matrices, confused with dog; not measured for this choice), so the marker is the most
    useful cue a model could take up there,
    which gives the shortcut its best chance to be learned in the quick recipe's few epochs; cat
    photos are cluttered indoor and outdoor scenes, so nothing else in their corners is a cue. The
    colour defaults to magenta (high red and blue, no green), which natural CIFAR photos rarely hold
    in a 4 x 4 patch: the marker is a cue nothing else in the data gives."""

    shortcut_class: str = DEFAULT_CLASS  # option --class: the class whose training images get the marker
    marker: str = "square"  # "square": a solid square of `colour`; "stamp": a checkerboard of `colour` and black
    colour: str = "magenta"  # one of COLOURS
    marker_size: int = 4  # side of the marker in px of the source image (4 px of CIFAR's 32)
    rate: float = 0.9  # share of the class's training and validation images marked (the others: none)
    seed: int = 0  # draws the images, which of the class's images are marked and each marker's corner
    train_images: int = 1000  # training images (balanced over the classes, from the source's train partition)
    val_images: int = 200  # validation images (the same pool; the run's seeded stratified split takes them)
    test_images: int = 200  # test images (balanced, from the source's test partition), all scored

    def __post_init__(self) -> None:
        if not isinstance(self.shortcut_class, str) or not self.shortcut_class:
            raise XtlError(f"option --class must be a class name, not {self.shortcut_class!r}")
        values = {k: v for k, v in asdict(self).items() if k != "shortcut_class"}
        for name in ("marker_size", "seed", "train_images", "val_images", "test_images"):
            if not isinstance(values[name], int) or isinstance(values[name], bool):
                raise XtlError(f"option --{name.replace('_', '-')} must be an integer, not {values[name]!r}")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)):
            raise XtlError(f"option --rate must be a number, not {self.rate!r}")
        check_values(values, RULES)


# ----------------------------------------------------------------------------- markers


def marker_patch(settings: ShortcutSettings) -> np.ndarray:
    """The marker's pixels, uint8 [3, s, s]: a solid square of the colour, or a checkerboard of the
    colour and black (`stamp`; its top-left pixel is the colour)."""
    s = settings.marker_size
    colour = np.array(COLOURS[settings.colour], dtype=np.uint8)[:, None, None]
    patch = np.broadcast_to(colour, (3, s, s)).copy()
    if settings.marker == "stamp":
        y, x = np.mgrid[0:s, 0:s]
        patch[:, (y + x) % 2 == 1] = 0
    return patch


def draw_corners(settings: ShortcutSettings, part: str, n: int) -> np.ndarray:
    """`n` seeded corner indices (into CORNERS) for the images of `part` ("train" or "test")."""
    return np.random.default_rng([settings.seed, _STREAM[f"{part}_corners"]]).integers(0, len(CORNERS), size=n)


def corner_box(corner: int, side: tuple[int, int], size: int) -> tuple[int, int]:
    """(top, left) of a `size` marker flush in corner `corner` of an image of (height, width) `side`."""
    height, width = side
    name = CORNERS[int(corner)]
    return (0 if name.startswith("top") else height - size), (0 if name.endswith("left") else width - size)


def add_marker(images, settings: ShortcutSettings, corners) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (uint8 [B, 3, H, W], tensor or array) with the marker pasted, and its boolean masks
    [B, H, W] in the images' pixels. `corners`: one corner index per image (into CORNERS), or a
    `numpy.random.Generator` to draw them from."""
    marked = images.clone() if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    if marked.dtype != torch.uint8 or marked.ndim != 4 or marked.shape[1] != 3:
        raise XtlError(f"add_marker takes uint8 images [B, 3, H, W], not {tuple(marked.shape)} {marked.dtype}")
    b, _, h, w = marked.shape
    s = settings.marker_size
    if s >= min(h, w):
        raise XtlError(f"option --marker-size {s} must be smaller than the images' side ({min(h, w)} px)")
    if isinstance(corners, np.random.Generator):
        corners = corners.integers(0, len(CORNERS), size=b)
    corners = np.asarray(corners, dtype=np.int64).reshape(-1)
    if len(corners) != b:
        raise XtlError(f"add_marker: {len(corners)} corners for {b} images")
    patch = torch.from_numpy(marker_patch(settings))
    masks = torch.zeros(b, h, w, dtype=torch.bool)
    for i, corner in enumerate(corners.tolist()):
        top, left = corner_box(corner, (h, w), s)
        marked[i, :, top:top + s, left:left + s] = patch
        masks[i, top:top + s, left:left + s] = True
    return marked, masks


# ----------------------------------------------------------------------------- the image folders


@dataclass
class Drawn:
    """The images of the benchmark: per part, the source keys, labels, corners and (train) which are marked."""

    classes: list[str]
    target: int  # the shortcut class's index
    keys: dict[str, list[str]]  # part -> the written file's key, `<part>/<class>/<i>.png`, the same in both folders
    sources: dict[str, list[str]]  # part -> the source image's key
    labels: dict[str, np.ndarray]
    corners: dict[str, np.ndarray]
    marked: np.ndarray  # train: bool per image (test images are all marked for measurement, in memory)
    test_corners_by_key: dict[str, int] = field(default_factory=dict)


def _balanced(files: list[list[str]], n: int, rng: np.random.Generator, part: str) -> tuple[list[str], np.ndarray]:
    k = len(files)
    labels = np.sort(np.arange(n) % k)
    counts = np.bincount(labels, minlength=k)
    chosen: list[str] = []
    for c, (names, m) in enumerate(zip(files, counts)):
        if m > len(names):
            raise XtlError(f"option --{part}-images: {m} images of class {names[0].split('/')[1]} wanted, the source "
                           f"has {len(names)}")
        chosen += [names[i] for i in np.sort(rng.choice(len(names), size=int(m), replace=False))]
    return chosen, labels


def draw(source: str | Path, settings: ShortcutSettings) -> Drawn:
    """Which source images make each part, which of the class's training images are marked, and
    every marker's corner; the same for the same settings."""
    classes, files = cifar_files(source)
    if settings.shortcut_class not in classes:
        raise XtlError(f"option --class: '{settings.shortcut_class}' is not a class of the source; classes: "
                       f"{', '.join(classes)}")
    target = classes.index(settings.shortcut_class)
    side = min(_read(Path(source), files["train"][0][0]).shape[:2])
    if settings.marker_size >= side:
        raise XtlError(f"option --marker-size {settings.marker_size} must be smaller than the images' side ({side} px)")
    pool = settings.train_images + settings.val_images
    train_src, train_labels = _balanced(files["train"], pool,
                                        np.random.default_rng([settings.seed, _STREAM["train_images"]]), "train")
    test_src, test_labels = _balanced(files["test"], settings.test_images,
                                      np.random.default_rng([settings.seed, _STREAM["test_images"]]), "test")
    of_class = np.flatnonzero(train_labels == target)
    n_marked = int(round(settings.rate * len(of_class)))
    marked = np.zeros(pool, dtype=bool)
    marked[np.random.default_rng([settings.seed, _STREAM["marked"]]).permutation(of_class)[:n_marked]] = True
    keys = {part: [f"{part}/{classes[c]}/{i:05d}.png" for i, c in enumerate(labels.tolist())]
            for part, labels in (("train", train_labels), ("test", test_labels))}
    corners = {"train": draw_corners(settings, "train", pool),
               "test": draw_corners(settings, "test", settings.test_images)}
    return Drawn(classes=classes, target=target, keys=keys, sources={"train": train_src, "test": test_src},
                 labels={"train": train_labels, "test": test_labels}, corners=corners, marked=marked,
                 test_corners_by_key=dict(zip(keys["test"], corners["test"].tolist())))


def _read(root: Path, key: str) -> np.ndarray:
    with Image.open(root / key) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def write_folders(source: str | Path, settings: ShortcutSettings, folder: Path) -> Drawn:
    """`folder/shortcut` and `folder/clean`: image folders xtl trains on (`train/<class>/*.png`: the
    training and validation pool; `test/<class>/*.png`: clean test images), the same files under the
    same names, the marker pasted on the drawn share of the class's pool images in `shortcut` only.
    PNG, so the marker's pixels stay exact. `folder/markers.csv` says what was drawn (each test
    image's corner is where measurement pastes its marker)."""
    from xtl.io import write_csv

    folder = Path(folder)
    drawn = draw(source, settings)
    root = Path(source)
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / "markers.csv").is_file():
            raise XtlError(f"option --out: {folder} exists and was not written by xtl shortcut; give another --out")
        for data in DATA:
            shutil.rmtree(folder / data, ignore_errors=True)
    rows = []
    for part in ("train", "test"):
        pixels = np.stack([_read(root, k) for k in drawn.sources[part]]).transpose(0, 3, 1, 2)
        marked_images, _ = add_marker(pixels, settings, drawn.corners[part])
        marked_images = marked_images.numpy()
        for data in DATA:
            for name in drawn.classes:
                (folder / data / part / name).mkdir(parents=True, exist_ok=True)
        for i, key in enumerate(drawn.keys[part]):
            mark = bool(drawn.marked[i]) if part == "train" else False
            Image.fromarray(pixels[i].transpose(1, 2, 0)).save(folder / "clean" / key)
            shown = marked_images[i] if mark else pixels[i]
            Image.fromarray(shown.transpose(1, 2, 0)).save(folder / "shortcut" / key)
            top, left = corner_box(drawn.corners[part][i], pixels.shape[-2:], settings.marker_size)
            rows.append({"part": part, "key": key, "source": drawn.sources[part][i],
                         "label": drawn.classes[drawn.labels[part][i]], "marked": int(mark),
                         "corner": CORNERS[int(drawn.corners[part][i])], "top": top, "left": left})
    write_csv(folder / "markers.csv", rows)
    return drawn


# ----------------------------------------------------------------------------- maps and their scores


def edge_maps(images: torch.Tensor) -> torch.Tensor:
    """The Sobel gradient magnitude of the grayscale of uint8 images [B, 3, H, W] -> [B, H, W]
    (ITU-R 601 luma, replicate padding: the image's border is no edge). Uses no model."""
    x = images.float() / 255
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([kx, kx.T])[:, None]
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return g.pow(2).sum(1).sqrt()


def centre_maps(n: int, side: tuple[int, int]) -> torch.Tensor:
    """A Gaussian at the image centre, sigma a quarter of the side, [n, H, W]."""
    h, w = side
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    sigma = min(h, w) / 4
    gauss = torch.exp(-((y - (h - 1) / 2) ** 2 + (x - (w - 1) / 2) ** 2) / (2 * sigma ** 2))
    return gauss.expand(n, h, w).clone()


def reference_maps(kind: str, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The reference map `kind` (REFERENCES) of the marked uint8 images [B, 3, H, W] -> [B, H, W]."""
    n, _, h, w = images.shape
    if kind == "random":
        return torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed))
    if kind == "centre":
        return centre_maps(n, (h, w))
    if kind == "edge":
        return edge_maps(images)
    raise XtlError(f"unknown reference map '{kind}'; known: {', '.join(REFERENCES)}")


def explain_maps(model: torch.nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                 target: int, method: str, spec=None, device: str | torch.device = "cpu", batch_size: int = 16,
                 options: Mapping | None = None) -> tuple[torch.Tensor, bool]:
    """The maps of class `target` by `method` on uint8 images [B, 3, H, W] (preprocessed by
    `preprocess` on `device`), their positive part where signed, on the images' grid [B, H, W];
    and whether the method is signed."""
    from xtl.explain import explain

    side = images.shape[-1]
    chunks, signed = [], False
    for s in range(0, len(images), batch_size):
        x = preprocess(images[s:s + batch_size].to(device))
        targets = torch.full((len(x),), int(target), dtype=torch.long, device=x.device)
        explanation = explain(model, x, targets, method, spec=spec, **dict(options if options is not None
                                                                         else METHOD_OPTIONS.get(method, {})))
        raw = explanation.raw.detach().float().cpu()
        signed = explanation.signed
        if signed:
            raw = raw.clamp(min=0)
        chunks.append(to_canvas(raw, side, signed=False))
    return torch.cat(chunks), signed


def marker_scores(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: the share of the map's positive relevance on the marker (`share`), whether its
    maximum lies on the marker (`pointing`), and whether the map has no positive relevance (`flat`;
    it then scores the marker's share of the image and a miss)."""
    positive = maps.float().clamp(min=0).flatten(1)
    m = masks.bool().flatten(1)
    total = positive.sum(1)
    area = m.float().mean(1)
    flat = (total <= 0) | (positive.amax(1) == positive.amin(1))
    share = torch.where(total > 0, (positive * m).sum(1) / total.clamp(min=1e-30), area)
    share = torch.where(flat, area, share)
    pointing = m.gather(1, positive.argmax(1, keepdim=True))[:, 0].float()
    return {"share": share.double(), "pointing": torch.where(flat, torch.zeros_like(pointing), pointing).double(),
            "flat": flat}


def _resample_counts(n: int, resamples: int = RESAMPLES, seed: int = 0):
    """The image counts [r, n] of the bootstrap resamples `resampled_means(..., resamples, seed)` draws,
    chunk by chunk (the very same draws: the AUC is resampled as the means are)."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, resamples, CHUNK):
        r = min(CHUNK, resamples - start)
        index = torch.randint(n, (r, n), generator=generator)
        yield torch.zeros(r, n, dtype=torch.float64).scatter_add_(1, index, torch.ones(r, n, dtype=torch.float64))


def _wins(first, second) -> torch.Tensor:
    """[n, m]: 1 where first[i] > second[j], 1/2 where equal, else 0."""
    a, b = torch.as_tensor(first, dtype=torch.float64), torch.as_tensor(second, dtype=torch.float64)
    return (a[:, None] > b[None, :]).double() + 0.5 * (a[:, None] == b[None, :]).double()


def mann_whitney_auc(first: torch.Tensor, second: torch.Tensor) -> float:
    """P(first > second) over all pairs of a value of `first` and one of `second`, ties half."""
    return float(_wins(first, second).mean())


def auc_interval(first: torch.Tensor, second: torch.Tensor, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The Mann-Whitney AUC of paired per-image values (the same images), its percentile-bootstrap
    interval over the images (both resampled together) and the bootstrap p-value of AUC = 0.5."""
    wins = _wins(first, second)
    n = len(wins)
    resampled = torch.cat([((w @ wins) * w).sum(1) / n ** 2 for w in _resample_counts(n, resamples, seed)])
    low, high = percentile_interval(resampled[:, None])
    return {"auc": float(wins.mean()), "auc_low": float(low[0]), "auc_high": float(high[0]),
            "auc_p": float(bootstrap_p((resampled - 0.5)[:, None])[0])}


def _mean_interval(values: torch.Tensor, means: torch.Tensor, j: int) -> tuple[float, float, float]:
    low, high = percentile_interval(means[:, j:j + 1])
    return float(values.mean()), float(low[0]), float(high[0])


@dataclass
class Measurement:
    """What `measure` found for one model pair: the rows of shortcut.csv, the per-image scores by
    (data, method) and the first images' maps for the gallery."""

    rows: list[dict]
    scores: dict[tuple[str, str], dict[str, torch.Tensor]]
    maps: dict[tuple[str, str], torch.Tensor]
    images: torch.Tensor
    masks: torch.Tensor


def measure(models: Mapping[str, tuple], images: torch.Tensor, masks: torch.Tensor, target: int,
            methods: Sequence[str], name: str = "", seed: int = 0, device: str | torch.device = "cpu",
            resamples: int = RESAMPLES, gallery_size: int = 4, batch_size: int = 16,
            log: Callable[[str], None] = lambda line: None) -> Measurement:
    """Measurements 2 and 3 of the module's docstring for one model pair on the marked uint8 images
    [B, 3, H, W] with their marker masks [B, H, W]: `models` maps "shortcut" and "clean" to (model,
    preprocess, spec); `methods`: explanation methods (references are added). The rows carry p-values
    Holm-corrected within this call (`correct`; the benchmark corrects all its rows together again)."""
    if set(models) != set(DATA):
        raise XtlError(f"measure needs the models {', '.join(DATA)}, not {', '.join(models)}")
    masks = masks.bool()
    n = len(images)
    methods = [m for m in methods if m not in REFERENCES]
    scores: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    maps_kept: dict[tuple[str, str], torch.Tensor] = {}
    signed: dict[str, bool] = {}
    seconds: dict[str, float] = {}
    for method in [*methods, *REFERENCES]:
        start = time.perf_counter()
        for data in DATA:
            if method in REFERENCES:
                maps, signed[method] = reference_maps(method, images, seed), False
            else:
                log(f"{name}: {method} ({data} model)")
                model, preprocess, spec = models[data]
                maps, signed[method] = explain_maps(model, preprocess, images, target, method, spec, device, batch_size)
            scores[(data, method)] = marker_scores(maps, masks)
            maps_kept[(data, method)] = maps[:gallery_size]
        seconds[method] = time.perf_counter() - start
    # every per-image quantity of this pair, resampled together (the same draws of the images)
    columns: dict[tuple, torch.Tensor] = {}
    for data in DATA:
        for method in [*methods, *REFERENCES]:
            columns[(data, method, "share")] = scores[(data, method)]["share"]
            columns[(data, method, "pointing")] = scores[(data, method)]["pointing"]
            if method not in REFERENCES:
                for ref in REFERENCES:
                    columns[(data, method, ref)] = scores[(data, method)]["share"] - scores[(data, ref)]["share"]
    keys = list(columns)
    values = torch.stack([columns[k] for k in keys], dim=1)
    means = resampled_means(values, resamples, seed)
    tested = summarise(values, means)
    position = {k: j for j, k in enumerate(keys)}
    area = float(masks.flatten(1).float().mean())
    rows = []
    for method in [*methods, *REFERENCES]:
        pair = auc_interval(scores[("shortcut", method)]["share"], scores[("clean", method)]["share"], resamples, seed)
        if method in REFERENCES:
            pair["auc_p"] = float("nan")  # the same map for both models: 0.5 by construction, not a test
        for data in DATA:
            row = {"model": name, "method": method, "reading": "positive" if signed[method] else "unsigned",
                   "data": data, "n_images": n, "marker_area": area}
            for what in ("share", "pointing"):
                j = position[(data, method, what)]
                mean, low, high = _mean_interval(values[:, j], means, j)
                prefix = "marker_share" if what == "share" else "pointing"
                row.update({prefix: mean, f"{prefix}_low": low, f"{prefix}_high": high})
            row["flat_maps"] = int(scores[(data, method)]["flat"].sum())
            for ref in REFERENCES:
                if method in REFERENCES:
                    row.update({f"minus_{ref}": float("nan"), f"minus_{ref}_low": float("nan"),
                                f"minus_{ref}_high": float("nan"), f"minus_{ref}_p": float("nan")})
                else:
                    d = tested[position[(data, method, ref)]]
                    row.update({f"minus_{ref}": d.mean, f"minus_{ref}_low": d.low, f"minus_{ref}_high": d.high,
                                f"minus_{ref}_p": d.p})
            row.update(pair)
            row["seconds"] = round(seconds[method], 2)
            rows.append(row)
    correct(rows)
    return Measurement(rows=rows, scores=scores, maps=maps_kept, images=images[:gallery_size],
                       masks=masks[:gallery_size])


# the tests of a row: (its p column, the column of its estimate, the estimate's null value)
_TESTS = [*((f"minus_{ref}_p", f"minus_{ref}", 0.0) for ref in REFERENCES), ("auc_p", "auc", 0.5),
          ("p", "difference", 0.0)]


def correct(*row_lists: list[dict], alpha: float = ALPHA) -> int:
    """Holm-correct every test of the rows given (one family): each finite `<test>_p` gets its
    `<test>_p_holm` and `<test>_verdict` ("first", "second", "cannot decide"; "" where untested), and
    every row the family's size. A pair's AUC stands on both its rows and is one test (its shortcut
    row's, copied to the clean row). Returns the family's size."""
    tests, mirrors = [], []
    for rows in row_lists:
        for row in rows:
            for p_key, estimate, null in _TESTS:
                if p_key in row:
                    stem = p_key[:-1]  # "minus_random_", "auc_", ""
                    row[f"{stem}p_holm"], row[f"{stem}verdict"] = float("nan"), ""
                    if stem == "auc_" and row.get("data") == "clean":
                        mirrors.append(row)  # the pair's AUC, tested once (on its shortcut row)
                    elif np.isfinite(row[p_key]):
                        tests.append((row, stem, row[estimate] - null))
    for (row, stem, effect), adjusted in zip(tests, holm([row[f"{stem}p"] for row, stem, _ in tests])):
        row[f"{stem}p_holm"] = adjusted
        row[f"{stem}verdict"] = verdict({"p_holm": adjusted, "mean": effect}, alpha)
    tested = {(r["model"], r["method"], r["reading"]): r for rows in row_lists for r in rows
              if "auc_p" in r and r.get("data") == "shortcut"}
    for row in mirrors:
        twin = tested.get((row["model"], row["method"], row["reading"]))
        if twin is not None:
            row["auc_p_holm"], row["auc_verdict"] = twin["auc_p_holm"], twin["auc_verdict"]
    for rows in row_lists:
        for row in rows:
            row["family"] = len(tests)
    return len(tests)


def _test_columns(stem: str) -> list[str]:
    return [stem.rstrip("_"), f"{stem}low", f"{stem}high", f"{stem}p", f"{stem}p_holm", f"{stem}verdict"]


CSV_COLUMNS = ["model", "method", "reading", "data", "n_images", "marker_area",
               "marker_share", "marker_share_low", "marker_share_high", "pointing", "pointing_low", "pointing_high",
               "flat_maps", *[c for ref in REFERENCES for c in _test_columns(f"minus_{ref}_")],
               *_test_columns("auc_"), "family", "seconds"]
REALITY_COLUMNS = ["model", "measure", "n_images", "shortcut", "shortcut_low", "shortcut_high", "clean", "clean_low",
                   "clean_high", "difference", "difference_low", "difference_high", "p", "p_holm", "verdict", "family"]
_TEXT = ("model", "method", "reading", "data", "measure",
         *(c for c in CSV_COLUMNS + REALITY_COLUMNS if c.endswith("verdict")))


# ----------------------------------------------------------------------------- is the shortcut real?


def _predict(model, preprocess, images: torch.Tensor, device, batch_size: int = 64) -> torch.Tensor:
    """The predicted classes of uint8 images, by the one function every prediction shown comes from
    (`xtl.models.class_probabilities`: the same precision for the marked and the unmarked images)."""
    from xtl.models import class_probabilities

    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            out.append(class_probabilities(model, preprocess(images[s:s + batch_size].to(device))).argmax(1).cpu())
    return torch.cat(out)


def reality(name: str, predictions: Mapping[str, tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor, target: int,
            resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """Measurement 1: `predictions` maps "shortcut" and "clean" to (predicted classes on the clean test
    images, on the same images marked). Rows of shortcut_reality.csv (p-values not yet Holm-corrected)."""
    labels = torch.as_tensor(labels)
    of_class, others = labels == target, labels != target
    per_image = {}
    for data in DATA:
        clean_pred, marked_pred = predictions[data]
        per_image[data] = {
            "test_accuracy": (clean_pred == labels).double(),
            "class_accuracy": (clean_pred == labels).double()[of_class],
            "flip_rate": ((clean_pred != target) & (marked_pred == target)).double()[others],
        }
    rows = []
    for measure_name in ("test_accuracy", "class_accuracy", "flip_rate"):
        s, c = per_image["shortcut"][measure_name], per_image["clean"][measure_name]
        row = {"model": name, "measure": measure_name, "n_images": len(s)}
        if len(s) < 2:
            rows.append({**row, **{k: float("nan") for k in REALITY_COLUMNS[3:-3]}})
            continue
        values = torch.stack([s, c, s - c], dim=1)
        means = resampled_means(values, resamples, seed)
        d = summarise(values, means)
        for j, key in enumerate(("shortcut", "clean", "difference")):
            row.update({key: d[j].mean, f"{key}_low": d[j].low, f"{key}_high": d[j].high})
        row["p"] = d[2].p if measure_name != "test_accuracy" else float("nan")  # context, not a test
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the benchmark


def check_methods(models: Sequence[str], methods: Sequence[str] | None) -> dict[str, list[str]]:
    """The explanation methods scored for each model: its family's `DEFAULT_METHODS`, or the named ones
    that apply to it (the references are always scored); one line naming an unknown method, or a
    model none of the named methods applies to."""
    from xtl.explain import METHODS
    from xtl.models import get_spec

    named = [m for m in methods or () if m not in REFERENCES] if methods else None
    if methods and not named:
        return {model: [] for model in models}
    for name in named or ():
        if name not in METHODS:
            raise XtlError(f"option --methods: unknown method '{name}'; known: "
                           f"{', '.join(sorted(set(METHODS) | set(REFERENCES)))}")
    chosen = {}
    for model in models:
        family = get_spec(model).family
        if named:
            names = [m for m in named if family in METHODS[m].families]
            if not names:
                raise XtlError(f"option --methods: none of {', '.join(named)} applies to {model} (a {family.upper()})")
        else:
            names = list(DEFAULT_METHODS.get(family, DEFAULT_METHODS["cnn"]))
        chosen[model] = names
    return chosen


def _accelerator(device: str) -> str:
    from xtl.device import resolve_device

    return "auto" if device == "auto" else resolve_device(device).type


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


def to_canvas(raw: torch.Tensor, side: int, signed: bool) -> torch.Tensor:
    """Raw maps [B, h, w] on the source image's grid [B, side, side]: area-averaged when finer, bilinear
    when coarser; the positive part of a signed map."""
    maps = raw.detach().float()[:, None]
    if maps.shape[-1] >= side:
        maps = F.adaptive_avg_pool2d(maps, side)
    else:
        maps = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)
    maps = maps[:, 0]
    return maps.clamp(min=0) if signed else maps


def _run_name(model: str) -> str:
    return model.replace(":", "_").replace("/", "_")


def train(model: str, data_folder: Path, run_path: Path, settings: ShortcutSettings, data: str, epochs: int,
          input_size: int | None, pretrained: bool | None, device: str | None, progress: bool):
    """Fine-tune `model` on one of the two folders with the `quick` recipe (its input size unless
    given), or reuse a finished run in `run_path` of the same settings."""
    from xtl.config import preset
    from xtl.data import load_split
    from xtl.evaluate import evaluate
    from xtl.runs import RunDir, split_spec
    from xtl.train import finetune

    config = preset(
        "quick", model, source=str(data_folder.resolve()), split="random", stratified=True,
        train_size=settings.train_images, val_size=settings.val_images, test_size=settings.test_images,
        seed=settings.seed, epochs=epochs, input_size=input_size, pretrained=pretrained,
        accelerator=None if device is None else _accelerator(device),
    )
    config.extra = {"shortcut": {**asdict(settings), "data": data}}
    run = RunDir(run_path)
    if run.config_path.is_file():
        if (run.weights_path.is_file() and run.file("metrics.json").is_file()
                and run.config().learning_settings() == config.learning_settings()):
            return run
        raise XtlError(f"option --out: {run_path} holds a run of other settings; give another --out "
                       "(or delete that folder)")
    split = load_split(config.source, split_spec(config))
    finetune(config, split, run, progress=progress)
    evaluate(run, split, device=device)
    return run


def run_shortcut_benchmark(out: Path, models: Sequence[str] = DEFAULT_MODELS, methods: Sequence[str] | None = None,
                           settings: ShortcutSettings = ShortcutSettings(), epochs: int = 2,
                           source: str | Path = "../shared/data/cifar10", input_size: int | None = None,
                           pretrained: bool | None = None, device: str | None = None, progress: bool = True,
                           log: Callable[[str], None] = lambda line: None, resamples: int = RESAMPLES) -> list[dict]:
    """Write the two image folders in `out/data`, fine-tune each model on both (`out/runs/<model>-shortcut`,
    `<model>-clean`), measure (module docstring) and write `shortcut.csv`, `shortcut_reality.csv`,
    `shortcut.json` and `shortcut_gallery_<model>.png` in `out`. Returns the rows of shortcut.csv."""
    from xtl.inference import LoadedRun
    from xtl.io import write_csv, write_json

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise XtlError(f"option --epochs must be >= 1, not {epochs}")
    chosen = check_methods(models, methods)
    out = Path(out)
    drawn = write_folders(source, settings, out / "data")  # checks the options against the source first
    log(f"data: {settings.train_images + settings.val_images} training and {settings.test_images} test images; "
        f"{int(drawn.marked.sum())} of class {settings.shortcut_class} marked, in {out / 'data'}")
    write_json(out / JSON_NAME, {"settings": asdict(settings), "models": list(models), "epochs": epochs,
                                 "methods": chosen, "references": list(REFERENCES), "source": str(source),
                                 "input_size": input_size, "pretrained": pretrained, "resamples": resamples})
    rows, reality_rows, measured = [], [], []
    for model in models:
        loaded = {}
        for data in DATA:
            start = time.perf_counter()
            run = train(model, out / "data" / data, out / "runs" / f"{_run_name(model)}-{data}", settings, data,
                        epochs, input_size, pretrained, device, progress)
            log(f"{model}: {data} model ready in {time.perf_counter() - start:.1f} s ({run.path})")
            loaded[data] = LoadedRun(run, split="test", device=device)
        keys = loaded["shortcut"].part.keys
        if keys != loaded["clean"].part.keys:
            raise XtlError(f"the runs of {model} hold other test images; delete {out / 'runs'} and run again")
        part = loaded["shortcut"].part
        target = loaded["shortcut"].class_names.index(settings.shortcut_class)
        corners = np.array([drawn.test_corners_by_key[k] for k in keys])
        images, masks = add_marker(part.images[:], settings, corners)
        predictions = {data: tuple(_predict(loaded[data].model, loaded[data].preprocess, x, loaded[data].device)
                                   for x in (part.images[:], images))
                       for data in DATA}
        reality_rows += reality(model, predictions, part.labels, target, resamples, settings.seed)
        result = measure({d: (loaded[d].model, loaded[d].preprocess, loaded[d].spec) for d in DATA}, images, masks,
                         target, chosen[model], name=model, seed=settings.seed, device=loaded["shortcut"].device,
                         resamples=resamples, log=log)
        measured.append((model, result))
        rows += result.rows
        correct(rows, reality_rows)
        write_csv(out / CSV_NAME, rows, CSV_COLUMNS)  # after each model: a stopped run keeps what it measured
        write_csv(out / REALITY_NAME, reality_rows, REALITY_COLUMNS)
    for model, result in measured:
        plot_gallery(model, result, chosen[model], settings.shortcut_class,
                     out / f"shortcut_gallery_{_run_name(model)}.png")
    return rows


# ----------------------------------------------------------------------------- the figure and the table


def plot_gallery(model: str, result: Measurement, methods: Sequence[str], class_name: str, path: Path) -> None:
    """The first marked test images (the marker outlined) and each method's map of the class for the
    shortcut and the clean model (and the edge reference)."""
    from xtl.io import pyplot, save_figure

    plt = pyplot()
    columns = [("image", None), *((m, d) for m in methods for d in DATA), ("edge", "shortcut")]
    n = len(result.images)
    fig, axes = plt.subplots(n, len(columns), figsize=(1.3 * len(columns), 1.4 * n + 0.4), squeeze=False)
    for i in range(n):
        for j, (method, data) in enumerate(columns):
            ax = axes[i, j]
            ax.axis("off")
            if method == "image":
                ax.imshow(result.images[i].permute(1, 2, 0).numpy())
            else:
                ax.imshow(result.maps[(data, method)][i].numpy(), cmap="jet")
            ys, xs = np.nonzero(result.masks[i].numpy())
            if len(ys):  # the marker's outline (a contour would stay open along the image's border)
                ax.add_patch(plt.Rectangle((xs.min() - 0.5, ys.min() - 0.5), xs.max() - xs.min() + 1,
                                           ys.max() - ys.min() + 1, fill=False, edgecolor="white", linewidth=0.9))
            if i == 0:
                ax.set_title("image" if method == "image" else "edge" if method == "edge" else f"{method}\n{data}",
                             fontsize=6)
    fig.suptitle(f"{model}: maps of class {class_name} on marked test images; white: the marker", fontsize=8)
    save_figure(fig, path)


def shortcut_summary(folder: str | Path) -> list[dict]:
    """The rows of `folder/shortcut.csv` (numbers as floats, names and verdicts as text), [] when none."""
    from xtl.io import read_csv

    path = Path(folder) / CSV_NAME
    if not path.is_file():
        return []
    return [dict(r) for r in read_csv(path, floats=True, text=_TEXT)]


def reality_summary(folder: str | Path) -> list[dict]:
    """The rows of `folder/shortcut_reality.csv`, [] when none."""
    from xtl.io import read_csv

    path = Path(folder) / REALITY_NAME
    if not path.is_file():
        return []
    return [dict(r) for r in read_csv(path, floats=True, text=_TEXT)]


def _ci(r: dict, stem: str) -> str:
    return f"{float(r[stem]):.3f} [{float(r[stem + '_low']):.3f}, {float(r[stem + '_high']):.3f}]"


def shortcut_table(rows: list[dict]):
    """The marker shares as a rich table: per model, method and data, the share and pointing with their
    95 % intervals, the verdicts against the references and the AUC of the two models."""
    from rich.table import Table

    table = Table("model", "method", "data", "marker share", "pointing", "vs random", "vs centre", "vs edge", "AUC",
                  title=f"Planted shortcut: {int(rows[0]['n_images']) if rows else 0} marked test images, maps of the "
                        "shortcut class (verdicts Holm-corrected)")
    for r in rows:
        versus = [("" if str(r.get(f"minus_{ref}_verdict", "")) in ("", "nan") else
                   f"{float(r[f'minus_{ref}']):+.3f} {r[f'minus_{ref}_verdict']}") for ref in REFERENCES]
        auc = _ci(r, "auc") + ("" if str(r.get("auc_verdict", "")) in ("", "nan") else f" {r['auc_verdict']}")
        table.add_row(str(r["model"]), str(r["method"]), str(r["data"]), _ci(r, "marker_share"), _ci(r, "pointing"),
                      *versus, auc)
    return table


def shortcut_sentences(rows: list[dict], reality_rows: list[dict], class_name: str) -> list[str]:
    """What the tests of one benchmark support, in words (verdicts Holm-corrected over the call's family):
    per model, whether the shortcut is real (accuracy on the class's unmarked images and the flip rate,
    shortcut model against clean model), and per method whether its maps put more relevance on the
    marker than every reference does and whether they tell the two models apart (the AUC)."""
    sentences = []
    word = {"first": "higher for the shortcut model", "second": "lower for the shortcut model",
            "cannot decide": "cannot decide"}
    for model in dict.fromkeys(r["model"] for r in reality_rows):
        mine = {r["measure"]: r for r in reality_rows if r["model"] == model}
        parts = []
        for key, what in (("class_accuracy", f"accuracy on unmarked {class_name} images"),
                          ("flip_rate", f"flip rate to {class_name} when marked")):
            r = mine.get(key)
            if r is None or str(r.get("verdict", "")) in ("", "nan"):
                continue
            parts.append(f"{what} {float(r['shortcut']):.3f} against {float(r['clean']):.3f} "
                         f"({float(r['difference']):+.3f} [{float(r['difference_low']):+.3f}, "
                         f"{float(r['difference_high']):+.3f}]: {word.get(r['verdict'], r['verdict'])})")
        if parts:
            sentences.append(f"{model}: is the shortcut real? {'; '.join(parts)}.")
    for model in dict.fromkeys(r["model"] for r in rows):
        found, missed, apart, reversed_, undecided = [], [], [], [], []
        for r in rows:
            if r["model"] != model or r["method"] in REFERENCES:
                continue
            if r["data"] == "shortcut":
                above = all(r.get(f"minus_{ref}_verdict") == "first" for ref in REFERENCES)
                (found if above else missed).append(f"{r['method']} {float(r['marker_share']):.2f}")
                auc = f"{r['method']} {float(r['auc']):.2f} [{float(r['auc_low']):.2f}, {float(r['auc_high']):.2f}]"
                {"first": apart, "second": reversed_}.get(r.get("auc_verdict"), undecided).append(auc)
        if found:
            sentences.append(f"{model}: on the shortcut model's maps, {', '.join(found)} of the positive relevance "
                             "lies on the marker, more than every reference (random, centre, edge).")
        if missed:
            sentences.append(f"{model}: not above every reference on the shortcut model: {', '.join(missed)}.")
        if apart:
            sentences.append(f"{model}: the marker's share tells the shortcut model from the clean one on the same "
                             f"marked images (AUC): {', '.join(apart)}.")
        if reversed_:
            sentences.append(f"{model}: the shortcut model's maps put less of their relevance on the marker than the "
                             f"clean model's (AUC below 0.5): {', '.join(reversed_)}.")
        if undecided:
            sentences.append(f"{model}: cannot tell the two models apart by the marker's share (AUC): "
                             f"{', '.join(undecided)}.")
    return sentences
