"""Numbers of finished runs turned into table rows and sentences for the report."""

from __future__ import annotations

import math
from dataclasses import dataclass

from xtl.errors import XtlError
from xtl.evaluate.metrics import McNemar, mcnemar, paired_correctness
from xtl.runs import RunDir, best_epoch_of, run_title


@dataclass
class ModelResult:
    """One evaluated run, as the report and `xtl compare` show it."""

    run: RunDir
    config: dict
    derived: dict
    versions: dict
    metrics: dict
    epochs: list[dict]

    @classmethod
    def read(cls, run: RunDir) -> "ModelResult":
        data = run.read()
        return cls(run, data["run"], data["derived"], data.get("versions", {}), run.metrics(), run.history("epochs"))

    @property
    def name(self) -> str:
        return self.run.path.name

    @property
    def model(self) -> str:
        return self.config["model"]

    @property
    def best_epoch(self) -> dict | None:
        """The history row of the epoch whose weights were evaluated (metrics.json's `best_epoch`)."""
        best = self.metrics.get("best_epoch")
        if best is None:
            best = best_epoch_of(self.epochs)
        return next((e for e in self.epochs if best is not None and int(e["epoch"]) == int(best)), None)

    def row(self) -> dict[str, str]:
        """The comparison-table row (paper: test accuracy per model; we add the CI, AUC and sizes)."""
        m, sizes, best = self.metrics, self.derived["split_sizes"], self.best_epoch
        low, high = m["accuracy_ci95"]
        return {
            "run": self.name,
            "model": self.model,
            "input": f"{self.derived['input_size']} px",
            "train/val/test": f"{sizes['train']}/{sizes['val']}/{sizes['test']}",
            "epochs (best)": f"{len(self.epochs)} ({m['best_epoch']:.0f})" if best else "-",
            "val acc": f"{best['val_accuracy']:.3f}" if best else "-",
            "test acc [95 % CI]": f"{m['accuracy']:.3f} [{low:.3f}, {high:.3f}]",
            "ROC-AUC": f"{m['roc_auc_macro_ovr']:.3f}",
            "train img/s": f"{m['images_per_s_train']:.1f}" if m.get("images_per_s_train") else "-",
        }


@dataclass
class Confusion:
    true: str
    predicted: str
    count: int
    of: int  # test images of the true class

    @property
    def share(self) -> float:
        return self.count / self.of if self.of else 0.0


def top_confusions(metrics: dict, limit: int = 3) -> list[Confusion]:
    """The largest off-diagonal cells of the confusion matrix (rows: true class, columns: predicted)."""
    names, matrix = metrics["class_names"], metrics["confusion_matrix"]
    cells = [Confusion(names[t], names[p], matrix[t][p], sum(matrix[t]))
             for t in range(len(names)) for p in range(len(names)) if t != p and matrix[t][p] > 0]
    return sorted(cells, key=lambda c: (-c.count, -c.share, c.true, c.predicted))[:limit]


def confused_pairs(metrics: dict) -> dict[frozenset, int]:
    """Mistakes between two classes, both ways."""
    names, matrix = metrics["class_names"], metrics["confusion_matrix"]
    return {frozenset((names[a], names[b])): matrix[a][b] + matrix[b][a]
            for a in range(len(names)) for b in range(a + 1, len(names))}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def confusion_sentences(results: list[ModelResult]) -> list[str]:
    """The most-confused class pairs, written out: per model, then what the models share."""
    sentences = []
    for r in results:
        top = top_confusions(r.metrics)
        if not top:
            sentences.append(f"{r.model} made no mistakes on its {r.metrics['n_images']} test images.")
            continue
        parts = [f"{c.true} as {c.predicted} ({c.count} of {c.of} {c.true} images, {_pct(c.share)})" for c in top]
        mistakes = r.metrics["n_images"] - round(r.metrics["accuracy"] * r.metrics["n_images"])
        sentences.append(f"{r.model} made {mistakes} mistakes on {r.metrics['n_images']} test images; "
                         f"it most often took " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] + ".")
    if len(results) > 1:
        totals: dict[frozenset, list[int]] = {}
        for r in results:
            for pair, n in confused_pairs(r.metrics).items():
                totals.setdefault(pair, []).append(n)
        ranked = sorted(totals.items(), key=lambda kv: (-sum(kv[1]), sorted(kv[0])))
        pair, counts = ranked[0]
        if sum(counts):
            a, b = sorted(pair)
            each = ", ".join(f"{r.model} {n}" for r, n in zip(results, counts))
            sentences.append(f"Across the models, {a} and {b} are the most confused pair: {sum(counts)} mistakes "
                             f"between them, either way ({each}).")
    return sentences


