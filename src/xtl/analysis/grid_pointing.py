"""The grid pointing game on a run's own models: localisation where the truth is known by construction.

Boehle, Fritz and Schiele, "Convolutional Dynamic Alignment Networks for Interpretable Classifications"
(CVPR 2021) and "B-cos Networks" (CVPR 2022): a 2 x 2 mosaic of four test images of four different
classes, each classified correctly and confidently *alone* by the model, is explained once for each
of the four classes. A map that explains the class asked for puts its positive relevance in the
quadrant of that class's image; a map that does not look at the class (a class-insensitive method, an
edge detector, a centre prior) spreads it over the mosaic, 1/4 per quadrant on average. No model is
trained: the evaluated models are the explained ones, on their own test images.

    result = grid_pointing([RunDir("runs/quick/efficientnet_lite0"), RunDir("runs/quick/vit_s14_dinov2")],
                           out=Path("runs/quick/grid_pointing"))

The protocol, fixed before any result was looked at:
- **Which images.** A test image is a candidate when every model given classifies it correctly with
  a probability of at least `min_confidence` (0.5); every model is then scored on the *same*
  mosaics, so methods and models are compared image by image. `mosaics` (100) mosaics are drawn
  with the seed: four distinct classes, one candidate image of each, in a random quadrant order; an
  image is used in at most one mosaic while its class has unused candidates.
- **The scale** (`layout`). `half` (the default): the four tiles at half the model's input side, the
  mosaic at the input size: any model, at the cost of objects half their trained size. `full`: the
  tiles at the input size, the mosaic twice as large: the objects at their trained size, for models
  that accept a larger input (a CNN's global pooling; a ViT's position embeddings are of one size,
  so it is refused). Tiles are resampled from the source image once, as the model's preprocessing
  does for a single image.
- **The score** of a map of class c: `share`, the share of its positive relevance in c's quadrant
  (Boehle et al.'s localisation score; signed maps keep their positive part, clamped maps are as
  computed), and `pointing`, whether its maximum is in that quadrant. Maps are compared with the
  quadrants at the input's pixels: a coarser map (a CAM grid, a ViT's patches) is repeated cell by
  cell (nearest), so a cell's relevance stays its own. A flat map (no positive relevance) scores the
  even share 0.25 and a miss. A mosaic's score is the mean over its four maps: the mosaic, not the
  map, is the unit resampled (its four maps share the images).
- **References**, scored the same way on the same mosaics: `random` (seeded uniform noise per map),
  `centre` (a Gaussian at the centre, sigma a quarter of the side: 0.25 by symmetry) and `edge` (the
  Sobel gradient magnitude of the mosaic: uses no model, one map for the four classes, 0.25 on
  average whatever the images). No map that ignores the class can beat 0.25 on average.
- **Tests** (`xtl.faithfulness.paired`: seeded percentile bootstrap over mosaics, the p-value from
  the same resamples): per model, every method against every reference and every two methods; for
  each method that two models share, model against model on the same mosaics. All the p-values of
  one call are Holm-corrected together; a verdict names the better one only where the corrected
  p-value is below 0.05, else "cannot decide".
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from xtl.errors import XtlError
from xtl.settings import MAX_COUNT, Rule, check_values

CSV_NAME = "grid_pointing.csv"
MAPS_CSV = "grid_pointing_maps.csv"
TESTS_CSV = "grid_pointing_tests.csv"
SETTINGS_JSON = "grid_pointing.json"
FIGURE_NAME = "grid_pointing.png"
REFERENCES = ("random", "centre", "edge")
LAYOUTS = ("half", "full")
MEASURES = ("share", "pointing")
EVEN_SHARE = 0.25  # what a map that ignores the class gets on average
PROTOCOL = 1  # the scoring's version: a pipeline replays the game when it changes

RULES = {"mosaics": Rule(at_least=1, at_most=MAX_COUNT), "min_confidence": Rule(at_least=0, at_most=1),
         "seed": Rule(at_least=0), "batch_size": Rule(at_least=1, at_most=MAX_COUNT), "layout": Rule(choices=LAYOUTS)}


@dataclass(frozen=True)
class GridSettings:
    """What the game plays; the same settings (and runs) give the same mosaics and scores."""

    mosaics: int = 100  # 2 x 2 mosaics drawn, each explained for its four classes
    min_confidence: float = 0.5  # a tile is classified correctly alone with at least this probability, by every model
    layout: str = "half"  # "half": tiles at half the input side; "full": tiles at the input side, mosaic twice as large
    seed: int = 0
    batch_size: int = 16  # mosaics explained per call (4 maps each)

    def check(self, where: str = "option") -> "GridSettings":
        """One line naming the first setting out of range (`where`: "option", or a file's name)."""
        check_values(asdict(self), RULES, where)
        return self


class NotPlayable(XtlError):
    """Too few test images are classified correctly and confidently to draw mosaics of four classes."""


# ----------------------------------------------------------------------------- the mosaics


def candidates(labels: torch.Tensor, probabilities: Sequence[torch.Tensor], min_confidence: float) -> torch.Tensor:
    """[N] bool: the test images every model classifies correctly with probability >= min_confidence."""
    keep = torch.ones(len(labels), dtype=torch.bool)
    for p in probabilities:
        p = p.float()
        keep &= (p.argmax(1) == labels) & (p.gather(1, labels[:, None].long())[:, 0] >= min_confidence)
    return keep


def draw_mosaics(labels: torch.Tensor, eligible: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """[n, 4] test positions (quadrants top-left, top-right, bottom-left, bottom-right) of four distinct
    classes, drawn with `seed` from the eligible images; an image is reused only once every candidate
    of its class has been used. Fewer than four classes with a candidate is an `XtlError`."""
    rng = np.random.default_rng(seed)
    pools = {int(c): [int(i) for i in torch.nonzero(eligible & (labels == c))[:, 0]] for c in labels.unique()}
    pools = {c: p for c, p in pools.items() if p}
    if len(pools) < 4:
        raise NotPlayable(f"the grid pointing game needs confidently correct test images of 4 classes; only "
                       f"{len(pools)} class{'es have' if len(pools) != 1 else ' has'} one (lower --min-confidence, "
                       "or train the models longer)")
    unused = {c: list(rng.permutation(p)) for c, p in pools.items()}
    classes = sorted(pools)
    out = torch.empty(n, 4, dtype=torch.long)
    for k in range(n):
        chosen = rng.choice(classes, size=4, replace=False)
        for q, c in enumerate(chosen):
            if not unused[c]:
                unused[c] = list(rng.permutation(pools[c]))
            out[k, q] = int(unused[c].pop())
    return out


def compose(tiles: torch.Tensor) -> torch.Tensor:
    """[M, 4, C, h, w] -> [M, C, 2h, 2w], quadrants in the order of `draw_mosaics`."""
    top = torch.cat([tiles[:, 0], tiles[:, 1]], dim=-1)
    bottom = torch.cat([tiles[:, 2], tiles[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def mosaic_inputs(images, preprocess, positions: torch.Tensor, layout: str, device) -> torch.Tensor:
    """Preprocessed mosaics [M, 3, S, S] (`half`, S the model's input side) or [M, 3, 2S, 2S] (`full`) of
    the uint8 source `images` at `positions` [M, 4]."""
    flat = positions.reshape(-1)
    tiles = images[flat].to(device)  # uint8 until the device
    m = positions.shape[0]
    if layout == "full":
        x = preprocess(tiles)
        return compose(x.reshape(m, 4, *x.shape[1:]))
    raw = compose(tiles.reshape(m, 4, *tiles.shape[1:]))  # at twice the source side: one resampling, to S
    return preprocess(raw)


def quadrant_masks(side: int) -> torch.Tensor:
    """[4, side, side] bool: the quadrants of `compose`'s order (side even)."""
    half = side // 2
    masks = torch.zeros(4, side, side, dtype=torch.bool)
    masks[0, :half, :half] = masks[1, :half, half:] = masks[2, half:, :half] = masks[3, half:, half:] = True
    return masks


def to_pixels(raw: torch.Tensor, side: int, signed: bool) -> torch.Tensor:
    """Maps [B, h, w] at the mosaic's pixels [B, side, side]: area-averaged when finer, each cell repeated
    (nearest) when coarser; the positive part of a signed map."""
    maps = raw.detach().float()[:, None]
    if maps.shape[-2:] != (side, side):
        if maps.shape[-1] > side:
            maps = F.adaptive_avg_pool2d(maps, side)
        else:
            maps = F.interpolate(maps, size=(side, side), mode="nearest-exact")
    maps = maps[:, 0]
    return maps.clamp(min=0) if signed else maps


def score(maps: torch.Tensor, quadrants: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per map [B, S, S] (non-negative) and its class's quadrant index [B]: `share` of the relevance in the
    quadrant and `pointing` (1: the maximum is in it), and `flat` (a flat map: 0.25 and a miss)."""
    side = maps.shape[-1]
    masks = quadrant_masks(side).to(maps.device)[quadrants]
    flat = maps.flatten(1).double()
    total = flat.sum(1)
    is_flat = (flat.amax(1) == flat.amin(1)) | (total <= 0)
    inside = (flat * masks.flatten(1)).sum(1)
    share = torch.where(is_flat, torch.full_like(total, EVEN_SHARE), inside / torch.where(is_flat, torch.ones_like(total), total))
    # float64 sums, rounded to 1e-9: a difference below that is the order of a float32 sum, not evidence
    # (a symmetric map's four shares would otherwise differ in their last bits, and the paired tests see it)
    share = torch.round(share * 1e9) / 1e9
    top = flat.argmax(1)
    pointing = masks.flatten(1).gather(1, top[:, None])[:, 0].float()
    return {"share": share.float(), "pointing": torch.where(is_flat, torch.zeros_like(pointing), pointing), "flat": is_flat}


def reference_maps(kind: str, mosaics: torch.Tensor, seed: int) -> torch.Tensor:
    """One reference map per map of the mosaics [M, 3, S, S] (4 per mosaic, in quadrant order): seeded
    `random` noise, a `centre` Gaussian (sigma S/4) or the `edge` magnitude of the mosaic (Sobel of its
    channel mean: the same for the four classes)."""
    m, _, side, _ = mosaics.shape
    if kind == "random":
        return torch.rand(4 * m, side, side, generator=torch.Generator().manual_seed(seed))
    if kind == "centre":
        from xtl.analysis.shortcut import centre_maps

        return centre_maps(4 * m, (side, side))
    if kind == "edge":
        grey = mosaics.detach().float().cpu().mean(1, keepdim=True)
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        weights = torch.stack([kx, kx.T])[:, None]
        g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), weights)
        edges = g.pow(2).sum(1).sqrt()
        return edges.repeat_interleave(4, dim=0)
    raise XtlError(f"unknown reference map {kind!r}; known: {', '.join(REFERENCES)}")


# ----------------------------------------------------------------------------- playing it


@dataclass
class ModelGame:
    """One model's maps of the mosaics, scored: per map rows and the figure's first mosaics."""

    name: str  # the run's model name
    label: str  # the run's folder name (models may repeat across runs)
    family: str
    side: int
    scores: dict[str, dict[str, torch.Tensor]]  # method -> {"share", "pointing", "flat"} per map [4M]
    readings: dict[str, str]  # method -> "positive part" (signed) or "as computed"
    seconds: dict[str, float]
    shown: dict[str, torch.Tensor]  # method -> maps of the first mosaics [k * 4, S, S]
    images: torch.Tensor  # the first mosaics, [k, 3, S, S] in [0, 1]


@dataclass
class Player:
    """What the game needs of a model: the model (eval mode, on `device`), its description, its
    preprocessing, and the uint8 test images [N, 3, h, w] with their labels [N]."""

    model: torch.nn.Module
    spec: object  # xtl.models.ModelDescription
    preprocess: Callable[[torch.Tensor], torch.Tensor]  # uint8 [B, 3, h, w] -> preprocessed [B, 3, S, S]; has .size, .denormalise
    images: torch.Tensor
    labels: torch.Tensor
    device: torch.device
    name: str  # the model's name
    label: str  # its run's folder name: models may repeat across runs

    @classmethod
    def of_run(cls, loaded) -> "Player":
        """A run loaded for inference on its test split (`xtl.inference.LoadedRun`)."""
        return cls(loaded.model, loaded.spec, loaded.preprocess, loaded.part.images, loaded.part.labels, loaded.device,
                   loaded.run.config().model, loaded.run.path.name)


def check_layout(player: Player, layout: str) -> None:
    """`full` needs a model that takes an input twice its training side; say so in one line if not."""
    if layout != "full":
        return
    side = 2 * player.preprocess.size
    try:
        with torch.no_grad():
            player.model(torch.zeros(1, 3, side, side, device=player.device))
    except Exception as err:  # a ViT's position embeddings, a fixed-size head
        raise XtlError(f"option --layout full: {player.spec.name} does not take {side} px inputs (twice its "
                       f"{player.preprocess.size} px; {type(err).__name__}); use --layout half") from None


def play_model(player: Player, positions: torch.Tensor, methods: Sequence[str], settings: GridSettings,
               shown: int = 2, on_method: Callable[[str], None] | None = None) -> ModelGame:
    """Explain every mosaic for its four classes with each method (and the references), and score the maps."""
    from xtl.explain import explain

    check_layout(player, settings.layout)
    targets_all = player.labels[positions.reshape(-1)]
    quadrants_all = torch.arange(4).repeat(positions.shape[0])
    scores, readings, seconds, kept = {}, {}, {}, {}
    first = mosaic_inputs(player.images, player.preprocess, positions[:shown], settings.layout, player.device)
    side = first.shape[-1]
    for method in [*methods, *REFERENCES]:
        if on_method:
            on_method(method)
        start = time.perf_counter()
        parts: dict[str, list[torch.Tensor]] = {"share": [], "pointing": [], "flat": []}
        maps_shown = []
        for s in range(0, positions.shape[0], settings.batch_size):
            chunk = positions[s:s + settings.batch_size]
            x = mosaic_inputs(player.images, player.preprocess, chunk, settings.layout, player.device)
            targets = targets_all[4 * s:4 * (s + len(chunk))]
            if method in REFERENCES:
                maps = reference_maps(method, x, seed=settings.seed + s)
                readings[method] = "reference"
            else:
                explanation = explain(player.model, x.repeat_interleave(4, dim=0), targets.to(player.device), method,
                                      spec=player.spec)
                maps = to_pixels(explanation.raw.cpu(), side, explanation.signed)
                readings[method] = "positive part" if explanation.signed else "as computed"
            result = score(maps, quadrants_all[4 * s:4 * (s + len(chunk))])
            for key in parts:
                parts[key].append(result[key])
            if s == 0:
                maps_shown = maps[:4 * shown]
        scores[method] = {key: torch.cat(v) for key, v in parts.items()}
        seconds[method] = round(time.perf_counter() - start, 2)
        kept[method] = maps_shown
    return ModelGame(name=player.name, label=player.label, family=player.spec.family, side=side,
                     scores=scores, readings=readings, seconds=seconds, shown=kept,
                     images=player.preprocess.denormalise(first).cpu())


def per_mosaic(values: torch.Tensor) -> torch.Tensor:
    """Per map values [4M] -> the mean of each mosaic's four [M]."""
    return values.double().reshape(-1, 4).mean(1)


def summary_rows(games: list[ModelGame], n_mosaics: int, settings: GridSettings) -> list[dict]:
    """Per model and method (references included): mean share and pointing with bootstrap 95 % intervals."""
    from xtl.faithfulness.paired import resampled_means, summarise

    rows = []
    for game in games:
        for method, s in game.scores.items():
            row = {"run": game.label, "model": game.name, "family": game.family, "method": method,
                   "reading": game.readings[method], "layout": settings.layout, "side": game.side, "mosaics": n_mosaics,
                   "maps": len(s["share"])}
            for measure in MEASURES:
                values = per_mosaic(s[measure])[:, None]
                d = summarise(values, resampled_means(values, seed=settings.seed))[0]
                row.update({measure: d.mean, f"{measure}_low": d.low, f"{measure}_high": d.high})
            row["flat_maps"] = int(s["flat"].sum())
            row["seconds"] = game.seconds[method]
            rows.append(row)
    return rows


def paired_tests(games: list[ModelGame], settings: GridSettings) -> list[dict]:
    """The paired tests of the module's docstring, one Holm family over every row."""
    from xtl.faithfulness.paired import holm, resampled_means, summarise, verdict

    pairs: list[tuple[str, tuple[ModelGame, str], tuple[ModelGame, str]]] = []
    for game in games:
        methods = [m for m in game.scores if m not in REFERENCES]
        pairs += [("reference", (game, m), (game, ref)) for m in methods for ref in REFERENCES]
        pairs += [("method", (game, a), (game, b)) for i, a in enumerate(methods) for b in methods[i + 1:]]
    for i, a in enumerate(games):
        for b in games[i + 1:]:
            shared = [m for m in a.scores if m in b.scores and m not in REFERENCES]
            pairs += [("model", (a, m), (b, m)) for m in shared]
    rows = []
    for measure in MEASURES:
        if not pairs:
            break
        differences = torch.stack([per_mosaic(x[0].scores[x[1]][measure]) - per_mosaic(y[0].scores[y[1]][measure])
                                   for _, x, y in pairs], dim=1)
        for (kind, (ga, ma), (gb, mb)), d in zip(pairs, summarise(differences, resampled_means(differences, seed=settings.seed))):
            rows.append({"measure": measure, "kind": kind, "first_run": ga.label, "first_method": ma,
                         "second_run": gb.label, "second_method": mb, "n": d.n, "mean": d.mean, "low": d.low,
                         "high": d.high, "p": d.p})
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
        row["family"] = len(rows)
        row["verdict"] = verdict(row)
    return rows


SUMMARY_COLUMNS = ["run", "model", "family", "method", "reading", "layout", "side", "mosaics", "maps",
                   *[f"{m}{s}" for m in MEASURES for s in ("", "_low", "_high")], "flat_maps", "seconds"]
TEST_COLUMNS = ["measure", "kind", "first_run", "first_method", "second_run", "second_method", "n", "mean", "low",
                "high", "p", "p_holm", "family", "verdict"]
MAP_COLUMNS = ["run", "method", "mosaic", "quadrant", "position", "class", "share", "pointing"]


def grid_pointing(runs: Sequence, out: Path, methods: Sequence[str] | None = None,
                  settings: GridSettings = GridSettings(), device: str | None = None,
                  log: Callable[[str], None] = lambda line: None) -> dict:
    """Play the game on `runs` (run folders of one test split: every model on the same mosaics) with
    `methods` (each run's explained methods that apply to it; default: `DEFAULT_METHODS` of its family)
    and write, in `out`: grid_pointing.csv (per run and method), grid_pointing_tests.csv,
    grid_pointing_maps.csv (per map), grid_pointing.json, grid_pointing.png and
    grid_pointing_gallery_<run>.png. Returns {"rows", "tests", "settings", "candidates"}."""
    from xtl.explain.runner import applicable_methods
    from xtl.inference import LoadedRun
    from xtl.io import write_csv, write_json
    from xtl.runs import check_same_data

    settings.check()
    if not runs:
        raise XtlError("give one or more run directories")
    if len(runs) > 1:
        check_same_data(list(runs), "the grid pointing game")
    loaded = [LoadedRun(run, "test", device) for run in runs]
    chosen = []
    for run, model in zip(runs, loaded):
        wanted = list(methods) if methods else list(DEFAULT_METHODS[model.spec.family if model.spec.family in DEFAULT_METHODS else "cnn"])
        names = applicable_methods(model.spec.family, wanted)
        if not names:
            raise XtlError(f"option --methods: none of {', '.join(wanted)} applies to {run.path} "
                           f"(a {model.spec.family.upper()})")
        chosen.append(names)
    players = [Player.of_run(model) for model in loaded]
    for p in players:
        check_layout(p, settings.layout)  # every model before any work
    labels = loaded[0].part.labels
    for run, model in zip(runs[1:], loaded[1:]):
        if model.part.ids.tolist() != loaded[0].part.ids.tolist():
            raise XtlError(f"run {run.path} has other test images than {runs[0].path}: the grid pointing game "
                           "plays every model on the same mosaics, so give runs of one split")
    eligible = candidates(labels, [m.probabilities for m in loaded], settings.min_confidence)
    positions = draw_mosaics(labels, eligible, settings.mosaics, settings.seed)
    log(f"grid pointing: {settings.mosaics} mosaics from {int(eligible.sum())} of {len(labels)} test images "
        f"(correct with p >= {settings.min_confidence:g} by every model), layout {settings.layout}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    games = []
    for p, names in zip(players, chosen):
        start = time.perf_counter()
        games.append(play_model(p, positions, names, settings, on_method=lambda m, r=p.label: log(f"grid pointing: {r}: {m}")))
        log(f"grid pointing: {p.label} in {time.perf_counter() - start:.1f} s")
    rows = summary_rows(games, settings.mosaics, settings)
    tests = paired_tests(games, settings)
    names = loaded[0].class_names
    map_rows = [{"run": g.label, "method": m, "mosaic": k // 4, "quadrant": k % 4, "position": int(positions.reshape(-1)[k]),
                 "class": names[int(labels[positions.reshape(-1)[k]])], "share": float(s["share"][k]),
                 "pointing": int(s["pointing"][k])}
                for g in games for m, s in g.scores.items() for k in range(len(s["share"]))]
    write_csv(out / CSV_NAME, rows, SUMMARY_COLUMNS)
    write_csv(out / TESTS_CSV, tests, TEST_COLUMNS)
    write_csv(out / MAPS_CSV, map_rows, MAP_COLUMNS)
    info = {"settings": asdict(settings), "runs": [str(r.path) for r in runs], "methods": dict(zip([g.label for g in games], chosen)),
            "candidates": int(eligible.sum()), "test_images": len(labels), "mosaics": positions.tolist()}
    write_json(out / SETTINGS_JSON, info)
    plot_scores(rows, out / FIGURE_NAME)
    for game in games:
        plot_gallery(game, positions, names, labels, out / f"grid_pointing_gallery_{game.label}.png")
    return {"rows": rows, "tests": tests, "settings": asdict(settings), "candidates": int(eligible.sum())}


# the methods scored when none are named: each family's cheap ones (every registered one may be named)
DEFAULT_METHODS = {
    "cnn": ("gradcam", "saliency", "input_x_gradient", "integrated_gradients", "lrp_epsilon"),
    "vit": ("transformer_attribution", "attnlrp", "attention_rollout", "gradcam", "saliency"),
}


# ----------------------------------------------------------------------------- figures, tables, reading back


def plot_scores(rows: list[dict], path: Path) -> None:
    """Two panels (share, pointing): a bar per run and method with its 95 % interval; 0.25 dashed."""
    from xtl.io import pyplot, save_figure

    plt = pyplot()
    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.42 * len(rows) + 2), 6.0), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, measure in zip(axes[:, 0], MEASURES):
        x, ticks = 0.0, []
        for k, run in enumerate(runs):
            for r in (r for r in rows if r["run"] == run):
                value, low, high = (float(r[f"{measure}{s}"]) for s in ("", "_low", "_high"))
                ax.bar(x, value, color="lightgrey" if r["method"] in REFERENCES else colours[k % len(colours)],
                       edgecolor="black", linewidth=0.5, yerr=[[value - low], [high - value]], capsize=2)
                ticks.append((x, r["method"]))
                x += 1
            x += 0.8
        ax.axhline(EVEN_SHARE, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share in the quadrant" if measure == "share" else "pointing (max in the quadrant)")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k % len(colours)]) for k in range(len(runs))]
    handles.append(plt.Rectangle((0, 0), 1, 1, color="lightgrey"))
    axes[0, 0].legend(handles, [*runs, "references"], fontsize=7, loc="upper right")
    n = int(rows[0]["mosaics"]) if rows else 0
    axes[0, 0].set_title(f"Grid pointing game: {n} 2 x 2 mosaics, each explained for its 4 classes "
                         "(whiskers: bootstrap 95 % interval; dashed: 0.25, a map that ignores the class)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_gallery(game: ModelGame, positions: torch.Tensor, class_names: list[str], labels: torch.Tensor,
                 path: Path) -> None:
    """The first mosaics: per method a row of the four maps, the explained class's quadrant outlined."""
    from xtl.io import pyplot, save_figure

    plt = pyplot()
    methods = list(game.shown)
    k = game.images.shape[0]
    fig, axes = plt.subplots(k * len(methods), 5, figsize=(7.0, 1.45 * k * len(methods)), squeeze=False)
    side = game.side
    half = side / 2
    corners = [(0, 0), (half, 0), (0, half), (half, half)]
    for i in range(k):
        for j, method in enumerate(methods):
            row = axes[i * len(methods) + j]
            row[0].imshow(game.images[i].permute(1, 2, 0).numpy())
            row[0].set_ylabel(method, fontsize=6)
            row[0].set_xticks([])
            row[0].set_yticks([])
            for q in range(4):
                ax = row[q + 1]
                ax.axis("off")
                ax.imshow(game.images[i].permute(1, 2, 0).numpy())
                maps = game.shown[method]
                if len(maps) > 4 * i + q:
                    ax.imshow(maps[4 * i + q].numpy(), cmap="jet", alpha=0.55)
                x0, y0 = corners[q]
                ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), half, half, fill=False, edgecolor="white", linewidth=1.2))
                share = float(game.scores[method]["share"][4 * i + q])
                ax.set_title(f"{class_names[int(labels[positions[i, q]])]}: {share:.2f}", fontsize=6)
    fig.suptitle(f"{game.label}: each class's map of the mosaic; white: its quadrant; number: the share in it", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def grid_pointing_summary(folder: str | Path) -> dict:
    """What the game in `folder` found, for the report: {"rows", "tests", "sentences", "settings",
    "candidates", "test_images"}; {"not_played": why} where a pipeline could not draw the mosaics; {}
    where it was not played there."""
    from xtl.io import read_csv

    folder = Path(folder)
    try:
        info = json.loads((folder / SETTINGS_JSON).read_text())
    except (OSError, ValueError):
        info = {}
    info = info if isinstance(info, dict) else {}
    if info.get("not_played"):
        return {"not_played": str(info["not_played"]), "settings": info.get("settings", {})}
    if not (folder / CSV_NAME).is_file():
        return {}
    rows = [dict(r) for r in read_csv(folder / CSV_NAME, floats=True,
                                      text=("run", "model", "family", "method", "reading", "layout"))]
    tests = [dict(r) for r in read_csv(folder / TESTS_CSV, floats=True, missing_ok=True,
                                       text=("measure", "kind", "first_run", "first_method", "second_run",
                                             "second_method", "verdict"))]
    return {"rows": rows, "tests": tests, "sentences": grid_pointing_sentences(rows, tests),
            "settings": info.get("settings", {}), "candidates": info.get("candidates"),
            "test_images": info.get("test_images")}


def interval(row: dict, measure: str) -> str:
    return f"{float(row[measure]):.3f} [{float(row[measure + '_low']):.3f}, {float(row[measure + '_high']):.3f}]"


def grid_pointing_table(rows: list[dict]):
    """The scores as a rich table: share and pointing, mean [95 % interval], per run and method."""
    from rich.table import Table

    n = int(rows[0]["mosaics"]) if rows else 0
    table = Table("run", "method", "reading", "share in the quadrant", "pointing", "flat", "s",
                  title=f"Grid pointing game: {n} mosaics x 4 classes (a map ignoring the class: 0.25)")
    for r in rows:
        table.add_row(str(r["run"]), str(r["method"]), str(r["reading"]), interval(r, "share"), interval(r, "pointing"),
                      str(int(r["flat_maps"])), f"{float(r['seconds']):.1f}")
    return table


def grid_pointing_sentences(rows: list[dict], tests: list[dict], alpha: float = 0.05) -> list[str]:
    """What the tests of one game support, in words: per run, the methods whose share in the quadrant is
    above every reference (each paired test Holm-corrected) and those that are not; per method two
    runs share, which run's maps localise better, or that the tests cannot decide."""
    share = {(t["first_run"], t["first_method"], t["second_run"], t["second_method"]): t
             for t in tests if t["measure"] == "share"}
    n = int(rows[0]["mosaics"]) if rows else 0
    sentences = []
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for run in runs:
        methods = [r for r in rows if r["run"] == run and r["method"] not in REFERENCES]
        above, other = [], []
        for r in methods:
            verdicts = {ref: share.get((run, r["method"], run, ref), {}).get("verdict", "cannot decide") for ref in REFERENCES}
            text = f"{r['method']} {float(r['share']):.2f} [{float(r['share_low']):.2f}, {float(r['share_high']):.2f}]"
            if all(v == "first" for v in verdicts.values()):
                above.append(text)
            else:
                worse = [ref for ref, v in verdicts.items() if v == "second"]
                undecided = [ref for ref, v in verdicts.items() if v == "cannot decide"]
                parts = ([f"below {', '.join(worse)}"] if worse else []) + \
                        ([f"not distinguishable from {', '.join(undecided)}"] if undecided else [])
                other.append(f"{text} ({'; '.join(parts)})")
        if above:
            sentences.append(f"{run}: {', '.join(above)} of the positive relevance lies in the explained class's "
                             f"quadrant, more than every reference (random, centre, edge: 0.25 on average) on the "
                             f"same {n} mosaics.")
        if other:
            sentences.append(f"{run}: not above every reference: {', '.join(other)}.")
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            for t in (t for key, t in share.items() if key[0] == a and key[2] == b and key[1] == key[3]
                      and t["kind"] == "model"):
                diff = f"{float(t['mean']):+.3f} [{float(t['low']):+.3f}, {float(t['high']):+.3f}]"
                if t["verdict"] == "first":
                    sentences.append(f"{t['first_method']}: {a}'s maps localise the class better than {b}'s ({diff}).")
                elif t["verdict"] == "second":
                    sentences.append(f"{t['first_method']}: {b}'s maps localise the class better than {a}'s ({diff}).")
                else:
                    sentences.append(f"{t['first_method']}: cannot decide between {a} and {b} ({diff}).")
    return sentences
