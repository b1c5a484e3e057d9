"""Score maps by perturbing the images they explain: every step of every image through the model
in large batches.

    scores = score(model, images, labels, maps, steps=10, baseline="zero", batch_size=64)
    scores.curves["deletion"].auc        # [B]

Pixels are ranked by relevance, most relevant first, with a stable sort: equal values keep their
raster order, so an all-equal map masks row by row from the top and the result never depends on
the sort's implementation. ViTs are perturbed pixel by pixel too (their maps are upsampled), so
CNNs and ViTs are scored on one scale. A masked pixel takes the baseline value (`BASELINES`).

`grid=G` perturbs a grid of cells instead of pixels: each map is averaged over the G x G cells of
the input (cell (i, j) covers the pixels y, x with y * G // H == i and x * G // W == j: the
nearest-neighbour upsampling of the cell grid, whole blocks also where H or W is not a multiple
of G), the cells are ranked as pixels are (stable, ties in raster order over cells), and masking
a cell masks its whole block. The masked fractions then count cells. Use it where single pixels
are not the data's own unit: CIFAR's 32 px images upsampled to 128 px are scored on grid=32 (one
CIFAR pixel = one 4 x 4 block), so that masking scattered pixels of a smooth upsampled image,
which breaks a CNN whatever the map says, no longer decides the score. `grid=None` is per pixel.

Baselines: "zero", "mean" and "blur" are images fixed per input; "road" (Rong et al. 2022, ROAD)
depends on the mask: each masked pixel becomes the weighted mean of its 8 neighbours (1/6 direct,
1/12 diagonal), masked neighbours being unknowns of the same sparse linear system, plus Gaussian
noise (`road_fill`). It is solved at the input's full resolution also with `grid` (the masked
blocks are the unknowns), so the filled blocks blend into the image the model sees instead of
showing the grid's edges; that is the paper's intent, an imputation whose shape tells the model
as little as possible about the mask.

The masked inputs are built batch by batch on the device from the ranks, never all at once. The
unperturbed image (fraction 0) and the all-baseline image (fraction 1) are the same for every map
and series, so they go through the model once per image. Results depend on `batch_size` only
through the model's own floating-point summation order (none for models that treat the images
of a batch independently: the tests pin exact equality for 1 and 64 on such a model).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from xtl.errors import XtlError
from xtl.faithfulness.metrics import Curve, gap_columns, get_metrics, html_table, mean_text, metric_curve, scoring_fractions
from xtl.models import inference_autocast
from xtl.models.registry import IMAGENET_STD
from xtl.settings import MAX_STEPS

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
    # ROAD depends on the mask (`road_fill`); with every pixel masked nothing is known and the linear
    # system's solution is 0, the data set's mean colour: `baseline_inputs` adds the noise
    "road": torch.zeros_like,
}

ROAD_NOISE = 0.01  # std of ROAD's noise in [0, 1] pixel units (Rong et al. 2022); / the normalisation std
ROAD_TOLERANCE = 1e-6  # conjugate gradients stop once no masked pixel is further from its neighbours' mean
ROAD_MAX_ITERATIONS = 100  # a cap, not reached in the tests (10-15 are needed); they pin the accuracy


def baseline_inputs(images: torch.Tensor, baseline: str, seed: int = 0,
                    pixel_std: Sequence[float] | None = None) -> torch.Tensor:
    """The fully masked images (fraction 1). "road": 0 plus its noise (`road_noise`, `seed`, `pixel_std`)."""
    if baseline not in BASELINES:
        raise XtlError(f"baseline_inputs(): baseline must be one of {', '.join(BASELINES)}, not {baseline!r}")
    if baseline == "road":
        return BASELINES[baseline](images) + road_noise(tuple(images.shape), seed, pixel_std, images.device)
    return BASELINES[baseline](images)


def road_noise(shape: tuple[int, int, int, int], seed: int = 0, pixel_std: Sequence[float] | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """ROAD's noise for images of `shape` [B, C, H, W]: N(0, 0.01) in [0, 1] pixel units, i.e. 0.01 /
    `pixel_std` per channel after normalisation (`pixel_std`: the std the images were normalised
    with; None: ImageNet's). Drawn from a seeded CPU generator: the same on every device. One field
    per image, reused by every step and map of the image (the paper draws it afresh for each
    imputation; a fixed field compares the maps of an image under the same noise)."""
    std = torch.tensor(IMAGENET_STD if pixel_std is None else tuple(pixel_std), dtype=torch.float64)
    if std.numel() != shape[1]:
        raise XtlError(f"ROAD's pixel_std has {std.numel()} values for images of {shape[1]} channels")
    generator = torch.Generator().manual_seed(0x524F4144 + seed)  # "ROAD": not the stream of random_maps(seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (noise * (ROAD_NOISE / std).view(1, -1, 1, 1)).float().to(device)


def road_fill(images: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor | None = None,
              tolerance: float = ROAD_TOLERANCE, max_iterations: int = ROAD_MAX_ITERATIONS) -> torch.Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022) of every masked pixel, batched on the device.

    `images` [J, C, H, W], `mask` [J, H, W] (True: imputed), `noise` [J, C, H, W] added to the masked
    pixels only (None: none). Each masked pixel p solves  sum_n w_n (x_p - x_n) = 0  over its
    neighbours n inside the image (w = 1/6 for the 4 direct, 1/12 for the 4 diagonal ones), where
    masked neighbours are unknowns too: one sparse, symmetric positive definite system per image
    and channel (singular only when every pixel is masked; its solution is then 0). Solved for all
    of them at once, matrix-free, by multigrid-preconditioned conjugate gradients (`_harmonic`)
    until every masked pixel is within `tolerance` of its neighbours' weighted mean, or
    `max_iterations`. The arithmetic is in the images' dtype (float64 in, float64 solve; float32
    agrees with a float64 direct solve to about 3e-5 in normalised units at 32-128 px, a thousandth
    of the noise). Unmasked pixels are returned unchanged. Not a sparse direct solve as in the
    paper's code, which runs on the CPU one image at a time. Cost: about 60 elementwise passes over
    the images per iteration; on a 2-core CPU at 128 px that is several times a CNN's forward pass
    (the GPU is the place for it)."""
    j, c, h, w = images.shape
    x = images.reshape(j * c, 1, h, w)
    m = mask[:, None].expand(j, c, h, w).reshape(j * c, 1, h, w)
    solved = _harmonic(x, m, tolerance, max_iterations).view(j, c, h, w)
    if noise is not None:
        solved = solved + noise.to(solved.dtype)
    return torch.where(mask[:, None], solved, images)


def _neighbour_sum(v: torch.Tensor) -> torch.Tensor:
    """sum_n w_n v_n over each pixel's 8 neighbours inside the image (zero padding): the separable
    [1, 2, 1] x [1, 2, 1] / 12 sum less the centre's 4/12 (as shifted adds: faster than a 1-channel conv)."""
    h, w = v.shape[-2:]
    padded = F.pad(v, (1, 1, 1, 1))
    rows = padded[..., :, 0:w] + 2 * padded[..., :, 1:w + 1] + padded[..., :, 2:w + 2]
    return (rows[..., 0:h, :] + 2 * rows[..., 1:h + 1, :] + rows[..., 2:h + 2, :] - 4 * v) / 12


def _harmonic(x: torch.Tensor, m: torch.Tensor, tolerance: float, max_iterations: int) -> torch.Tensor:
    """The noiseless ROAD solution for [N, 1, H, W] images `x` and masks `m` (True: unknown):
    D u - M N(u) = M N(x (1 - M)) for u on the masked pixels (N: `_neighbour_sum`, D: the sum of the
    weights inside the image), by conjugate gradients preconditioned with one multigrid V-cycle
    (`_v_cycle`; flexible, Polak-Ribiere, as the cycle is not exactly symmetric). About 10 iterations
    for any mask at 32-128 px; converged systems stand still while the others finish."""
    mf = m.to(x.dtype)
    weight = _neighbour_sum(torch.ones_like(x[:1]))  # D: 1 inside, less at the border
    b = mf * _neighbour_sum(x * (1 - mf))

    def apply(v: torch.Tensor) -> torch.Tensor:
        return mf * (weight * v - _neighbour_sum(v))

    u = torch.zeros_like(x)
    r = b
    z = _v_cycle(r, mf, weight)
    p = z
    rz = (r * z).sum((1, 2, 3))
    for _ in range(max_iterations):
        active = (r / weight).abs().amax((1, 2, 3)) > tolerance  # the largest distance from the neighbours' mean
        if not bool(active.any()):
            break
        ap = apply(p)
        pap = (p * ap).sum((1, 2, 3))
        alpha = torch.where(active & (pap > 0), rz / torch.where(pap > 0, pap, 1), 0).view(-1, 1, 1, 1)
        u = u + alpha * p
        r = r - alpha * ap
        z_before, z = z, _v_cycle(r, mf, weight)
        rz_new = (r * z).sum((1, 2, 3))
        beta = (r * (z - z_before)).sum((1, 2, 3))
        beta = torch.where(active & (rz > 0), beta / torch.where(rz > 0, rz, 1), 0).view(-1, 1, 1, 1)
        p = z + beta * p
        rz = rz_new
    return torch.where(m, u, x)


def _v_cycle(r: torch.Tensor, mf: torch.Tensor, weight: torch.Tensor, sweeps: int = 1,
             damping: float = 0.8) -> torch.Tensor:
    """An approximate solution e of  mf (weight e - N(e)) = r: damped Jacobi sweeps, then the residual's
    correction from half the resolution (a coarse pixel is unknown where all its pixels are; the
    operator is rediscretised there, so the residual is scaled by 4), then sweeps again."""

    step = damping * mf / weight  # zero outside the mask, where r and e are zero too

    def smooth(e: torch.Tensor) -> torch.Tensor:
        for _ in range(sweeps):
            e = e + step * (r - weight * e + _neighbour_sum(e))
        return e

    e = smooth(torch.zeros_like(r))
    h, w = r.shape[-2:]
    if min(h, w) >= 8:
        size = ((h + 1) // 2, (w + 1) // 2)
        coarse_mf = (F.adaptive_avg_pool2d(mf, size) >= 0.999).to(r.dtype)
        residual = r - mf * (weight * e - _neighbour_sum(e))
        correction = _v_cycle(4 * F.adaptive_avg_pool2d(residual, size) * coarse_mf, coarse_mf,
                              _neighbour_sum(torch.ones_like(coarse_mf[:1])), sweeps, damping)
        e = e + mf * F.interpolate(correction, size=(h, w), mode="bilinear", align_corners=False)
    return smooth(e)


# ----------------------------------------------------------------------------- reference maps


def random_maps(shape: tuple[int, int, int], seed: int = 0, device: torch.device | str = "cpu",
                grid: int | None = None) -> torch.Tensor:
    """Independent uniform noise per pixel from a seeded CPU generator: the same maps on every device.
    With `grid`, per cell of the G x G grid (constant over each cell's block of pixels)."""
    return RandomMaps(shape, seed, device, grid).rows(slice(None))


class RandomMaps:
    """`random_maps(shape, seed, device, grid)` a run of rows (images) at a time: `rows(part)` equals
    `random_maps(...)[part]` without making the other rows' maps. The seeded generator is read in
    order: rows asked for in increasing order are drawn once, the rows skipped on the way are drawn
    and dropped a bounded chunk at a time (asking for earlier rows starts it again)."""

    def __init__(self, shape: tuple[int, int, int], seed: int = 0, device: torch.device | str = "cpu",
                 grid: int | None = None) -> None:
        self.shape, self.seed, self.device, self.grid = tuple(shape), seed, device, grid
        self.per_row = shape[1] * shape[2] if grid is None else grid * grid  # values drawn per image
        self._restart()

    def _restart(self) -> None:
        self.generator, self.position = torch.Generator().manual_seed(self.seed), 0

    def rows(self, part: slice) -> torch.Tensor:
        start, stop, _ = part.indices(self.shape[0])
        if start < self.position:
            self._restart()
        while self.position < start:  # the CPU generator's values come out in order: skipped ones are drawn
            k = min(start - self.position, max(1, 2**24 // self.per_row))
            torch.rand(k * self.per_row, generator=self.generator)
            self.position += k
        values = torch.rand((stop - start, self.per_row), generator=self.generator)
        self.position = stop
        if self.grid is not None:
            values = values[:, cell_ids(self.shape[1:], self.grid)]
        return values.view(stop - start, *self.shape[1:]).to(self.device)


def uniform_maps(shape: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """All pixels equally relevant: masked in raster order (the stable sort's tie-breaking; with a
    grid, raster order over the cells)."""
    return torch.zeros(shape, device=device)


# ----------------------------------------------------------------------------- ranking and masking


def cell_ids(size: tuple[int, int], grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[H * W] the cell of each pixel on the G x G grid: row y * G // H, column x * G // W (raster order)."""
    h, w = size
    rows = torch.arange(h, device=device) * grid // h
    cols = torch.arange(w, device=device) * grid // w
    return (rows[:, None] * grid + cols[None, :]).flatten()


def cell_maps(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, H, W] maps -> [B, G, G]: the mean of each cell's block of pixels (area pooling)."""
    ids = cell_ids(tuple(maps.shape[-2:]), grid, maps.device)
    flat = maps.flatten(1).float()
    sums = torch.zeros(flat.shape[0], grid * grid, device=flat.device).index_add_(1, ids, flat)
    return (sums / torch.bincount(ids, minlength=grid * grid).to(sums)).view(-1, grid, grid)


def relevance_ranks(maps: torch.Tensor) -> torch.Tensor:
    """[B, H, W] maps -> [B, H*W] rank of each pixel (0 = most relevant), ties in raster order."""
    flat = maps.flatten(1).float()
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device, dtype=torch.int32).expand_as(order)
    return torch.empty_like(order, dtype=torch.int32).scatter_(1, order, positions)


def masked_counts(fractions: torch.Tensor, n_pixels: int) -> torch.Tensor:
    """The pixel (or cell) count masked at each of the masked `fractions` (`scoring_fractions`)."""
    return torch.round(fractions * n_pixels).long()


def perturbation_masks(ranks: torch.Tensor, counts: torch.Tensor, most_first: torch.Tensor,
                       size: tuple[int, int], grid: int | None = None) -> torch.Tensor:
    """[J, H, W] True where a pixel is masked: its pixel's (or with `grid`, its cell's) rank is among
    the `counts` most (or least) relevant."""
    n_units = ranks.shape[1]
    counts = counts[:, None].to(ranks.device)
    mask = torch.where(most_first[:, None].to(ranks.device), ranks < counts, ranks >= n_units - counts)
    if grid is not None:
        mask = mask[:, cell_ids(size, grid, mask.device)]
    return mask.view(mask.shape[0], *size)


def masked_inputs(images: torch.Tensor, fill: torch.Tensor, ranks: torch.Tensor,
                  counts: torch.Tensor, most_first: torch.Tensor, grid: int | None = None) -> torch.Tensor:
    """Each image with its `counts` most (or least) relevant pixels (cells) replaced by `fill`."""
    mask = perturbation_masks(ranks, counts, most_first, tuple(images.shape[-2:]), grid)
    return torch.where(mask[:, None], fill, images)


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
    `bf16`: bf16 autocast; None = where the device has it natively (`xtl.models.inference_autocast`)."""
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

    def per_image(self) -> dict[str, torch.Tensor]:
        """Column -> [B]: each metric's AUC and the gaps (`metrics.GAPS`: srg, srg_accuracy) it allows."""
        return gap_columns({name: curve.auc.detach().double().cpu() for name, curve in self.curves.items()})

    def to_pandas(self):
        """A pandas DataFrame, one row per image: its position, the class the maps explain, every metric's
        AUC and the gaps (srg = insertion - deletion, srg_accuracy = negative - positive)."""
        import pandas as pd

        columns = self.per_image()
        return pd.DataFrame({"image": list(range(len(self.targets))),
                             "target": [int(t) for t in self.targets.tolist()],
                             **{name: values.tolist() for name, values in columns.items()}})

    def _summary(self) -> str:
        means = ", ".join(f"{name}={mean_text(values)}" for name, values in self.per_image().items())
        points = next(iter(self.curves.values())).x.numel() if self.curves else 0
        return f"images={len(self.targets)}, points={points}, mean AUC: {means or 'none'}"

    def __repr__(self) -> str:
        return f"Scores({self._summary()})"

    def _repr_html_(self) -> str:
        return html_table(f"Scores: {self._summary()}", self.to_pandas())


def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor,
          targets: torch.Tensor | None = None, steps: int = 10, baseline: str = "zero", batch_size: int = 64,
          metrics: list[str] | None = None, progress: bool = False, bf16: bool | None = None,
          grid: int | None = None, seed: int = 0, pixel_std: Sequence[float] | None = None) -> Scores:
    """Faithfulness of `maps` [B, H, W] for a preprocessed batch `images` [B, 3, H, W].

    `targets`: the class the maps explain (default: the predicted class); deletion and insertion
    read its probability, positive and negative perturbation the accuracy against `labels`.
    `bf16`: forward passes under bf16 autocast; None = where the device has it natively (`native_bf16`).
    `grid`: perturb the cells of a G x G grid instead of pixels (None: pixels; see the module).
    `seed`, `pixel_std`: ROAD's noise (`road_noise`; the other baselines have none).
    """
    return score_maps(model, images, labels, {"maps": maps}, targets, steps, baseline, batch_size,
                      metrics, progress, bf16=bf16, grid=grid, seed=seed, pixel_std=pixel_std, _where="score()")["maps"]


def score_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, maps: Mapping[str, torch.Tensor],
               targets: torch.Tensor | None = None, steps: int = 10, baseline: str = "zero", batch_size: int = 64,
               metrics: list[str] | None = None, progress: bool | Progress = False,
               description: str = "faithfulness", bf16: bool | None = None, grid: int | None = None,
               seed: int = 0, pixel_std: Sequence[float] | None = None, _where: str = "score_maps()") -> dict[str, Scores]:
    """`score` for several map sets of the same images; the shared end points run once.

    A bad setting is one line naming the parameter as Python callers write it (`score(): steps must
    be at least 1, not 0`); the command line checks its options first, in its own words
    (`FaithfulnessSettings`)."""
    check_scoring_options(steps, batch_size, baseline, grid, where=_where)
    check_grid_size(grid, tuple(images.shape[-2:]), where=_where)
    chosen = get_metrics(metrics)
    n = images.shape[0]
    for name, m in maps.items():
        if tuple(m.shape) != (n, *images.shape[-2:]):
            raise XtlError(f"maps '{name}' have shape {tuple(m.shape)}, not [B, H, W] = {(n, *images.shape[-2:])}")
    labels = labels.cpu().long()
    from xtl.explain.base import logits_model

    model = logits_model(model)  # a Hugging Face classifier as it comes: its .logits
    was_training = model.training
    model.eval()
    try:
        with _bar(progress, description) as advance:
            advance.total(2 * n + len(maps) * n * 2 * (len(scoring_fractions(chosen, steps)) - 2))
            fill = baseline_inputs(images, baseline, seed, pixel_std)
            noise = fill if baseline == "road" else None  # road's fully masked image is its noise
            ends = torch.cat(forward_logits(model, 2 * n, lambda s: _end_points(images, fill, s), batch_size, advance,
                                            bf16=bf16))
            targets = ends[:n].argmax(1) if targets is None else targets.cpu().long()
            ends = Readout(ends.softmax(1).gather(1, torch.cat([targets, targets])[:, None])[:, 0], ends.argmax(1))
            perturb = _Perturb(images, fill, noise, grid)
            return {name: _score_one(model, perturb, labels, m.to(images.device), targets, ends, steps,
                                     batch_size, chosen, advance, bf16) for name, m in maps.items()}
    finally:
        model.train(was_training)


# "common": one grid for every model of a job, fixed before any result (`xtl.faithfulness.runner.common_grid`):
# the source images' own pixels where they are coarser than the input (CIFAR-10: 32), else COMMON_GRID;
# "native": the source images' own pixels; "model": each model's own feature grid (patches, CAM cells)
NAMED_GRIDS = ("common", "native", "model")
COMMON_GRID = 28  # cells per side of the common grid where the source is not coarser than the input


def setting_name(name: str, where: str = "option") -> str:
    """How an error names a setting: `option --batch-size` for the command line (`where="option"`),
    `score(): batch_size` for a Python caller (`where` is the function's name, "score()")."""
    return f"option --{name.replace('_', '-')}" if where == "option" else f"{where}: {name}"


def check_scoring_options(steps: int, batch_size: int, baseline: str = "zero", grid: int | str | None = None,
                          native: bool = False, where: str = "option") -> None:
    """One line naming the option for each bad value (`native`: whether the named grids "native" and
    "model", which only a run or a model can resolve, are accepted). `where`: "option" names them as
    the command line does (`option --steps`); a function's name ("score()") names its parameters."""
    python = where != "option"
    if baseline not in BASELINES:
        shown = repr(baseline) if python else f"'{baseline}'"
        raise XtlError(f"{setting_name('baseline', where)} must be one of {', '.join(BASELINES)}, not {shown}")
    for name, value in (("steps", steps), ("batch_size", batch_size)) if python else ():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise XtlError(f"{setting_name(name, where)} must be an int, not {value!r}")
    if steps < 1:
        raise XtlError(f"{setting_name('steps', where)} must be at least 1, not {steps}")
    if steps > MAX_STEPS:
        raise XtlError(f"{setting_name('steps', where)} must be at most {MAX_STEPS:,} (each step is a forward pass per "
                       f"image and metric), not {steps:,}")
    if batch_size < 1:
        raise XtlError(f"{setting_name('batch_size', where)} must be at least 1, not {batch_size}")
    if native and grid in NAMED_GRIDS:
        return
    if grid is not None and (isinstance(grid, bool) or not isinstance(grid, int) or grid < 1):
        choices = ("a number of cells per side >= 1" + (", common, native, model" if native else "")
                   + (" or None (pixels)" if python else " or none (pixels)"))
        raise XtlError(f"{setting_name('grid', where)} must be {choices}, not {grid!r}")


def check_grid_size(grid: int | None, size: tuple[int, int], where: str = "option") -> None:
    """A grid finer than the input has cells without pixels."""
    if grid is not None and grid > min(size):
        raise XtlError(f"{setting_name('grid', where)} must be at most the input's {min(size)} px per side, not {grid}")


def _end_points(images: torch.Tensor, fill: torch.Tensor, part: slice) -> torch.Tensor:
    """Job j < B is image j unperturbed; job B + j is image j fully masked."""
    n = images.shape[0]
    index = torch.arange(part.start, part.stop, device=images.device)
    return torch.where((index >= n).view(-1, 1, 1, 1), fill[index % n], images[index % n])


@dataclass
class _Perturb:
    """How the masked inputs of a batch of images are made: a fixed fill, or ROAD's per mask."""

    images: torch.Tensor
    fill: torch.Tensor  # the fully masked images
    noise: torch.Tensor | None  # ROAD only: its noise field per image
    grid: int | None

    def __call__(self, idx: torch.Tensor, ranks: torch.Tensor, counts: torch.Tensor,
                 most_first: torch.Tensor) -> torch.Tensor:
        images = self.images[idx]
        mask = perturbation_masks(ranks, counts, most_first, tuple(images.shape[-2:]), self.grid)
        if self.noise is not None:
            return road_fill(images, mask, self.noise[idx])
        return torch.where(mask[:, None], self.fill[idx], images)


def _score_one(model, perturb: _Perturb, labels, maps, targets, ends: Readout, steps, batch_size, chosen, advance,
               bf16: bool | None) -> Scores:
    images, grid = perturb.images, perturb.grid
    n = images.shape[0]
    ranks = relevance_ranks(maps if grid is None else cell_maps(maps, grid))
    fractions = scoring_fractions(chosen, steps)
    counts = masked_counts(fractions, ranks.shape[1])
    # jobs: image-major, then series (most relevant first, least relevant first), then the interior fractions
    inner = len(fractions) - 2
    job = torch.arange(n * 2 * inner)
    image_of, series_of, step_of = job // max(2 * inner, 1), (job // max(inner, 1)) % 2, job % max(inner, 1) + 1

    def make_inputs(part: slice) -> torch.Tensor:
        idx = image_of[part].to(images.device)
        return perturb(idx, ranks[idx], counts[step_of[part]], series_of[part] == 0)

    started = time.perf_counter()
    middle = forward_jobs(model, len(job), make_inputs, targets[image_of], batch_size, advance, bf16)
    seconds = time.perf_counter() - started
    series = {
        "probability": _series(ends.probability, middle.probability, n, inner),
        "accuracy": _series(ends.predicted.eq(labels.repeat(2)).float(),
                            middle.predicted.eq(labels[image_of]).float(), n, inner),
    }
    curves = {m.name: metric_curve(m, fractions, series[m.quantity], steps) for m in chosen}
    return Scores(targets=targets, curves=curves, seconds=seconds, n_forward=len(job))


def _series(ends: torch.Tensor, middle: torch.Tensor, n: int, inner: int) -> dict[str, torch.Tensor]:
    """{"most", "least"} -> [B, inner + 2]: the unperturbed value, the `inner` interior fractions, the fully masked value."""
    middle = middle.view(n, 2, inner)
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
    # a description holds a run's name (user text): shown as it is, never read as markup
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TextColumn("passes"),
                    TimeRemainingColumn(), console=console)
