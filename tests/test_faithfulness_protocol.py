"""The faithfulness protocol (issue 24) on known answers: a linear model whose exact map is known,
a map and its negation, the steps' coverage, the gap of random maps, Holm by hand, paired against
unpaired intervals, the three readings of a signed method on a real (tiny) run with both baselines,
and the report's sentences from the paired tests."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xtl.config import RunConfig
from xtl.data import load_split
from xtl.evaluate import evaluate
from xtl.faithfulness import METRICS, cell_maps, faithfulness_run, random_maps, score_maps
from xtl.faithfulness.metrics import metric_fractions
from xtl.faithfulness.paired import comparison_rows, holm, paired_difference
from xtl.faithfulness.readings import read_raw, readings_of
from xtl.faithfulness.results import read_rows, read_tests
from xtl.runs import RunDir, split_spec
from xtl.train import finetune

torch.set_num_threads(1)


class Linear(nn.Module):
    """Two classes; the logit of class 0 is sum(w * x), of class 1 zero: w * x is the exact map."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = (x * self.w).sum((1, 2, 3))
        return torch.stack([evidence, torch.zeros_like(evidence)], 1)


def _linear_case(n: int = 32, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, 3, size, size, generator=g) * 0.02
    images = torch.randn(n, 3, size, size, generator=g) + 0.5
    exact = (images * w).sum(1)  # [B, H, W], the exact contribution of each pixel to the logit
    return Linear(w), images, torch.zeros(n, dtype=torch.long), exact


def test_the_exact_map_of_a_linear_model_beats_its_own_cell_average_on_a_fine_grid_and_not_on_the_coarse_one():
    model, images, labels, exact = _linear_case()
    cells = cell_maps(exact, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)  # each 8 x 8 block its mean
    fine = score_maps(model, images, labels, {"exact": exact, "cells": cells}, targets=labels, steps=10, grid=32)
    coarse = score_maps(model, images, labels, {"exact": exact, "cells": cells}, targets=labels, steps=10, grid=4)
    auc = lambda s, name, metric: float(s[name].curves[metric].auc.mean())  # noqa: E731
    assert auc(fine, "exact", "deletion") < auc(fine, "cells", "deletion") - 0.1  # 0.05 against 0.26
    gap = lambda s, name: auc(s, name, "insertion") - auc(s, name, "deletion")  # noqa: E731
    assert gap(fine, "exact") > gap(fine, "cells") + 0.2
    for metric in METRICS:  # on the 4 x 4 grid a map is its cell means: the two are the same map
        assert torch.equal(coarse["exact"].curves[metric].auc, coarse["cells"].curves[metric].auc)


def test_negating_a_signed_map_swaps_its_two_orders_and_leaves_its_absolute_reading_alone():
    model, images, labels, exact = _linear_case(n=16, seed=1)
    maps = {"map": exact, "negated": -exact, "abs": read_raw(exact, "absolute"), "abs_negated": read_raw(-exact, "absolute")}
    s = score_maps(model, images, labels, maps, targets=labels, steps=10, grid=32)
    auc = lambda name, metric: s[name].curves[metric].auc  # noqa: E731
    assert torch.allclose(auc("negated", "deletion"), auc("map", "insertion"), atol=1e-6)
    assert torch.allclose(auc("negated", "insertion"), auc("map", "deletion"), atol=1e-6)
    assert torch.equal(auc("negated", "positive"), auc("map", "negative"))
    for metric in METRICS:
        assert torch.equal(auc("abs", metric), auc("abs_negated", metric))
    # the positive part of the negated map is the negative evidence of the map
    assert torch.equal(read_raw(-exact, "positive"), (-exact).clamp(min=0))
    assert readings_of("attnlrp") == readings_of("integrated_gradients") == ("signed", "positive", "absolute")
    assert readings_of("gradcam") == readings_of("saliency") == readings_of("random") == ("unsigned",)


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_every_curve_runs_from_zero_to_its_stated_maximum_in_steps_no_wider_than_one_over_steps(steps):
    model, images, labels, exact = _linear_case(n=4)
    s = score_maps(model, images, labels, {"map": exact}, steps=steps, grid=32)["map"]
    for name, metric in METRICS.items():
        x = s.curves[name].x
        masked = (1 - x).flip(0) if metric.revealed_axis else x
        assert masked[0] == 0 and abs(float(masked[-1]) - metric.max_fraction) < 1e-9, (name, masked)
        assert float(masked.diff().max()) <= 1 / steps + 1e-9
        assert s.curves[name].values.shape == (4, len(x))
    if steps == 10:  # Chefer et al.'s 0, 10 %, ..., 90 %
        assert torch.allclose(metric_fractions(METRICS["positive"], 10), torch.arange(10, dtype=torch.float64) / 10)


