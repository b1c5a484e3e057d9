"""Explain image files with any model: `xtl explain photo.jpg --model timm:resnet50 --method gradcam`.

For each image, in `out/<name>/`:
- `<method>.png`: the map over the image (`xtl.explain.drawing`: signed methods zero-centred);
- `<method>.npy`: the raw map on the method's own grid (float32, sign kept);
- `figure.png`: the image, every method side by side (each tile names the class it explains) and
  the model's top-5 probabilities;
and `out/predictions.csv`: per image the top-5 classes with their probabilities and the class
explained. Files of other methods from an earlier call are kept; a file is never half-written.
Calls may share `out`, one after another or at once: each image folder names its image
(`image.txt`), so an image of another call that has the same name gets a folder of its own
(`photo_2`), and `predictions.csv` keeps the rows of the images this call did not explain (it is
merged under a lock on `out`).

The model is a run folder (its best model, class names and preprocessing), or a name of the
registry (`xtl models`), `timm:NAME`, `torchvision:NAME` or `hf:REPO` with its pretrained head kept
(ImageNet class names; a Hugging Face model's own labels). Images are resized so that the shorter
side is the model's input size, then centre-cropped to a square.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xtl.device import resolve_device
from xtl.errors import XtlError
from xtl.explain import METHODS, explain, methods_for
from xtl.explain.base import get_method
from xtl.io import atomic_path, read_csv, write_csv, write_text
from xtl.models import ModelDescription, class_probabilities, describe_model

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageModel:
    """A model ready for image files: eval mode on its device, its description, preprocessing and class names."""

    model: nn.Module
    spec: ModelDescription
    preprocess: object  # uint8 [B, 3, S, S] -> model input
    class_names: list[str]
    device: torch.device
    source: str


def image_paths(inputs: list[Path], exclude: Path | None = None) -> list[Path]:
    """Image files given and the images in folders given (recursively, sorted); one line for a
    path that does not exist (or a symbolic link to nothing) or a folder without images. Anything
    else given by name (a pipe, a file that is not an image) is kept: reading it names it, and it is
    skipped (`explain_files`). Files under `exclude` (the output folder, when it is inside an input
    folder) are not inputs: a second call would otherwise explain the first one's overlays."""
    found: list[Path] = []
    outside = None if exclude is None else Path(exclude).resolve()
    for path in map(Path, inputs):
        if outside is not None and path.is_dir() and (outside == path.resolve() or path.resolve().is_relative_to(outside)):
            raise XtlError(f"option --out: {exclude} holds the input folder {path}: the overlays would be written among "
                           "the images; give a folder of its own (one inside the input folder is fine)")

    def wanted(p: Path) -> bool:
        if not (p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            return False
        return outside is None or not p.resolve().is_relative_to(outside)

    for path in map(Path, inputs):
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if wanted(p))
            if not inside:
                raise XtlError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found += inside
        elif path.exists():
            found.append(path)
        elif path.is_symlink():
            raise XtlError(f"image {path} is a symbolic link to {os.readlink(path)}, which does not exist")
        else:
            raise XtlError(f"image {path} does not exist")
    return found


def read_image(path: Path, size: int) -> torch.Tensor:
    """uint8 [3, size, size]: the centre square (the shorter side's length), resized to `size`
    (antialiased). Decoded as training images are (`xtl.data.sources.decode_image`: CMYK, 16-bit,
    palette and alpha to 8-bit RGB, EXIF rotation applied, decompression bombs refused); one line
    naming the file when it is not an image. Cropping first keeps an extreme shape (20,000 x 20) as
    cheap as a square: resizing its short side first would make a 224,000 x 224 image."""
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    from xtl.data.sources import decode_image

    tensor = pil_to_tensor(decode_image(path))
    side = min(tensor.shape[-2:])
    return resize(center_crop(tensor, [side, side]), [size, size], antialias=True)


def load_image_model(model: str, device: str | None = None, weights: str | Path | None = None) -> ImageModel:
    """A run folder, or a registry / timm: / torchvision: / hf: name with its pretrained head kept."""
    from xtl.runs import RunDir

    path = Path(model)
    if path.is_dir() and (path / "config.yaml").is_file():
        run = RunDir(path)
        run.read()
        where = resolve_device(device, run.config().accelerator)
        net, spec = run.load_model(where)
        return ImageModel(net.eval(), spec, run.preprocess(), list(run.class_names), where, str(path))
    if path.exists() and ":" not in model:
        raise XtlError(f"option --model: {path} is not a run folder (it has no config.yaml)")
    from xtl.models import build_model, preprocessing

    where = resolve_device(device)
    net, spec = build_model(model, None, pretrained=True, weights=weights)
    net = net.eval().to(where)
    names = class_names_of(net)
    if not names:
        raise XtlError(f"option --model: {model} has no classification head (it outputs features, not class "
                       f"scores), so there is no class to explain; fine-tune it first (xtl finetune --model {model}), "
                       "or pass a run folder")
    return ImageModel(net, spec, preprocessing(spec=spec), names, where, model)