def summary_sentence(results: list[ModelResult]) -> str:
    """The results paragraph's first sentence: each model's test accuracy with its interval."""
    parts = []
    for r in results:
        low, high = r.metrics["accuracy_ci95"]
        parts.append(f"{r.model} reached {_pct(r.metrics['accuracy'])} test accuracy (95 % CI {_pct(low)} to "
                     f"{_pct(high)}; macro ROC-AUC {r.metrics['roc_auc_macro_ovr']:.3f})")
    n = {r.metrics["n_images"] for r in results}
    return f"On {'/'.join(str(x) for x in sorted(n))} test images, " + "; ".join(parts) + "."


def labels(results: list[ModelResult]) -> list[str]:
    """How sentences name each run: its model, or `folder (model)` where two runs share a model."""
    models = [r.model for r in results]
    return [r.model if models.count(r.model) == 1 else run_title(r.name, r.model) for r in results]


# ----------------------------------------------------------------------------- what kind of run this is

# The paper's scale: 4,500 training images at 224 px. A run below either is CPU-scale.
PAPER_TRAIN_IMAGES = 4500
PAPER_INPUT_SIZE = 224
GPU_PRESETS_NOTE = (
    "The quick preset is a CPU-scale stand-in for the two GPU presets: the paper preset (xtl run --preset paper) "
    "fine-tunes the paper's AlexNet, ResNet-34 and ViT-B/16 (hub weights) on the paper split with the paper's "
    "recipe, and the offline-full preset (xtl run --preset offline-full) fine-tunes the offline models "
    "(EfficientNet-Lite0, DINOv2 ViT-S/14) on the paper split at full resolution. The accuracies here come from "
    "low resolution, a few epochs and frozen early blocks, and are not comparable with the paper's."
)


@dataclass
class RunKind:
    """What a run was, read from its config.yaml (`run` and `derived`); None where not recorded."""

    scale: str  # "CPU-scale" or "GPU-scale"
    train_images: int | None
    input_size: int | None
    epochs: int | None  # configured
    trained: int  # epochs in the history
    device: str | None
    precision: str | None
    weights: str | None
    pretrained: bool
    recipe: str | None
    freeze_blocks: int | None
    head_epochs: float | None


def run_kind(config: dict, derived: dict, trained: int) -> RunKind:
    """The run's scale and recipe: GPU-scale when it trained on at least the paper's 4,500 images at
    224 px or more, CPU-scale otherwise (whatever hardware it ran on, which is reported beside it)."""
    sizes = derived.get("split_sizes") or {}
    train = sizes.get("train", config.get("train_size"))
    size = derived.get("input_size", config.get("input_size"))
    gpu = train is not None and size is not None and train >= PAPER_TRAIN_IMAGES and size >= PAPER_INPUT_SIZE

    def recorded(key: str, *aliases: str) -> str | None:
        for source, name in [(derived, key), *((derived, a) for a in aliases), (config, key)]:
            value = source.get(name)
            if value not in (None, "", "auto"):
                return str(value)
        return None

    model = derived.get("model") or {}
    pick = lambda key: config[key] if config.get(key) is not None else derived.get(key)  # noqa: E731
    return RunKind(
        scale="GPU-scale" if gpu else "CPU-scale", train_images=train, input_size=size, epochs=config.get("epochs"),
        trained=trained, device=recorded("accelerator", "device"), precision=recorded("precision"),
        weights=config.get("weights") or model.get("weights"), pretrained=bool(config.get("pretrained", True)),
        recipe=config.get("preset"), freeze_blocks=pick("freeze_blocks"), head_epochs=pick("head_epochs"),
    )