def test_the_gap_of_random_maps_is_near_zero_and_its_interval_covers_zero():
    model, images, labels, _ = _linear_case(n=300, size=16, seed=3)
    maps = random_maps((300, 16, 16), seed=4)
    s = score_maps(model, images, labels, {"random": maps}, targets=labels, steps=10)["random"]
    gap = s.curves["insertion"].auc - s.curves["deletion"].auc
    d = paired_difference(gap, torch.zeros_like(gap))
    assert abs(d.mean) < 0.02 and d.low < 0 < d.high and d.p > 0.05
    # the exact map's gap on the same images is far from 0
    exact_gap = score_maps(model, images, labels, {"m": _linear_case(n=300, size=16, seed=3)[3]}, targets=labels,
                           steps=10)["m"]
    assert float((exact_gap.curves["insertion"].auc - exact_gap.curves["deletion"].auc).mean()) > 0.1


def test_holm_adjusts_as_computed_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # 0.5 x 2 capped at 1; 0.9 x 1 never below the step before
    assert holm([]) == []


def test_a_paired_test_finds_a_small_consistent_difference_that_separate_intervals_miss():
    g = torch.Generator().manual_seed(0)
    first = torch.rand(100, generator=g)  # images differ a lot ...
    second = first + 0.02 + 0.005 * torch.randn(100, generator=g)  # ... the methods a little, consistently
    half = lambda x: 1.96 * float(x.std()) / math.sqrt(len(x))  # noqa: E731
    assert float(second.mean()) - half(second) < float(first.mean()) + half(first)  # the intervals overlap
    d = paired_difference(second, first)
    assert 0.018 < d.low < d.mean < d.high < 0.022 and d.p < 1e-3
    assert paired_difference(second, first) == d  # seeded


@pytest.mark.parametrize("shift", [0.0, 0.01, 0.02, 0.05])
def test_the_interval_and_the_p_value_come_from_the_same_resamples_and_agree(shift):
    g = torch.Generator().manual_seed(1)
    d = paired_difference(torch.randn(40, generator=g) * 0.1 + shift, torch.zeros(40))
    assert (d.p < 0.05) == (d.low > 0 or d.high < 0)


# ----------------------------------------------------------------------------- a real (tiny) run


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, cifar):
    config = RunConfig(source=str(cifar), model="timm:resnet10t", pretrained=False, input_size=64, split="random",
                       train_size=40, val_size=10, test_size=12, stratified=True, batch_size=20, epochs=1, patience=0)
    run = RunDir(tmp_path_factory.mktemp("runs") / "cnn")
    data = load_split(config.source, split_spec(config))
    finetune(config, data, run, progress=False)
    evaluate(run, data, device="cpu")
    results = faithfulness_run([run], methods=["saliency", "lrp_epsilon"], n_images=6, steps=3, explain_batch_size=3,
                               baseline=["zero", "road"], extra_grids=["model"], resume=False, progress=False)
    return run, results


