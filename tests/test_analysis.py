"""xtl.analysis: statistics of maps with known answers, the bootstrap and permutation tools, agreement,
the claims' verdicts, and `xtl analyse` / the report section on two tiny real runs (issue 17)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from helpers import XTL, one_line_error, tiny_run
from xtl.analysis.agreement import agreement, spearman, top_iou
from xtl.analysis.claims import group_claim, paired_claim, verdict
from xtl.analysis.statistics import bootstrap_interval, bootstrap_test, map_statistics, mean_interval, relevance_shares


def _one_hot(h: int = 10, w: int = 10, r: int = 2, c: int = 7) -> torch.Tensor:
    m = torch.zeros(1, h, w)
    m[0, r, c] = 3.0
    return m


# ------------------------------------------------------------------------------ statistics


def test_a_one_hot_map_is_fully_concentrated_at_its_cell():
    s = map_statistics(_one_hot())
    assert s["gini"].item() == pytest.approx(0.99, abs=1e-3)  # (n-1)/n for n = 100 cells
    assert s["entropy"].item() == pytest.approx(0.0, abs=1e-12)
    assert s["top5"].item() == pytest.approx(1.0) and s["top10"].item() == pytest.approx(1.0)
    assert s["row"].item() == pytest.approx(2.5 / 10) and s["col"].item() == pytest.approx(7.5 / 10)
    assert s["spread"].item() == pytest.approx(0.0, abs=1e-12)


def test_a_uniform_map_has_no_concentration():
    s = map_statistics(torch.full((1, 8, 8), 0.3))
    assert s["gini"].item() == pytest.approx(0.0, abs=1e-6)
    assert s["entropy"].item() == pytest.approx(1.0)
    assert s["top10"].item() == pytest.approx(7 / 64)  # ceil(6.4) = 7 cells of 64
    assert (s["row"].item(), s["col"].item()) == (pytest.approx(0.5), pytest.approx(0.5))


def test_negative_evidence_is_ignored_and_an_empty_map_is_flat():
    signed = _one_hot() - 1.0  # the hot cell 2, every other cell -1
    assert map_statistics(signed)["entropy"].item() == pytest.approx(0.0, abs=1e-9)
    empty = -torch.ones(2, 4, 4)
    shares, flat = relevance_shares(empty)
    assert flat.all() and torch.isnan(map_statistics(empty)["gini"]).all()
    assert relevance_shares(torch.ones(1, 4, 4))[1].all()  # a constant map is flat too


def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    values = torch.randn(200, generator=torch.Generator().manual_seed(1)) + 3
    low, high = bootstrap_interval(values, seed=5)
    assert low < values.mean() < high and high - low < 0.6
    assert (low, high) == bootstrap_interval(values, seed=5)
    assert (low, high) != bootstrap_interval(values, seed=6)
    summary = mean_interval(torch.cat([values, torch.tensor([float("nan")])]))
    assert summary["n"] == 200 and summary["low"] < summary["mean"] < summary["high"]


def test_the_bootstrap_test_separates_different_groups_only_and_its_p_agrees_with_its_interval():
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(40, generator=g), torch.randn(40, generator=g) + 2, torch.randn(40, generator=g)
    groups = lambda x, y: x.mean(1) - y.mean(1)  # noqa: E731
    assert bootstrap_test(a, b, statistic=groups)[2] < 0.001
    assert bootstrap_test(a, c, statistic=groups)[2] > 0.05
    assert bootstrap_test(a, c, statistic=groups, seed=3) == bootstrap_test(a, c, statistic=groups, seed=3)
    assert bootstrap_test(b - a)[2] < 0.001 and bootstrap_test(c - a)[2] > 0.05  # paired differences
    for shift in (0.0, 0.2, 0.3, 0.4, 0.5, 0.8):  # the same resamples: the interval excludes 0 iff p < 0.05
        low, high, p = bootstrap_test(a + shift, c, statistic=groups)
        assert bool(low > 0 or high < 0) == bool(p < 0.05), (shift, low, high, p)


# ------------------------------------------------------------------------------ agreement


def test_a_map_agrees_with_itself_and_less_with_its_flip():
    maps = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)) + torch.linspace(0, 2, 8)[None, None, :]
    same = agreement(maps, maps)
    assert torch.allclose(same["spearman"], torch.ones(3, dtype=torch.float64)) and (same["iou"] == 1).all()
    flipped = agreement(maps, maps.flip(-1))
    assert (flipped["spearman"] < 1).all() and (flipped["iou"] < 1).all()
    coarse = agreement(maps, maps[:, ::2, ::2].repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :4, :4])
    assert coarse["spearman"].shape == (3,)  # different grids: compared on the coarser one


def test_a_constant_map_has_no_rank_correlation_and_top_iou_counts_cells():
    assert torch.isnan(spearman(torch.rand(1, 4, 4), torch.ones(1, 4, 4))).all()
    a = torch.zeros(1, 10, 10)
    a[0, 0, :10] = torch.arange(1, 11.0)  # top 10 cells: the first row
    b = a.clone()
    b[0, 0, :5] = 0
    b[0, 9, :5] = 20  # half of the top cells moved
    assert top_iou(a, b).item() == pytest.approx(5 / 15)


# ------------------------------------------------------------------------------ claims


def test_verdict_rule():
    assert verdict(0.01, 0.2, 0.01) == "supported"
    assert verdict(-0.3, -0.02, 0.001) == "contradicted"
    assert verdict(-0.1, 0.1, 0.6) == "cannot decide"
    assert verdict(0.1, 0.2, 0.001, enough=False) == "cannot decide"
    # an interval clear of 0 beside a p-value that is not (as the old permutation p could be): no verdict
    assert verdict(0.012, 0.141, 0.38) == "cannot decide"


def test_claims_on_constructed_groups():
    g = torch.Generator().manual_seed(0)
    high, low = 0.8 + 0.05 * torch.randn(30, generator=g), 0.4 + 0.05 * torch.randn(60, generator=g)
    supported = group_claim("x", "errors are more concentrated", high, low)
    assert supported.verdict == "supported" and supported.p_value < 0.001 and supported.low > 0
    assert supported.sentence.startswith("The data support the claim that errors are more concentrated")
    contradicted = group_claim("x", "errors are more concentrated", low, high)
    assert contradicted.verdict == "contradicted" and contradicted.high < 0
    same = group_claim("x", "s", low[:30], low[30:])
    assert same.verdict == "cannot decide" and same.low < 0 < same.high
    assert group_claim("x", "s", high[:2], low).verdict == "cannot decide"  # too few maps
    paired = paired_claim("y", "the ViT is more concentrated", high, high - 0.1)
    assert paired.verdict == "supported" and paired.difference == pytest.approx(0.1) and paired.n == (30,)


# ------------------------------------------------------------------------------ on real runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar):
    """A tiny CNN and ViT run in one folder, each with stored maps of its 24 test images."""
    from xtl.explain.runner import explain_run

    folder = tmp_path_factory.mktemp("analysis")
    cnn = tiny_run(folder / "cnn", cifar, "timm:resnet10t", 32)
    vit = tiny_run(folder / "vit", cifar, "timm:vit_tiny_patch16_224", 32)
    explain_run(cnn, ["gradcam", "saliency"], n_images=24, batch_size=12, progress=False, gallery_size=2)
    explain_run(vit, ["transformer_attribution", "saliency"], n_images=24, batch_size=12, progress=False, gallery_size=2)
    return folder, [cnn, vit]


def test_analyse_writes_every_number_and_the_report_shows_them(runs):
    from xtl.analysis import analyse_runs
    from xtl.report import build_report

    folder, (cnn, vit) = runs
    result = analyse_runs([cnn, vit], folder / "analysis", randomisation_images=2)
    data = json.loads((folder / "analysis" / "analysis.json").read_text())
    assert [c["key"] for c in data["claims"]] == ["vit_errors", "cnn_errors", "vit_vs_cnn"]
    for claim in data["claims"]:
        assert claim["verdict"] in ("supported", "contradicted", "cannot decide") and claim["sentence"].endswith(").")
    assert data["claims"][2]["n"] == [24]  # paired on the same 24 images
    # model against model with the same method (saliency, stored for both), each model's own method a secondary row
    tests = {r["method"]: r for r in data["claims"][2]["methods"]}
    assert set(tests) == {"saliency", "transformer_attribution (ViT) vs gradcam (CNN)"}
    assert tests["saliency"]["role"] == "test" and tests["transformer_attribution (ViT) vs gradcam (CNN)"]["role"] == "secondary"
    # 2 images cannot gate a claim: no method is in any verdict, so none can be decided
    assert all(not r["in_verdict"] for c in data["claims"] for r in c["methods"])
    assert all(c["verdict"] == "cannot decide" for c in data["claims"])
    assert {s["status"] for s in data["sanity"]} == {"not checked on 64 images (2)"}
    errors = {r["method"] for r in data["claims"][1]["methods"]}
    assert errors == {"gradcam", "saliency"} and data["settings"]["claim_grid"] == 32  # CIFAR's pixels
    sensitivity = {(r["model"], r["method"]): r for r in data["class_sensitivity"]}
    assert len(sensitivity) == 4 and all(r["n"] == 2 and -1 <= r["mean"] <= 1 for r in sensitivity.values())
    gini = [r for r in data["statistics"] if r["statistic"] == "gini" and r["group"] == "all"]
    assert len(gini) == 4 and all(r["low"] <= r["mean"] <= r["high"] and r["n"] == 24 for r in gini)
    assert {r["group"] for r in data["statistics"]} >= {"all", "correct", "misclassified", "class:cat"}
    labels = data["agreement"]["labels"]
    assert labels == ["timm:resnet10t: gradcam", "timm:resnet10t: saliency", "timm:vit_tiny_patch16_224: saliency",
                      "timm:vit_tiny_patch16_224: transformer_attribution"]
    assert all(data["agreement"]["spearman"][i][i] == 1 for i in range(4))
    assert {p["kind"] for p in data["agreement"]["pairs"]} == {"same model", "same method", "other"}
    assert {r["method"] for r in data["rates"]} == {"gradcam", "saliency", "transformer_attribution"}
    randomised = {(r["model"], r["method"]) for r in data["randomisation"]}
    assert len(randomised) == 4 and all(r["n"] == 2 for r in data["randomisation"])
    assert data["randomisation_sentences"] and data["complexity_sentences"]
    robust = {(r["model"], r["method"]): r for r in data["robustness"]}
    assert set(robust) == randomised and data["robustness_sentences"]
    for r in robust.values():  # the maps do move under noise, and a ratio of norms is not negative
        assert r["n"] == 2 and 0 < r["max_sensitivity_mean"] and r["local_lipschitz_low"] <= r["local_lipschitz_mean"]
        assert 0 <= r["max_sensitivity_undefined"] < 2  # an all-zero map (Grad-CAM) is left out, not inf
    for name in ("statistics.csv", "rates.csv", "agreement.csv", "claims.csv", "randomisation.csv", "robustness.csv",
                 "claim_tests.csv", "class_sensitivity.csv",
                 "figures/agreement.png", "figures/concentration.png"):
        assert (folder / "analysis" / name).is_file(), name
    assert result["seconds"]["total"] > 0

    html = build_report([cnn, vit], folder / "report", folder=folder).read_text()
    assert '<section id="analysis">' in html and "What the models look at, in numbers" in html
    for claim in data["claims"]:
        assert claim["verdict"] in html
    assert "cascading model-parameter randomisation" in html and "analysis_agreement.png" in html
    assert "Robustness: how much the maps move under small input noise" in html
    assert "Class sensitivity: does the map change with the class it explains?" in html
    assert "(secondary: different methods)" in html and "not checked on 64 images (2)" in html


def test_analyse_command_and_its_refusals(runs, tmp_path):
    folder, (cnn, vit) = runs
    out = tmp_path / "out"
    done = subprocess.run([XTL, "analyse", str(cnn.path), str(vit.path), "--out", str(out), "--randomisation-images", "0",
                           "--methods", "gradcam,transformer_attribution"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "analysis.json" in done.stdout and "maps (" in done.stdout
    data = json.loads((out / "analysis.json").read_text())
    assert {s["method"] for s in data["sets"]} == {"gradcam", "transformer_attribution"} and data["randomisation"] == []
    one_line_error(subprocess.run([XTL, "analyse", str(tmp_path)], capture_output=True, text=True), "no config.yaml")
    one_line_error(subprocess.run([XTL, "analyse", str(cnn.path), "--out", str(tmp_path / "o2"), "--methods", "occlusion"],
                                  capture_output=True, text=True), "no stored maps", str(cnn.path))
    one_line_error(subprocess.run([XTL, "analyse", str(cnn.path), "--randomisation-images", "-1"],
                                  capture_output=True, text=True), "--randomisation-images")
    one_line_error(subprocess.run([XTL, "analyse", str(cnn.path), "--robustness-images", "-1"],
                                  capture_output=True, text=True), "--robustness-images")