def describe_kind(label: str, kind: RunKind) -> str:
    """One sentence: the run's scale, data, epochs, hardware, weights and recipe."""
    data = f"{kind.train_images:,} training images" if kind.train_images is not None else "training images not recorded"
    data += f" at {kind.input_size} px" if kind.input_size is not None else ""
    parts = [f"{label}: {kind.scale} ({data}; the paper: {PAPER_TRAIN_IMAGES:,} at {PAPER_INPUT_SIZE} px)"]
    if kind.epochs is not None:
        parts.append(f"{kind.trained} of {kind.epochs} epoch{'s' if kind.epochs != 1 else ''} trained")
    parts.append(f"precision {kind.precision or 'not recorded'}" + (f" on {kind.device}" if kind.device else ""))
    if kind.freeze_blocks:
        parts.append(f"the first {kind.freeze_blocks} block{'s' if kind.freeze_blocks != 1 else ''} frozen")
    elif kind.freeze_blocks is not None:
        parts.append("every block trained")
    if kind.head_epochs:
        parts.append(f"the head trained alone for {kind.head_epochs:g} epoch{'s' if kind.head_epochs != 1 else ''} "
                     f"first")
    weights = kind.weights or "not recorded"
    parts.append(f"weights {weights}" + ("" if kind.pretrained else " (not loaded: random initialisation)"))
    parts.append(f"recipe {kind.recipe or 'not recorded'}")
    return ", ".join(parts) + "."


def kind_sentences(results: list[ModelResult], preset: str | None = None) -> list[str]:
    """The summary's opening: what kind of run this is, per model, and what the GPU presets are for
    when it is the quick preset (`preset`: the `xtl run` preset, when known)."""
    kinds = [run_kind(r.config, r.derived, len(r.epochs)) for r in results]
    scales = sorted({k.scale for k in kinds})
    named = f" (preset {preset})" if preset else ""
    lead = (f"This is a {scales[0]} run{named}." if len(scales) == 1
            else f"This run{named} mixes CPU-scale and GPU-scale models.")
    sentences = [lead] + [describe_kind(label, k) for label, k in zip(labels(results), kinds)]
    if preset == "quick" or (preset is None and any(k.recipe == "quick" for k in kinds)):
        sentences.append(GPU_PRESETS_NOTE)
    return sentences


# ----------------------------------------------------------------------------- paired comparison of models

ALPHA = 0.05


@dataclass
class Paired:
    """McNemar's exact test of two runs on their shared test images, or why it cannot be done."""

    first: str
    second: str
    test: McNemar | None
    accuracy: tuple[float, float] | None = None  # of each on the paired images
    reason: str | None = None

    def row(self) -> dict[str, str]:
        t = self.test
        return {
            "model A": self.first,
            "model B": self.second,
            "images": f"{t.n}" if t else "-",
            "acc A": f"{self.accuracy[0]:.3f}" if t else "-",
            "acc B": f"{self.accuracy[1]:.3f}" if t else "-",
            "b (A right, B wrong)": f"{t.b}" if t else "-",
            "c (A wrong, B right)": f"{t.c}" if t else "-",
            "p (exact)": _p(t.p_value) if t else "-",
            "mid-p": _p(t.mid_p) if t else "-",
        }