def test_a_run_is_scored_on_the_common_grid_under_both_baselines_with_every_reading(scored_run):
    run, results = scored_run
    rows = read_rows(run.file("faithfulness.csv"))
    # CIFAR's 32 x 32 at a 64 px input: the common grid is the source's own; the model's grid only under zero
    assert [(r["baseline"], r["grid"]) for r in rows[::6]] == [("zero", "32"), ("road", "32"), ("zero", "2")]
    assert [(r["method"], r["reading"]) for r in rows[:6]] == [
        ("saliency", "unsigned"), ("lrp_epsilon", "signed"), ("lrp_epsilon", "positive"), ("lrp_epsilon", "absolute"),
        ("random", "unsigned"), ("uniform", "unsigned")]
    assert [r["label"] for r in rows[1:4]] == ["lrp_epsilon (signed)", "lrp_epsilon (positive part)", "lrp_epsilon (|R|)"]
    for r in rows:
        assert math.isclose(r["srg"], r["insertion"] - r["deletion"], abs_tol=1e-9)
        assert math.isclose(r["srg_accuracy"], r["negative"] - r["positive"], abs_tol=1e-9)
    images = read_rows(run.file("faithfulness_images.csv"))
    assert len(images) == 3 * 6 * 6 and [r["image"] for r in images[:6]] == [0, 1, 2, 3, 4, 5]
    signed = [r for r in images if r["label"] == "lrp_epsilon (signed)" and r["grid"] == "32" and r["baseline"] == "zero"]
    assert len(signed) == 6 and all(math.isfinite(r["logit_share"]) for r in signed)
    # the paired tests: the main grid only, both baselines, one Holm family
    tests = read_tests(run.file("faithfulness_tests.csv"))
    assert {t["grid"] for t in tests} == {"32"} and {t["baseline"] for t in tests} == {"zero", "road"}
    # per baseline and gap: 4 map sets x 2 references + saliency against each lrp_epsilon reading
    assert len(tests) == 2 * 2 * (4 * 2 + 3) and all(t["family"] == len(tests) for t in tests)
    assert all(t["p_holm"] >= t["p"] and t["verdict"] in ("first", "second", "cannot decide") for t in tests)
    assert not any(t["first_method"] == t["second_method"] for t in tests)  # no reading against its own method


def test_score_model_resolves_the_named_grids_from_its_inputs_and_refuses_native(scored_run):
    from dataclasses import replace

    from xtl.errors import XtlError
    from xtl.faithfulness.runner import score_model
    from xtl.faithfulness.settings import FaithfulnessSettings
    from xtl.inference import LoadedRun

    loaded = LoadedRun(scored_run[0], "test", "cpu")
    images, labels = loaded.inputs(slice(0, 2)), loaded.part.labels[:2]
    settings = FaithfulnessSettings(steps=2, explain_batch_size=2, baseline="zero")
    default = score_model(loaded.model, loaded.spec, images, labels, ["saliency"], settings)  # "common"
    fixed = score_model(loaded.model, loaded.spec, images, labels, ["saliency"], settings.with_grid(28))
    for a, b in zip(default, fixed):  # no source images here: "common" is the fixed 28 x 28 grid
        assert all(torch.equal(a.curves[c].values, b.curves[c].values) for c in a.curves)
    own = score_model(loaded.model, loaded.spec, images, labels, ["saliency"], replace(settings, grid="model"))
    two = score_model(loaded.model, loaded.spec, images, labels, ["saliency"], settings.with_grid(2))  # 64 px CAM
    assert all(torch.equal(own[0].curves[c].values, two[0].curves[c].values) for c in own[0].curves)
    with pytest.raises(XtlError, match="--grid native needs the source images"):
        score_model(loaded.model, loaded.spec, images, labels, ["saliency"], replace(settings, grid="native"))


def test_the_logit_share_is_the_sum_of_the_lrp_map_over_the_explained_logit(scored_run):
    from xtl.explain import explain
    from xtl.inference import LoadedRun

    run, results = scored_run
    loaded = LoadedRun(run, "test", "cpu")
    images = loaded.lazy_inputs(6)[0:6]
    with torch.no_grad():
        logits = loaded.model(images)
    predicted = logits.argmax(1)
    raw = explain(loaded.model, images, predicted, "lrp_epsilon", loaded.spec).raw
    expected = raw.flatten(1).sum(1).double() / logits.gather(1, predicted[:, None])[:, 0].double()
    signed = next(m for m in results[0].methods if m.method == "lrp_epsilon" and m.reading == "signed")
    assert torch.allclose(signed.extras["logit_share"], expected, rtol=1e-3, atol=1e-4)
    assert "logit_share" not in next(m for m in results[0].methods if m.method == "saliency").extras


def test_the_tests_of_the_per_image_rows_reproduce_the_written_ones(scored_run):
    run, _ = scored_run
    images = [r for r in read_rows(run.file("faithfulness_images.csv")) if r["grid"] == "32"]
    again = comparison_rows(images)
    written = read_tests(run.file("faithfulness_tests.csv"))
    assert [(t["first"], t["second"], t["measure"]) for t in again] == [(t["first"], t["second"], t["measure"])
                                                                        for t in written]
    assert [round(t["mean"], 9) for t in again] == [round(t["mean"], 9) for t in written]
    assert [t["p_holm"] for t in again] == pytest.approx([t["p_holm"] for t in written])