def class_names_of(model: nn.Module) -> list[str]:
    """The class names of a pretrained head: a Hugging Face model's own labels, ImageNet's names for
    1,000 (or timm's ImageNet-21k subsets) classes, else `class k`; none for a model without a head
    (timm's `num_classes=0`, an identity head: its outputs are features)."""
    from xtl.explain.base import logits_model

    description = describe_model(model)
    n = _out_features(model, description)
    inner = getattr(model, "hf", model)
    labels = getattr(getattr(inner, "config", None), "id2label", None)
    if labels and n is not None and len(labels) == n:
        return [str(labels[k]) for k in range(n)]
    if n is not None:
        names = _imagenet_names(logits_model(model), n)
        if names is not None:
            return names
    return [f"class {k}" for k in range(n or 0)]


def _out_features(model: nn.Module, description: ModelDescription) -> int | None:
    from xtl.models import submodule

    try:
        head = submodule(model, description.classifier) if description.classifier else None
    except (AttributeError, IndexError, TypeError):
        head = None
    if isinstance(head, nn.Linear):
        return head.out_features
    if getattr(model, "num_classes", None) == 0 or isinstance(head, nn.Identity):
        return 0  # headless: a backbone whose outputs are features
    if head is not None and getattr(head, "out_channels", None):  # a 1 x 1 convolution head (SqueezeNet)
        return int(head.out_channels)
    return None


def _imagenet_names(model: nn.Module, n: int) -> list[str] | None:
    try:  # timm knows its own label sets (1k, 21k, 12k, 22k) offline
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model) if hasattr(model, "pretrained_cfg") else ("imagenet-1k" if n == 1000 else None)
        if subset:
            info = ImageNetInfo(subset)
            if info.num_classes() == n:  # "common newt, Triturus vulgaris" -> "common newt"
                return [info.index_to_description(k).split(",")[0].strip() for k in range(n)]
    except Exception:  # an older timm: torchvision's list below
        pass
    if n == 1000:
        from torchvision.models import ResNet50_Weights

        return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    return None


def parse_target(target: str, class_names: list[str]) -> int | None:
    """--target for image files: `predicted` (None), a class index or a class name."""
    if target == "predicted":
        return None
    if target.lstrip("-").isdigit():
        k = int(target)
        if not 0 <= k < len(class_names):
            raise XtlError(f"option --target: class {k} does not exist (0 to {len(class_names) - 1})")
        return k
    lowered = [name.lower() for name in class_names]
    if target.lower() in lowered:
        return lowered.index(target.lower())
    raise XtlError(f"option --target must be predicted, a class index or a class name of the model, not '{target}'")


def unique_names(paths: list[Path]) -> list[str]:
    """One folder name per image: its stem, with its parent folder's name (then a number) when stems
    repeat; control characters (a newline in a file name) become `_`, so every folder name is one line."""
    def clean(text: str) -> str:
        return re.sub(r"[\x00-\x1f\x7f]", "_", text)

    stems = [clean(p.stem) for p in paths]
    names = [f"{clean(p.parent.name)}_{stem}" if stems.count(stem) > 1 else stem for p, stem in zip(paths, stems)]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


@dataclass
class ExplainedFiles:
    """What `explain_files` did: the per-image folders written, and each image skipped with its reason."""

    folders: list[Path]
    skipped: list[tuple[Path, str]]


def explain_files(inputs: list[Path], model: str, methods: list[str] | None, out: Path, device: str | None = None,
                  target: str = "predicted", batch_size: int = 8, weights: str | Path | None = None,
                  loaded: ImageModel | None = None, on_skip=None) -> ExplainedFiles:
    """Explain every image of `inputs` with every method in `methods` (default: the family's default).

    A file that cannot be read as an image is skipped: `on_skip(path, message)` is called (default:
    the line `skipped: <message>` on stderr) and the others are explained. When none can be, one
    `XtlError` says so and nothing is written. Paths that do not exist, and folders without images,
    are refused before any model is loaded."""
    if batch_size < 1:
        raise XtlError(f"option --batch-size must be at least 1, not {batch_size}")
    paths = image_paths(inputs, exclude=out)
    for method in methods or []:
        get_method(method)  # unknown names first, before any model is loaded
    image_model = loaded or load_image_model(model, device, weights)
    chosen = _applicable(image_model, methods)
    explained = parse_target(target, image_model.class_names)
    names = unique_names(paths)
    size = image_model.spec.input_size
    rows: list[dict] = []
    folders, skipped = [], []
    if on_skip is None:
        def on_skip(path: Path, message: str) -> None:
            print(f"skipped: {message}", file=sys.stderr, flush=True)
    for start in range(0, len(paths), batch_size):
        part, names_of_part, decoded = [], [], []
        for k, path in enumerate(paths[start:start + batch_size]):
            try:
                decoded.append(read_image(path, size))
            except XtlError as err:
                skipped.append((path, str(err)))
                on_skip(path, str(err))
                continue
            part.append(path)
            names_of_part.append(names[start + k])
        if not part:
            continue
        images = torch.stack(decoded)
        x = image_model.preprocess(images.to(image_model.device))
        probabilities = class_probabilities(image_model.model, x).cpu()
        # the class shown as predicted is the class explained: one forward pass decides both
        targets = probabilities.argmax(1).to(image_model.device) if explained is None else explained
        explanations = {m: explain(image_model.model, x, targets, m, spec=image_model.spec) for m in chosen}
        for i, path in enumerate(part):
            folder = _own_folder(out, names_of_part[i], path)
            _write_image_outputs(folder, images[i], probabilities[i], explanations, i, image_model.class_names, path)
            folders.append(folder)
            rows.append(_prediction_row(path, probabilities[i], explanations[chosen[0]].targets[i], image_model.class_names))
    if not folders:
        raise XtlError(f"none of the {len(paths)} image file(s) could be explained: every one was skipped "
                       "(each is named above)")
    _merge_predictions(out, rows)
    return ExplainedFiles(folders, skipped)