def paired_test(first: str, second: str, a: tuple, b: tuple) -> Paired:
    """McNemar's exact test of two runs from their (ids, labels, predicted) on the test split;
    without one (other test images) the reason, naming what differs."""
    try:
        right_a, right_b = paired_correctness(a, b)
    except XtlError as e:
        return Paired(first, second, None, reason=str(e))
    return Paired(first, second, mcnemar(right_a, right_b), (float(right_a.mean()), float(right_b.mean())))


def paired_comparisons(results: list[ModelResult]) -> list[Paired]:
    """Every pair of runs, tested on the same test images (their predictions.csv)."""
    from xtl.evaluate import read_predicted

    names, predicted = labels(results), []
    for r in results:
        try:
            predicted.append(read_predicted(r.run))
        except XtlError as e:
            predicted.append(e)
    pairs = []
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            missing = [f"{names[k]} has no usable predictions.csv" for k in (i, j) if isinstance(predicted[k], XtlError)]
            if missing:
                pairs.append(Paired(names[i], names[j], None, reason="; ".join(missing)))
            else:
                pairs.append(paired_test(names[i], names[j], predicted[i], predicted[j]))
    return pairs


def paired_sentence(p: Paired, alpha: float = ALPHA) -> str:
    """Which model is more accurate on the same images, and whether McNemar's exact test finds the
    difference significant at `alpha`."""
    t = p.test
    if t is None:
        return (f"McNemar's test of {p.first} against {p.second} cannot be done: {p.reason}. "
                "A paired test needs both models' predictions on the same test images.")
    if t.discordant == 0:
        return (f"On the same {t.n} test images {p.first} and {p.second} are right and wrong on exactly the same "
                f"images (b = c = 0): there is no difference to test.")
    if t.b == t.c:
        return (f"On the same {t.n} test images {p.first} and {p.second} are equally accurate "
                f"({_pct(p.accuracy[0])}): each is right on {t.b} images the other gets wrong "
                f"(McNemar's exact test p = 1).")
    better, worse = (p.first, p.second) if t.b > t.c else (p.second, p.first)
    alone_better, alone_worse = max(t.b, t.c), min(t.b, t.c)
    acc_better, acc_worse = max(p.accuracy), min(p.accuracy)
    verdict = (f"the difference is significant at the {alpha:g} level."
               if t.p_value < alpha else
               f"the difference is not significant at the {alpha:g} level: this test set does not show "
               f"that either model is more accurate.")
    return (f"On the same {t.n} test images {better} is more accurate than {worse} ({_pct(acc_better)} vs "
            f"{_pct(acc_worse)}): {alone_better} images only {better} classified correctly, {alone_worse} only "
            f"{worse} (McNemar's exact test on these {t.discordant} discordant images, p = {_p(t.p_value)}); "
            + verdict)


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


# ----------------------------------------------------------------------------- training

def last_epoch_note(label: str, epochs: list[dict], best_epoch: float | None) -> str | None:
    """A note when the best epoch (the one whose weights were kept, `xtl.runs.improves`) is the last one trained."""
    if not epochs:
        return None
    if best_epoch is None:
        best_epoch = best_epoch_of(epochs)
    last = epochs[-1]
    if int(best_epoch) != int(last["epoch"]):
        return None
    if len(epochs) == 1:
        return f"{label} was trained for a single epoch, so its best epoch is its last: more epochs may help."
    before = epochs[-2]["val_loss"]
    return (f"{label}: validation loss was still falling at the last epoch ({before:.4f} to {last['val_loss']:.4f} "
            f"at epoch {int(last['epoch'])}, the best): more epochs may help.")


def last_epoch_notes(results: list[ModelResult]) -> list[str]:
    notes = [last_epoch_note(label, r.epochs, r.metrics.get("best_epoch"))
             for label, r in zip(labels(results), results)]
    return [n for n in notes if n]


# ----------------------------------------------------------------------------- faithfulness in words

GAP_WORDS = {
    "srg": "the probability gap (insertion − deletion, the symmetric relevance gain; higher is better, 0 for a "
           "random ranking)",
    "srg_accuracy": "the accuracy gap (negative − positive perturbation; higher is better, 0 for a random ranking)",
}


