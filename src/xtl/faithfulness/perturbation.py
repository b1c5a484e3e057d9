"""Score maps by perturbing the images they explain: every step of every image through the model
in large batches.

    scores = score(model, images, labels, maps, steps=10, baseline="zero", batch_size=64)
    scores.curves["deletion"].auc        # [B]

Pixels are ranked by relevance, most relevant first, with a stable sort: equal values keep their
raster order, so an all-equal map masks row by row from the top and the result never depends on
the sort's implementation. ViTs are perturbed pixel by pixel too (their maps are upsampled), so
CNNs and ViTs are scored on one scale. A masked pixel takes the baseline value (`BASELINES`).

The masked inputs are built batch by batch on the device from the ranks, never all at once. The
unperturbed image (fraction 0) and the all-baseline image (fraction 1) are the same for every map
and series, so they go through the model once per image. Results depend on `batch_size` only
through the model's own floating-point summation order (none for models that treat the images
of a batch independently: the tests pin exact equality for 1 and 64 on such a model).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from xtl.errors import XtlError
from xtl.faithfulness.metrics import Curve, get_metrics, metric_curve
from xtl.models import inference_autocast

console = Console(stderr=True)

# ----------------------------------------------------------------------------- what a masked pixel becomes


def _blur(images: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with Petsiuk et al.'s sigma of 5 px at 224 px, scaled to the image size."""
    from torchvision.transforms.v2.functional import gaussian_blur

    sigma = max(0.5, 5.0 * images.shape[-1] / 224)
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * (min(images.shape[-2:]) // 2) - 1)
    return gaussian_blur(images, [kernel, kernel], [sigma, sigma])


BASELINES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "zero": torch.zeros_like,  # 0 after normalisation: the data set's mean colour
    "mean": lambda images: images.mean((2, 3), keepdim=True).expand_as(images).clone(),  # per image and channel
    "blur": _blur,
}


def baseline_inputs(images: torch.Tensor, baseline: str) -> torch.Tensor:
    if baseline not in BASELINES:
        raise XtlError(f"option --baseline must be one of {', '.join(BASELINES)}, not '{baseline}'")
    return BASELINES[baseline](images)


# ----------------------------------------------------------------------------- reference maps