IMAGE_MARK = "image.txt"


def _own_folder(out: Path, name: str, path: Path) -> Path:
    """The folder of image `path` under `out`: `name`, or `name_2`, `name_3`, ... where a folder of that
    name holds another image's outputs (an earlier or concurrent call) or files xtl did not write.
    Made and marked (`image.txt`: the image's resolved path) under a lock on `out`."""
    mark = str(path.resolve())
    with _locked(out):
        for k in range(1, 10_000):
            folder = out / (name if k == 1 else f"{name}_{k}")
            if not folder.exists():
                folder.mkdir(parents=True)
                write_text(folder / IMAGE_MARK, mark + "\n")
                return folder
            owner = folder / IMAGE_MARK
            if owner.is_file() and owner.read_text().rstrip("\n") == mark:
                return folder
    raise XtlError(f"option --out: {out} holds 10,000 folders named {name}; give another --out")


def _merge_predictions(out: Path, rows: list[dict]) -> None:
    """`predictions.csv` with this call's rows, keeping those of images other calls explained (read
    and written under the lock on `out`, so two calls at once lose neither's rows)."""
    with _locked(out):
        path = out / "predictions.csv"
        try:
            kept = read_csv(path, missing_ok=True)
        except XtlError:  # not a predictions table (damaged, or not ours): replaced, as before
            kept = []
        now = {row["image"] for row in rows}
        kept = [row for row in kept if row.get("image") not in now and "explained" in row]
        merged = kept + rows
        columns = list(dict.fromkeys(key for row in merged for key in row))
        write_csv(path, merged, columns)


@contextmanager
def _locked(folder: Path):
    """An exclusive lock on `folder` itself (flock on the directory: no lock file is left behind)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _applicable(image_model: ImageModel, methods: list[str] | None) -> list[str]:
    from xtl.explain.runner import DEFAULT_METHOD

    family = image_model.spec.family
    if not methods:
        return [DEFAULT_METHOD[family]]
    chosen = [m for m in methods if family in METHODS[m].families]
    if not chosen:
        raise XtlError(f"option --method: none of {', '.join(methods)} applies to {family.upper()} model "
                       f"{image_model.spec.name}; those that do: {', '.join(methods_for(family))}")
    return chosen


def _write_image_outputs(folder: Path, image: torch.Tensor, probabilities: torch.Tensor, explanations: dict,
                         i: int, class_names: list[str], path: Path) -> None:
    from xtl.explain import drawing
    from xtl.explain.gallery import GalleryRow, render_gallery

    folder.mkdir(parents=True, exist_ok=True)
    for method, e in explanations.items():
        raw = e.raw[i].cpu().float().numpy()
        with atomic_path(folder / f"{method}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, raw)
        drawing.save_overlay(folder / f"{method}.png", image, e.raw[i], signed=e.signed)
    import textwrap

    top = int(probabilities.argmax())
    caption = textwrap.fill(path.name, 26) + "\n" + textwrap.fill(f"predicted: {class_names[top]} ({float(probabilities[top]):.2f})", 26)
    row = GalleryRow(image=image.cpu(), label=-1, probabilities=probabilities,
                     maps={m: e.raw[i].cpu() for m, e in explanations.items()},
                     caption=caption,
                     targets={m: int(e.targets[i]) for m, e in explanations.items()},
                     signed={m: e.signed for m, e in explanations.items()})
    render_gallery([row], class_names, folder / "figure.png", title=path.name)


def _prediction_row(path: Path, probabilities: torch.Tensor, target: torch.Tensor, class_names: list[str]) -> dict:
    values, classes = probabilities.topk(min(5, len(class_names)))
    row = {"image": str(path), "explained": class_names[int(target)]}
    for k, (p, c) in enumerate(zip(values.tolist(), classes.tolist()), start=1):
        row[f"top{k}"] = class_names[c]
        row[f"p{k}"] = f"{p:.4f}"
    return row