def _signed(label: str) -> bool:
    return label.endswith("(signed)")


def _difference(t: dict) -> str:
    return f"{t['mean']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}]"


def faithfulness_findings(rows: list[dict], tests: list[dict] | None = None) -> list[tuple[str, list[str]]]:
    """Per model (and baseline, where there are several), on each gap (`xtl.faithfulness.metrics.GAPS`):
    which map sets beat both reference maps (random and uniform), and which map sets beat which others
    of the same model, by the Holm-corrected paired tests (`tests`: the rows of the job's
    faithfulness_tests.csv, `xtl.faithfulness.paired`); every other comparison is "cannot decide".
    Each map set is named with its reading (`attnlrp (signed)`, `attnlrp (positive part)`), and a
    sentence that compares a signed reading with another reading says so. LRP-type map sets get a
    sentence on the share of the explained logit that reaches the pixels. `rows`: the faithfulness
    CSV's rows (`xtl.faithfulness.results.read_rows`); only the main grid's (the first row's) are read."""
    from xtl.faithfulness.settings import REFERENCES

    if not rows:
        return []
    grid = str(rows[0].get("grid", "pixel"))
    rows = [r for r in rows if str(r.get("grid", "pixel")) == grid]
    tests = [t for t in (tests or []) if str(t["grid"]) == grid]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["run"], str(row.get("baseline", ""))), []).append(row)
    models = list(dict.fromkeys((g[0]["run"], g[0]["model"]) for g in groups.values()))
    names = [m for _, m in models]
    several_baselines = len({b for _, b in groups}) > 1
    family = int(tests[0]["family"]) if tests else 0
    out = []
    for (run, baseline), group in groups.items():
        model = group[0]["model"]
        label = model if names.count(model) == 1 else run_title(run, model)
        heading = f"{label}, baseline {baseline}" if several_baselines else label
        refs = {r["method"] for r in group if r["method"] in REFERENCES}
        methods = [r for r in group if r["method"] not in REFERENCES]
        n = min(int(r["n_images"]) for r in group)
        if len(refs) < len(REFERENCES):
            out.append((heading, [f"For {label} the table lacks a reference map (random and uniform): no method is "
                                  f"compared with them."]))
            continue
        if not methods:
            out.append((heading, [f"For {label} the table holds only the reference maps, no explanation method."]))
            continue
        if n < 2:
            out.append((heading, [f"For {label} only {n} image was scored: the intervals are not defined and no "
                                  f"method is compared with the reference maps."]))
            continue
        mine = [t for t in tests if t["run"] == run and str(t["baseline"]) == baseline]
        if not mine:
            out.append((heading, [f"For {label} there are no paired tests (faithfulness_tests.csv): run `xtl "
                                  f"faithfulness` again to compare the methods on the same images."]))
            continue
        sentences = []
        for measure, words in GAP_WORDS.items():
            here = [t for t in mine if t["measure"] == measure]
            if not here:
                continue
            sentences.append(_reference_sentence(label, words, here, family, n))
            sentences.extend(_method_sentences(label, here))
        sentences.extend(_logit_share_sentences(label, methods))
        out.append((heading, sentences))
    return out