def random_maps(shape: tuple[int, int, int], seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Independent uniform noise per pixel from a seeded CPU generator: the same maps on every device."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def uniform_maps(shape: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """All pixels equally relevant: masked in raster order (the stable sort's tie-breaking)."""
    return torch.zeros(shape, device=device)


# ----------------------------------------------------------------------------- ranking and masking


def relevance_ranks(maps: torch.Tensor) -> torch.Tensor:
    """[B, H, W] maps -> [B, H*W] rank of each pixel (0 = most relevant), ties in raster order."""
    flat = maps.flatten(1).float()
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device, dtype=torch.int32).expand_as(order)
    return torch.empty_like(order, dtype=torch.int32).scatter_(1, order, positions)


def masked_counts(steps: int, n_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of masked fractions 0, 1/steps, ..., 1 and the pixel count masked at each."""
    fractions = torch.arange(steps + 1, dtype=torch.float64) / steps
    return fractions, torch.round(fractions * n_pixels).long()


def masked_inputs(images: torch.Tensor, fill: torch.Tensor, ranks: torch.Tensor,
                  counts: torch.Tensor, most_first: torch.Tensor) -> torch.Tensor:
    """Each image with its `counts` most (or least) relevant pixels replaced by `fill`."""
    n_pixels = ranks.shape[1]
    counts = counts[:, None].to(ranks.device)
    mask = torch.where(most_first[:, None].to(ranks.device), ranks < counts, ranks >= n_pixels - counts)
    return torch.where(mask.view(images.shape[0], 1, *images.shape[-2:]), fill, images)


# ----------------------------------------------------------------------------- forward passes


@dataclass
class Readout:
    probability: torch.Tensor  # [J] softmax of the explained class
    predicted: torch.Tensor  # [J] argmax


@torch.inference_mode()
def forward_logits(model: nn.Module, n_jobs: int, make_inputs: Callable[[slice], torch.Tensor], batch_size: int,
                   advance: Callable[[int], None] = lambda k: None, read: Callable | None = None,
                   bf16: bool | None = None) -> list:
    """Run `make_inputs(batch)` through the model for jobs 0..n_jobs-1, `batch_size` at a time;
    `read(part, logits)` keeps what is needed of each batch (default: the logits, on the CPU).
    `bf16`: bf16 autocast; None = on a GPU (as evaluation predicts, 2-3x the float32 rate), not on the CPU."""
    kept = []
    for start in range(0, n_jobs, batch_size):
        part = slice(start, min(start + batch_size, n_jobs))
        inputs = make_inputs(part)
        with inference_autocast(inputs.device, bf16):
            # channels-last is ~1.4x faster for depthwise CNNs on the CPU and no slower for the others
            logits = model(inputs.contiguous(memory_format=torch.channels_last)).float()
        kept.append(read(part, logits) if read else logits.cpu())
        advance(part.stop - part.start)
    return kept


def predict_classes(model: nn.Module, images: torch.Tensor, batch_size: int = 64, bf16: bool | None = None) -> torch.Tensor:
    """Argmax of the unperturbed images, computed as the scoring computes it."""
    logits = forward_logits(model, images.shape[0], lambda s: images[s], batch_size, bf16=bf16)
    return torch.cat(logits).argmax(1).to(images.device)


def forward_jobs(model: nn.Module, n_jobs: int, make_inputs: Callable[[slice], torch.Tensor],
                 targets: torch.Tensor, batch_size: int, advance: Callable[[int], None], bf16: bool | None = None) -> Readout:
    """Probability of each job's target class and the predicted class."""
    def read(part: slice, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = logits.softmax(1)
        return probs.gather(1, targets[part].to(probs.device)[:, None])[:, 0].cpu(), logits.argmax(1).cpu()

    kept = forward_logits(model, n_jobs, make_inputs, batch_size, advance, read, bf16)
    if not kept:
        return Readout(torch.empty(0), torch.empty(0, dtype=torch.long))
    return Readout(torch.cat([p for p, _ in kept]), torch.cat([c for _, c in kept]))


# ----------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    """Faithfulness of one set of maps: per metric, per-image curves and areas."""

    targets: torch.Tensor  # [B] the class whose probability is read (the class the maps explain)
    curves: dict[str, Curve]
    seconds: float = 0.0  # model time of this map set's perturbed inputs (the shared end points excluded)
    n_forward: int = 0

    def auc_mean(self) -> dict[str, float]:
        return {name: float(curve.auc.mean()) for name, curve in self.curves.items()}


def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor,
          targets: torch.Tensor | None = None, steps: int = 10, baseline: str = "zero", batch_size: int = 64,
          metrics: list[str] | None = None, progress: bool = False, bf16: bool | None = None) -> Scores:
    """Faithfulness of `maps` [B, H, W] for a preprocessed batch `images` [B, 3, H, W].

    `targets`: the class the maps explain (default: the predicted class); deletion and insertion
    read its probability, positive and negative perturbation the accuracy against `labels`.
    `bf16`: forward passes under bf16 autocast; None = on a GPU, not on the CPU.
    """
    return score_maps(model, images, labels, {"maps": maps}, targets, steps, baseline, batch_size,
                      metrics, progress, bf16=bf16)["maps"]


def score_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, maps: Mapping[str, torch.Tensor],
               targets: torch.Tensor | None = None, steps: int = 10, baseline: str = "zero", batch_size: int = 64,
               metrics: list[str] | None = None, progress: bool | Progress = False,
               description: str = "faithfulness", bf16: bool | None = None) -> dict[str, Scores]:
    """`score` for several map sets of the same images; the shared end points run once."""
    check_scoring_options(steps, batch_size, baseline)
    chosen = get_metrics(metrics)
    n = images.shape[0]
    for name, m in maps.items():
        if tuple(m.shape) != (n, *images.shape[-2:]):
            raise XtlError(f"maps '{name}' have shape {tuple(m.shape)}, not [B, H, W] = {(n, *images.shape[-2:])}")
    labels = labels.cpu().long()
    was_training = model.training
    model.eval()
    try:
        with _bar(progress, description) as advance:
            advance.total(2 * n + len(maps) * n * 2 * (steps - 1))
            fill = baseline_inputs(images, baseline)
            ends = torch.cat(forward_logits(model, 2 * n, lambda s: _end_points(images, fill, s), batch_size, advance,
                                            bf16=bf16))
            targets = ends[:n].argmax(1) if targets is None else targets.cpu().long()
            ends = Readout(ends.softmax(1).gather(1, torch.cat([targets, targets])[:, None])[:, 0], ends.argmax(1))
            return {name: _score_one(model, images, labels, m.to(images.device), targets, fill, ends, steps,
                                     batch_size, chosen, advance, bf16) for name, m in maps.items()}
    finally:
        model.train(was_training)


def check_scoring_options(steps: int, batch_size: int, baseline: str = "zero") -> None:
    if baseline not in BASELINES:
        raise XtlError(f"option --baseline must be one of {', '.join(BASELINES)}, not '{baseline}'")
    if steps < 1:
        raise XtlError(f"option --steps must be at least 1, not {steps}")
    if batch_size < 1:
        raise XtlError(f"option --batch-size must be at least 1, not {batch_size}")


def _end_points(images: torch.Tensor, fill: torch.Tensor, part: slice) -> torch.Tensor:
    """Job j < B is image j unperturbed; job B + j is image j fully masked."""
    n = images.shape[0]
    index = torch.arange(part.start, part.stop, device=images.device)
    return torch.where((index >= n).view(-1, 1, 1, 1), fill[index % n], images[index % n])


def _score_one(model, images, labels, maps, targets, fill, ends: Readout, steps, batch_size, chosen, advance,
               bf16: bool | None) -> Scores:
    n, n_pixels = images.shape[0], images.shape[-2] * images.shape[-1]
    ranks = relevance_ranks(maps)
    fractions, counts = masked_counts(steps, n_pixels)
    # jobs: image-major, then series (most relevant first, least relevant first), then fractions 1..steps-1
    inner = max(steps - 1, 1)
    job = torch.arange(n * 2 * (steps - 1))
    image_of, series_of, step_of = job // (2 * inner), (job // inner) % 2, job % inner + 1

    def make_inputs(part: slice) -> torch.Tensor:
        idx = image_of[part].to(images.device)
        return masked_inputs(images[idx], fill[idx], ranks[idx], counts[step_of[part]], series_of[part] == 0)

    started = time.perf_counter()
    middle = forward_jobs(model, len(job), make_inputs, targets[image_of], batch_size, advance, bf16)
    seconds = time.perf_counter() - started
    series = {
        "probability": _series(ends.probability, middle.probability, n, steps),
        "accuracy": _series(ends.predicted.eq(labels.repeat(2)).float(),
                            middle.predicted.eq(labels[image_of]).float(), n, steps),
    }
    curves = {m.name: metric_curve(m, fractions, series[m.quantity]) for m in chosen}
    return Scores(targets=targets, curves=curves, seconds=seconds, n_forward=len(job))


def _series(ends: torch.Tensor, middle: torch.Tensor, n: int, steps: int) -> dict[str, torch.Tensor]:
    """{"most", "least"} -> [B, steps + 1]: the unperturbed value, the interior steps, the fully masked value."""
    middle = middle.view(n, 2, steps - 1)
    return {name: torch.cat([ends[:n, None], middle[:, k], ends[n:, None]], dim=1)
            for k, name in enumerate(("most", "least"))}


class _Advance:
    """Progress callback: `advance(k)` after k forward passes; `advance.total(n)` sets the total."""

    def __init__(self, bar: Progress | None, description: str) -> None:
        self.bar, self.task = bar, bar.add_task(description, total=None) if bar is not None else None

    def __call__(self, k: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, k)

    def total(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, total=n)


class _bar:
    """A rich progress bar on stderr (or none), or a task on a bar the caller holds."""

    def __init__(self, progress: bool | Progress, description: str) -> None:
        self.own = progress is True
        self.bar = make_progress() if self.own else (progress if isinstance(progress, Progress) else None)
        self.description = description

    def __enter__(self) -> _Advance:
        if self.own:
            self.bar.start()
        return _Advance(self.bar, self.description)

    def __exit__(self, *exc) -> None:
        if self.own:
            self.bar.stop()


def make_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("passes"),
                    TimeRemainingColumn(), console=console)
