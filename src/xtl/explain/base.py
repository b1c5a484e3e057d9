"""The shared core of every explanation method: targets, the result type, the method registry."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from xtl.errors import XtlError
from xtl.models import ModelDescription


@dataclass(repr=False)
class Explanation:
    """Maps of one batch: `raw` on the method's own grid (its sign kept where the method has one:
    `signed`), `maps` at input size in [0, 1] per image (min-max; a flat map is all zeros).

    `save(path)` writes one safetensors file and `Explanation.load(path)` reads it back.

    In a notebook it displays itself (`_repr_html_`: a header line and a grid of overlays; `_repr_png_`);
    `plot()` returns that grid as a matplotlib Figure and `show()` shows it. `images` is what the
    overlays are drawn on: a uint8 copy [B, 3, H, W] on the CPU of the explained images, mapped back
    to pixels with the model description's mean and std, made when drawn from the `inputs` that
    `explain()` keeps by reference; None where unknown (a loaded file), and then the maps are drawn
    alone or over `images=` given to `plot`."""

    method: str
    targets: torch.Tensor  # int64 [B], the class each map explains (0 for a callable target)
    raw: torch.Tensor  # float32 [B, h, w]: token grid (ViT) or feature/pixel grid (CNN)
    maps: torch.Tensor  # float32 [B, H, W], upsampled bilinearly, min-max normalised per image
    signed: bool = False  # raw keeps a sign: draw it zero-centred (xtl.explain.drawing)
    # what the overlays are drawn on: the explained (preprocessed) images and the description whose mean
    # and std map them back to pixels, kept by reference (no copy, no transfer: `images` converts them
    # only when something is drawn)
    inputs: torch.Tensor | None = field(default=None, compare=False)
    description: ModelDescription | None = field(default=None, compare=False)

    @property
    def images(self) -> torch.Tensor | None:
        """uint8 [B, 3, H, W] on the CPU: the explained images as pixels (`display_copy`), or None."""
        if self.inputs is None or self.description is None:
            return None
        return display_copy(self.inputs, self.description)

    def __len__(self) -> int:
        return len(self.targets)

    # ------------------------------------------------------------------------- display (notebooks)

    def _targets_text(self, limit: int = 8) -> str:
        values = [int(t) for t in self.targets[:limit + 1].tolist()]
        shown = ", ".join(str(v) for v in values[:limit])
        return f"[{shown}{', ...' if len(self.targets) > limit else ''}]"

    def _grid_text(self) -> str:
        h, w = tuple(self.raw.shape[-2:]) if self.raw.ndim >= 2 else (0, 0)
        return f"{h}x{w}"

    def __repr__(self) -> str:
        return (f"Explanation(method={self.method!r}, images={len(self)}, map={self._grid_text()}, "
                f"signed={self.signed}, targets={self._targets_text()})")

    def plot(self, ax=None, *, images=None, alpha: float = 0.5, max_images: int = 16, columns: int | None = None,
             figsize: tuple[float, float] | None = None, title: str | None = None, _detached: bool = False):
        """The maps as a grid of tiles, one per image (the first `max_images`), and a colour bar:
        each map over its image when there are images (`images=`: uint8 or [0, 1] float images
        [B, 3, H, W], else the ones kept by `explain()`), else the map alone. Signed maps are drawn on
        the diverging scale centred at 0, unsigned ones from their minimum to their maximum
        (`xtl.explain.drawing`). Returns the matplotlib Figure.

        `ax`: one Axes (the tiles are drawn side by side in it, as one picture) or a sequence of Axes
        (one tile each); None: a new figure of `columns` tiles a row (default: up to 8) and `figsize`."""
        from xtl.explain import drawing

        if max_images < 1:
            raise XtlError(f"plot(): max_images must be at least 1, not {max_images}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise XtlError(f"plot(): alpha must be in [0, 1], not {alpha}")
        shown = min(len(self), max_images)
        pictures = self.images if images is None else images
        if pictures is not None and len(pictures) < shown:
            raise XtlError(f"plot(): images= holds {len(pictures)} images for {len(self)} maps; give one per map")
        raw = self.raw.detach().float().cpu()
        tiles = []
        for i in range(shown):
            if pictures is not None:
                image = pictures[i]
                size = drawing.to_rgb(image).shape[:2]
                side = max(1.0, 160 / min(size))  # small images (CIFAR's 32 px) are drawn larger
                tiles.append(drawing.overlay(image, raw[i], signed=self.signed, alpha=alpha,
                                             size=(round(size[0] * side), round(size[1] * side))))
            else:
                tiles.append(None)
        name, norm = drawing.colormap_for(self.signed)
        legend = ("signed: diverging colour map centred at 0 (red: for the class, blue: against)" if self.signed
                  else "unsigned: colour map from each map's minimum to its maximum")
        heading = title if title is not None else (
            f"{self.method}: {len(self)} image{'s' if len(self) != 1 else ''}"
            + (f" (first {shown} shown)" if shown < len(self) else "") + f", map grid {self._grid_text()}\n{legend}")
        labels = [f"target {int(t)}" + (" (flat map)" if drawing.is_flat(raw[i]) else "")
                  for i, t in enumerate(self.targets[:shown].tolist())]

        def draw(axis, i):
            if tiles[i] is not None:
                axis.imshow(tiles[i])
            else:
                axis.imshow(drawing.scaled(raw[i], self.signed), cmap=name, norm=norm, interpolation="nearest")
            axis.set_xlabel(labels[i], fontsize=9)
            axis.set_xticks([])
            axis.set_yticks([])

        mappable = _scalar_mappable(name, norm)
        if ax is not None:
            axes = list(ax.flat) if hasattr(ax, "flat") else list(ax) if isinstance(ax, (list, tuple)) else None
            if axes is not None:
                if len(axes) < shown:
                    raise XtlError(f"plot(): {len(axes)} axes for {shown} tiles; give one Axes per tile, or one Axes")
                for i in range(shown):
                    draw(axes[i], i)
                figure = axes[0].figure
                figure.colorbar(mappable, ax=axes[:shown], label=drawing.colour_bar_label(self.signed))
            else:
                _draw_strip(ax, tiles, raw[:shown], self.signed, labels)
                figure = ax.figure
                bar = figure.colorbar(mappable, ax=ax, shrink=0.9)
                bar.set_label(drawing.colour_bar_label(self.signed), fontsize=7)
                bar.ax.tick_params(labelsize=7)
            if title is not None:
                figure.suptitle(title, fontsize=10)
            return figure
        columns = max(1, min(columns or 8, shown))
        rows = math.ceil(shown / columns)
        figsize = figsize or (1.9 * columns + 1.6, 1.9 * rows + 0.9)
        figure = _new_figure(figsize, _detached)
        grid = figure.subplots(rows, columns, squeeze=False)
        for k, axis in enumerate(grid.flat):
            if k < shown:
                draw(axis, k)
            else:
                axis.axis("off")
        bar = figure.colorbar(mappable, ax=grid, shrink=min(1.0, 0.9 if rows > 1 else 1.0), aspect=20)
        bar.set_label(drawing.colour_bar_label(self.signed), fontsize=8)
        bar.ax.tick_params(labelsize=8)
        figure.suptitle(heading, fontsize=10)
        return figure

    def _png(self, dpi: int = 72) -> bytes:
        import io

        figure = self.plot(_detached=True)  # not one pyplot manages: a notebook does not draw it twice
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi)
        return buffer.getvalue()

    def _repr_png_(self) -> bytes:
        """PNG bytes of `plot()`: what a notebook shows for the explanation."""
        return self._png()

    def _repr_html_(self) -> str:
        """A header line (method, images, map grid, signed or unsigned, targets) and the overlays inline."""
        import base64
        import html

        header = (f"<b>{html.escape(self.method)}</b>: {len(self)} image{'s' if len(self) != 1 else ''}, "
                  f"map grid {self._grid_text()}, {'signed' if self.signed else 'unsigned'}, "
                  f"targets {html.escape(self._targets_text())}")
        image = base64.b64encode(self._png()).decode("ascii")
        return f'<div><div>{header}</div><img src="data:image/png;base64,{image}" alt="{html.escape(repr(self))}"/></div>'

    def show(self) -> None:
        """Show the overlays: in a notebook as its output (`_repr_html_`), elsewhere with `pyplot.show()`
        (which shows nothing under the Agg backend, where `plot().savefig(...)` is the way)."""
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except ImportError:
            shell = None
        if shell is not None and getattr(shell, "kernel", None) is not None:
            from IPython.display import display

            display(self)
            return
        from xtl.io import pyplot

        self.plot()
        pyplot().show()

    def save(self, path: str | Path) -> Path:
        """Write `raw`, `maps` and `targets` to one safetensors file (atomically), the method and
        `signed` in its metadata."""
        from safetensors.torch import save_file

        from xtl.io import atomic_path

        path = Path(path)
        tensors = {"raw": self.raw.detach().float().cpu().contiguous(), "maps": self.maps.detach().float().cpu().contiguous(),
                   "targets": self.targets.detach().long().cpu().contiguous()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"method": self.method, "signed": str(self.signed).lower()})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Explanation":
        """Read what `save` wrote; one line naming the file when it is not such a file."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in ("raw", "maps", "targets")}
        except Exception as err:
            raise XtlError(f"explanation file {path} cannot be read: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from None
        return cls(method=metadata.get("method", ""), signed=metadata.get("signed") == "true", **tensors)


def _new_figure(figsize, detached: bool = False):
    """A figure: managed by pyplot (`xtl.io.pyplot`, Agg unless a backend was chosen) for `plot()`,
    a bare `matplotlib.figure.Figure` for the notebook's PNG (never shown twice, never left open)."""
    if detached:
        from matplotlib.figure import Figure

        return Figure(figsize=figsize, layout="constrained")
    from xtl.io import pyplot

    return pyplot().figure(figsize=figsize, layout="constrained")


def _scalar_mappable(name: str, norm):
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(cmap=name, norm=norm)


def _draw_strip(ax, tiles, raw, signed: bool, labels) -> None:
    """The tiles side by side in one Axes, a white gap between them, their labels underneath."""
    import numpy as np

    from xtl.explain import drawing

    name, norm = drawing.colormap_for(signed)
    import matplotlib

    pictures = [t if t is not None else
                (matplotlib.colormaps[name](norm(drawing.scaled(raw[i], signed)))[..., :3] * 255).round().astype(np.uint8)
                for i, t in enumerate(tiles)]
    height = max(p.shape[0] for p in pictures)
    pictures = [drawing.to_rgb(p, (height, round(p.shape[1] * height / p.shape[0]))) for p in pictures]
    gap = np.full((height, max(2, height // 20), 3), 255, dtype=np.uint8)
    parts, centres, x = [], [], 0
    for p in pictures:
        centres.append(x + p.shape[1] / 2)
        parts += [p, gap]
        x += p.shape[1] + gap.shape[1]
    ax.imshow(np.concatenate(parts[:-1], axis=1))
    ax.set_xticks(centres, labels, fontsize=8)
    ax.set_yticks([])


class ExplainMethod:
    """One method = one small subclass that says how the raw map is made (`attribute`).

    Its options are the keyword parameters of `attribute` after `spec` (`option_defaults`):
    `explain()` checks them once, by name and by the type of their defaults."""

    name: ClassVar[str]
    families: ClassVar[frozenset[str]] = frozenset({"cnn", "vit", "other"})
    class_discriminative: ClassVar[bool] = True  # does the map depend on the target class?
    gradient_based: ClassVar[bool] = True  # sensitive to the weights (model-randomisation check)
    signed: ClassVar[bool] = False  # raw maps keep a sign (evidence for and against): drawn zero-centred
    # raw maps are a relevance decomposition of the target logit at the pixels (LRP-type): their sum is
    # the part of the logit that reaches the pixels (`xtl.faithfulness` reports it as logit_share)
    decomposes_logit: ClassVar[bool] = False
    callable_targets: ClassVar[bool] = True  # can explain any scalar of the output (a callable target)
    reference: ClassVar[str] = ""  # the paper, in one line

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription, **options
    ) -> torch.Tensor:
        """Raw relevance [B, h, w] of `images` for `targets`."""
        raise NotImplementedError

    def option_defaults(self) -> dict[str, Any]:
        """Every option of the method with its default."""
        return keyword_defaults(self.attribute, skip=4)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """`options` if every one is known and of its default's type; else one line naming the known ones."""
        known = self.option_defaults()
        for key, value in options.items():
            if key not in known:
                listed = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
                raise XtlError(f"method {self.name} has no option '{key}'; its options: {listed}")
            check_option_type(self.name, key, value, known[key])
        return options

    def summary(self) -> str:
        """One paragraph: families, options with defaults, reference (for help() and --list-methods)."""
        families = ("any model" if {"cnn", "vit", "other"} <= self.families
                    else ", ".join({"cnn": "CNN", "vit": "ViT", "other": "other"}[f] for f in sorted(self.families)))
        options = ", ".join(f"{k}={v!r}" for k, v in self.option_defaults().items()) or "none"
        doc = (type(self).__doc__ or "").strip().split("\n\n")[0]
        doc = " ".join(line.strip() for line in doc.splitlines())
        sign = "signed" if self.signed else "non-negative"
        return f"{self.name} [{families}; {sign}] {doc} Options: {options}." + (f" Reference: {self.reference}." if self.reference else "")


def keyword_defaults(function: Callable, skip: int) -> dict[str, Any]:
    """The keyword parameters of `function` after its first `skip` ones, with their defaults."""
    parameters = list(inspect.signature(function).parameters.values())[skip:]
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in parameters
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def check_option_type(method: str, key: str, value: Any, default: Any) -> None:
    """An option must have its default's type (an int is a float too); None defaults take anything."""
    if default is None or value is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        kind = ("a finite " if isinstance(default, float) else "an " if isinstance(default, int) and not isinstance(default, bool)
                else "a ") + type(default).__name__
        raise XtlError(f"option {key} of method {method} must be {kind} like its default {default!r}, not {value!r}")


def check_counts(method: str, **counts: int) -> None:
    """Each count option (samples, masks, a batch) of `method` is at least 1 and at most `MAX_COUNT`
    (each is a forward or backward pass per image: a larger number is a typo, not a setting)."""
    from xtl.settings import MAX_COUNT

    for option, value in counts.items():
        if value < 1:
            raise XtlError(f"option {option} of method {method} must be at least 1, not {value}")
        if value > MAX_COUNT:
            raise XtlError(f"option {option} of method {method} must be at most {MAX_COUNT:,} (each is a pass through "
                           f"the model per image), not {value:,}")


METHODS: dict[str, ExplainMethod] = {}


def register_method(cls: type[ExplainMethod]) -> type[ExplainMethod]:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> ExplainMethod:
    if name not in METHODS:
        raise XtlError(f"unknown explanation method '{name}'; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@torch.no_grad()
def predicted_classes(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).argmax(1)


def upsample_and_normalise(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling to the input size, then min-max to [0, 1] per image (a flat map -> 0)."""
    maps = F.interpolate(raw.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)
    flat = maps.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1)
    span = (flat.max(1).values.view(-1, 1, 1) - low)
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, N] patch values (CLS and other prefix tokens already dropped) -> [B, h, w], row-major."""
    return tokens.reshape(tokens.shape[0], height, width)


def patch_grid(spec: ModelDescription, images: torch.Tensor) -> tuple[int, int]:
    if spec.patch_size is None:
        raise XtlError(f"model {spec.name} has no patch grid")
    return images.shape[-2] // spec.patch_size, images.shape[-1] // spec.patch_size


# ----------------------------------------------------------------------------- targets and outputs

Target = Union[int, Sequence[int], torch.Tensor, Callable[[torch.Tensor], torch.Tensor], None]


class ScoreOf(nn.Module):
    """`model` whose output is `score(logits)` as one column [B, 1]: any callable target becomes
    class 0 of this model. Attribute lookups fall through to `model`, so that dotted layer paths
    ("layer4") and attributes such as `num_prefix_tokens` still resolve."""

    def __init__(self, model: nn.Module, score: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.score = score

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        value = self.score(self.model(images))
        if not isinstance(value, torch.Tensor) or value.reshape(len(images), -1).shape[1] != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise XtlError(f"a callable target must return one number per image ([B]), not {shape}")
        return value.reshape(len(images), 1)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def logits_model(model: nn.Module) -> nn.Module:
    """A model whose forward returns logits: Hugging Face models (which return an output object)
    are wrapped in `HFClassifier`; every other model is returned as it is."""
    from xtl.models.description import is_hf_model
    from xtl.models.hf import HFClassifier

    return HFClassifier(model) if is_hf_model(model) else model


def resolve_targets(
    model: nn.Module, images: torch.Tensor, targets: Target, method: ExplainMethod, spec: ModelDescription
) -> tuple[nn.Module, torch.Tensor]:
    """(the model to explain, int64 targets [B] on the images' device) for any kind of target:
    None (each image's predicted class), an int (the same class for every image), a list or
    tensor (one class per image) or a callable on the model output returning [B]."""
    n = images.shape[0]
    if callable(targets) and not isinstance(targets, torch.Tensor):
        if not method.callable_targets:
            raise XtlError(f"method {method.name} explains a class of the model, not a callable target; "
                           "pass a class index (an int, a list or a tensor)")
        return ScoreOf(model, targets), torch.zeros(n, dtype=torch.long, device=images.device)
    if targets is None:
        return model, predicted_classes(model, images)
    if isinstance(targets, bool) or not isinstance(targets, (int, list, tuple, torch.Tensor)):
        raise XtlError(f"targets must be None, an int, a list or tensor of ints, or a callable, not {type(targets).__name__}")
    tensor = torch.as_tensor(targets, device=images.device)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise XtlError(f"targets must be class indices (integers), not {tensor.dtype}")
    tensor = tensor.long()
    if tensor.ndim == 0:
        tensor = tensor.expand(n).clone()
    if tensor.shape != (n,):
        raise XtlError(f"targets must give one class per image: {n} images, targets of shape {tuple(tensor.shape)}")
    n_classes = _n_classes(model, spec)
    if n_classes is not None and len(tensor) and not (0 <= int(tensor.min()) and int(tensor.max()) < n_classes):
        bad = int(tensor.min()) if int(tensor.min()) < 0 else int(tensor.max())
        raise XtlError(f"target class {bad} does not exist: {spec.name} has {n_classes} classes (0 to {n_classes - 1})")
    return model, tensor


def _n_classes(model: nn.Module, spec: ModelDescription) -> int | None:
    if not spec.classifier:
        return None
    from xtl.models import submodule

    try:
        head = submodule(model, spec.classifier)
    except (AttributeError, IndexError, TypeError):
        return None
    return head.out_features if isinstance(head, nn.Linear) else None


def as_batch(images: torch.Tensor) -> torch.Tensor:
    """A preprocessed float batch [B, C, H, W] (one image [C, H, W] becomes a batch of one)."""
    if not isinstance(images, torch.Tensor):
        raise XtlError(f"images must be a tensor [B, 3, H, W], not {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise XtlError(f"images must be a batch [B, 3, H, W] (or one image [3, H, W]), not of shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise XtlError(f"images are {images.dtype}: explain() takes preprocessed float images; "
                       "convert them with xtl.models.preprocessing(model)(images)")
    if images.shape[0] == 0:
        raise XtlError("images: the batch is empty")
    return images


UNNORMALISED_MAX = 10.0  # preprocessed images lie within a few units of 0; pixels of 0..255 are far above


def model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    """(device, dtype) of the model's first floating-point parameter (or buffer); None when it has none."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None


def prepare_images(model: nn.Module, images: torch.Tensor, caller: str = "explain()") -> torch.Tensor:
    """`images` (`as_batch`'s) fit for `model`: another float dtype (float64, bf16, float16) is converted to
    the dtype of the model's parameters (float32 for most models) for the call, without a message;
    images on another device than the model's parameters are refused in one line naming both (they are
    not moved: a silent copy per call would hide where the time goes); images that look unnormalised
    (largest value above `UNNORMALISED_MAX`, i.e. pixels in 0..255) get one warning per call."""
    placement = model_placement(model)
    if placement is not None:
        device, dtype = placement
        if images.device != device:
            raise XtlError(f"{caller}: images are on {images.device} but the model's parameters on {device}; "
                           f"move them with images.to('{device}')")
        if images.dtype != dtype and dtype.is_floating_point:
            images = images.to(dtype)
    elif images.dtype != torch.float32 and images.dtype in (torch.float64, torch.bfloat16, torch.float16):
        images = images.float()
    if images.numel() and images.device.type != "meta":
        largest = float(images.detach().amax())
        if largest > UNNORMALISED_MAX:
            import warnings

            warnings.warn(f"{caller} takes preprocessed images (normalised with the model's mean and std, values "
                          f"within a few units of 0), but the largest value here is {largest:g}: these look like raw "
                          "pixels in 0..255. Make them with xtl.models.preprocessing(model)(uint8_images).",
                          UserWarning, stacklevel=3)
    return images


def display_copy(images: torch.Tensor, spec: ModelDescription) -> torch.Tensor | None:
    """uint8 [B, 3, H, W] on the CPU: the preprocessed `images` mapped back to pixels with `spec`'s mean and
    std (what `Explanation.plot` draws the maps over); None for images that are not 3-channel."""
    if images.ndim != 4 or images.shape[1] != 3 or len(spec.mean) != 3 or len(spec.std) != 3:
        return None
    with torch.no_grad():
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        pixels = (images.detach().float() * std + mean).clamp(0.0, 1.0)
        return (pixels * 255).round().to(torch.uint8).cpu()


def _is_class_target(target: Any) -> bool:
    """pytorch-grad-cam's `ClassifierOutputTarget(c)` (the logit of class c), or any non-callable object
    with an integer `category`: class `category`."""
    import numbers

    category = getattr(target, "category", None)
    integral = isinstance(category, numbers.Integral) and not isinstance(category, bool) or (
        isinstance(category, torch.Tensor) and category.ndim == 0 and not category.is_floating_point())
    return integral and (type(target).__name__ == "ClassifierOutputTarget" or not callable(target))


def _is_target_object(target: Any) -> bool:
    return (not isinstance(target, (int, bool, torch.Tensor)) and not _is_integer(target)
            and (_is_class_target(target) or callable(target)))


def _is_integer(value: Any) -> bool:
    import numbers

    return isinstance(value, numbers.Integral)


class RowWise:
    """A per-image target in pytorch-grad-cam's style (a callable on one image's output [C], returning
    one number) applied to each row of a batch's output: [B, C] -> [B]."""

    def __init__(self, target: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.target = target

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        values = [self.target(row) for row in logits]
        if not all(isinstance(v, torch.Tensor) for v in values):
            kind = next(type(v).__name__ for v in values if not isinstance(v, torch.Tensor))
            raise XtlError(f"a per-image target must return a tensor (one number for one image's output), not {kind}")
        return torch.stack([v.reshape(-1) for v in values])


def per_image_targets(targets: Any, n: int) -> list | None:
    """Targets given as a list of objects, pytorch-grad-cam's way (`[ClassifierOutputTarget(3)]`, one per
    image or one for all): a list of `n` targets, each a class index (a `ClassifierOutputTarget`) or a
    callable on one image's output; None for every other kind of `targets` (see `resolve_targets`)."""
    if not isinstance(targets, (list, tuple)) or not targets or not any(_is_target_object(t) for t in targets):
        return None
    bad = [t for t in targets if not (_is_target_object(t) or _is_integer(t) and not isinstance(t, bool))]
    if bad:
        raise XtlError(f"targets: a list holds class indices or per-image targets (such as pytorch-grad-cam's "
                       f"ClassifierOutputTarget), not {type(bad[0]).__name__}")
    if len(targets) not in (1, n):
        raise XtlError(f"targets: {len(targets)} per-image targets for {n} images; give one per image (or one for all)")
    items = list(targets) * n if len(targets) == 1 else list(targets)
    return [int(t.category) if _is_class_target(t) else t if callable(t) else int(t) for t in items]