def _reference_sentence(label: str, words: str, tests: list[dict], family: int, n: int) -> str:
    """Which map sets beat both references on one gap (Holm), with the differences against each."""
    from xtl.faithfulness.settings import REFERENCES

    against = [t for t in tests if t["kind"] == "reference"]
    sets = list(dict.fromkeys(t["first"] for t in against))
    beats = {s: all(t["verdict"] == "first" for t in against if t["first"] == s) and
             len([t for t in against if t["first"] == s]) == len(REFERENCES) for s in sets}
    worse = [s for s in sets if any(t["verdict"] == "second" and t["second"] == "random"
                                    for t in against if t["first"] == s)]
    shown = lambda s: s + " (" + ", ".join(f"vs {t['second']} {_difference(t)}" for t in against  # noqa: E731
                                            if t["first"] == s) + ")"
    test_words = f"paired tests on the same {n} images, Holm-corrected over the report's {family} comparisons"
    winners = [s for s in sets if beats[s]]
    if winners:
        sentence = (f"On {words}, {_join(winners)} beat{'s' if len(winners) == 1 else ''} both reference maps for "
                    f"{label} ({test_words}): " + "; ".join(shown(s) for s in winners) + ".")
        rest = [s for s in sets if not beats[s]]
        if rest:
            sentence += f" For {_join(rest)} the tests cannot decide against both references."
    else:
        sentence = (f"On {words}, no map set of {label} beats both reference maps ({test_words}; "
                    + "; ".join(shown(s) for s in sets) + "): the data cannot decide.")
    if worse:
        sentence += f" {_join(worse)} {'is' if len(worse) == 1 else 'are'} worse than the random map on this gap."
    return sentence


def _method_sentences(label: str, tests: list[dict]) -> list[str]:
    """Which map sets of one model beat which others on one gap (Holm), and how many pairs cannot be decided.
    A pair of a signed reading with another reading is said to be one."""
    pairs = [t for t in tests if t["kind"] == "method"]
    if not pairs:
        return []
    decided = []
    for t in pairs:
        if t["verdict"] == "cannot decide":
            continue
        better, worse = (t["first"], t["second"]) if t["verdict"] == "first" else (t["second"], t["first"])
        sign = 1 if t["verdict"] == "first" else -1
        d = {"mean": sign * t["mean"], "low": sign * (t["low"] if sign > 0 else t["high"]),
             "high": sign * (t["high"] if sign > 0 else t["low"])}
        mixed = " (a signed reading against another reading)" if _signed(better) != _signed(worse) else ""
        decided.append(f"{better} over {worse} {_difference(d)}{mixed}")
    undecided = len(pairs) - len(decided)
    if not decided:
        return [f"Between the methods of {label} the paired tests cannot decide any of the {len(pairs)} pairs."]
    return [f"Between the methods of {label}: " + "; ".join(decided) + "."
            + (f" The other {undecided} pair{'s' if undecided != 1 else ''} cannot be decided." if undecided else "")]


def _logit_share_sentences(label: str, methods: list[dict]) -> list[str]:
    """The share of the explained logit that reaches the pixels, for LRP-type map sets (one sentence per method)."""
    sentences, seen = [], set()
    for r in methods:
        share = r.get("logit_share")
        if share is None or not math.isfinite(share) or r["method"] in seen:
            continue
        seen.add(r["method"])
        half = Z95 * r.get("logit_share_std", 0.0) / math.sqrt(max(r["n_images"], 1))
        sentences.append(f"{r['method']} of {label}: on average {share:.2f} ± {half:.2f} of the explained logit reaches "
                         f"the pixels (the rest goes to biases, tokens and softmaxes), so its map is not a "
                         f"decomposition of the logit.")
    return sentences


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


Z95 = 1.96


# ----------------------------------------------------------------------------- ViT artefacts

def artefact_sentences(results: list[ModelResult]) -> list[str]:
    """A note per ViT run and method whose stored maps often peak on a single token
    (`xtl.report.artefacts`); nothing where the maps were not stored or rarely peak."""
    from xtl.report.artefacts import peak_counts

    sentences = []
    for label, r in zip(labels(results), results):
        if (r.derived.get("model") or {}).get("family") != "vit":
            continue
        for count in peak_counts(r.run):
            if count.notable:
                sentences.append(
                    f"{count.method} of {label} peaks on a single token in {count.peaked} of {count.of} images "
                    f"(one cell holds over a third of the map's mass and lies on the border or stands alone): "
                    f"consistent with the high-norm-token artefact of ViTs without registers (Darcet et al. 2024); "
                    f"such a peak need not mark the part of the image the model relies on.")
    return sentences