# ----------------------------------------------------------------------------- the report's sentences


def _rows_and_tests(verdicts: dict[tuple[str, str], str]):
    labels = ["attnlrp (signed)", "attnlrp (positive part)", "transformer_attribution"]
    rows = [{"run": "vit", "model": "vit", "method": label.split(" ")[0], "reading": "", "label": label,
             "n_images": 100.0, "baseline": "zero", "grid": "32", "srg": 0.1, "srg_accuracy": 0.1}
            for label in labels + ["random", "uniform"]]
    rows[0]["logit_share"], rows[0]["logit_share_std"] = 0.12, 0.05
    tests = []
    for (first, second), verdict in verdicts.items():
        kind = "reference" if second in ("random", "uniform") else "method"
        tests.append({"run": "vit", "model": "vit", "baseline": "zero", "grid": "32", "measure": "srg", "kind": kind,
                      "first": first, "second": second, "mean": 0.05 if verdict != "second" else -0.05, "low": 0.01,
                      "high": 0.09, "p": 0.001, "p_holm": 0.01 if verdict != "cannot decide" else 0.2,
                      "verdict": verdict, "family": 9.0})
    return rows, tests


def test_findings_say_beats_only_where_the_holm_corrected_paired_test_does_and_name_the_readings():
    from xtl.report.findings import faithfulness_findings

    rows, tests = _rows_and_tests({
        ("attnlrp (signed)", "random"): "first", ("attnlrp (signed)", "uniform"): "first",
        ("attnlrp (positive part)", "random"): "first", ("attnlrp (positive part)", "uniform"): "cannot decide",
        ("transformer_attribution", "random"): "first", ("transformer_attribution", "uniform"): "first",
        ("attnlrp (signed)", "transformer_attribution"): "first",
        ("attnlrp (positive part)", "transformer_attribution"): "cannot decide",
    })
    [(heading, sentences)] = faithfulness_findings(rows, tests)
    assert heading == "vit"
    lead = sentences[0]
    assert "attnlrp (signed) and transformer_attribution beat both reference maps" in lead
    assert "Holm-corrected over the report's 9 comparisons" in lead
    assert "For attnlrp (positive part) the tests cannot decide" in lead
    assert sentences[1] == ("Between the methods of vit: attnlrp (signed) over transformer_attribution +0.050 "
                            "[+0.010, +0.090] (a signed reading against another reading). The other 1 pair cannot "
                            "be decided.")
    assert sentences[-1].startswith("attnlrp of vit: on average 0.12 ± 0.01 of the explained logit reaches the pixels")


def test_findings_say_cannot_decide_when_no_test_decides():
    from xtl.report.findings import faithfulness_findings

    rows, tests = _rows_and_tests({(a, b): "cannot decide" for a in ("attnlrp (signed)", "transformer_attribution")
                                   for b in ("random", "uniform")} | {
        ("attnlrp (signed)", "transformer_attribution"): "cannot decide"})
    [(_, sentences)] = faithfulness_findings(rows, tests)
    assert "no map set of vit beats both reference maps" in sentences[0] and "the data cannot decide" in sentences[0]
    assert sentences[1] == "Between the methods of vit the paired tests cannot decide any of the 1 pairs."


def test_the_pipelines_defaults_are_the_protocol():
    from xtl.errors import XtlError
    from xtl.faithfulness.settings import FaithfulnessSettings
    from xtl.pipeline.config import PipelineConfig, load_config

    config = PipelineConfig()
    assert (config.faithfulness_grid, config.faithfulness_steps, config.baselines) == ("common", 10, ["zero", "road"])
    assert config.faithfulness_sensitivity_grids == ["model", "none"]
    assert FaithfulnessSettings().grid == "common"
    quick = load_config()  # make run: the same protocol, fewer images, the zero baseline alone (its budget)
    assert (quick.faithfulness_grid, quick.faithfulness_steps, quick.baselines) == ("common", 10, ["zero"])
    assert load_config(options={"preset": "offline-full"}).baselines == ["zero", "road"]
    with pytest.raises(XtlError, match="^option --faithfulness-baseline must be one or more of zero, mean, blur, road"):
        load_config(options={"faithfulness_baseline": ["zero", "grey"]})
    with pytest.raises(XtlError, match="^option --faithfulness-sensitivity-grids must be a number >= 1, common"):
        load_config(options={"faithfulness_sensitivity_grids": ["fine"]})
