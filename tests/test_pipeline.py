"""`xtl run` end to end on real CIFAR-10 images, its configuration, `xtl compare`, and the HTML report in Chromium."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from xtl.errors import XtlError
from xtl.pipeline.config import PipelineConfig, load_config
from helpers import XTL, chromium_page

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
SECTIONS = ("summary", "data", "models", "comparison", "confusions", "galleries", "faithfulness", "analysis",
            "localisation", "reproducibility")
pytestmark = pytest.mark.xdist_group("pipeline")

TINY = {
    "name": "tiny",
    "models": ["timm:resnet10t", "timm:vit_tiny_patch16_224"],
    "train": {"pretrained": False, "input_size": 32, "train_size": 40, "val_size": 10, "test_size": 30,
              "batch_size": 20, "epochs": 2, "lr": "1e-3"},
    "per_model": {"timm:vit_tiny_patch16_224": {"lr": 3e-4}},
    "explain_methods": ["gradcam", "transformer_attribution", "saliency"],
    "explain_images": 16,
    "explain_batch_size": 8,
    "gallery_size": 4,
    "faithfulness_images": 6,
    "faithfulness_steps": 4,
    "data_randomisation": True,
}


def _xtl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([XTL, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def _config_file(tmp_path: Path, cifar: Path, **changes) -> Path:
    data = {**TINY, "source": str(cifar), "runs_dir": str(tmp_path / "runs"), **changes}
    text = yaml.safe_dump(data, sort_keys=False).replace("'1e-3'", "1e-3")  # the way people write it
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cifar):
    """A finished two-model run (CNN and ViT, random init, tiny split) and what the first `xtl run` printed."""
    tmp = tmp_path_factory.mktemp("pipeline")
    config = _config_file(tmp, cifar)
    result = _xtl("run", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "runs" / "tiny", config, result


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# ----------------------------------------------------------------------------- configuration


def test_config_unknown_key(tmp_path, cifar):
    path = _config_file(tmp_path, cifar, explain_imgaes=3)
    _one_line_error(_xtl("run", "-c", str(path), "--show-config"), str(path), "unknown key(s) explain_imgaes")
    path = _config_file(tmp_path, cifar, train={"learning_rate": 0.1})
    _one_line_error(_xtl("run", "-c", str(path), "--show-config"), str(path), "learning_rate")


def test_config_wrong_type(tmp_path, cifar):
    path = _config_file(tmp_path, cifar, faithfulness_steps="ten")
    _one_line_error(_xtl("run", "-c", str(path), "--show-config"), str(path), "key 'faithfulness_steps'", "integer", "'ten'")
    path = _config_file(tmp_path, cifar, train={"epochs": 2.5})
    _one_line_error(_xtl("run", "-c", str(path), "--show-config"), str(path), "key 'epochs'", "integer")
    _one_line_error(_xtl("run", "-c", str(_config_file(tmp_path, cifar)), "--train", "augment=maybe", "--show-config"),
                    "augment", "true or false")


def test_config_out_of_range(tmp_path, cifar):
    path = _config_file(tmp_path, cifar, gallery_size=0)
    _one_line_error(_xtl("run", "-c", str(path), "--show-config"), str(path), "key 'gallery_size'", ">= 1")
    path = _config_file(tmp_path, cifar, train={"lr": -1})
    _one_line_error(_xtl("run", "-c", str(path), "--show-config"), str(path), "key 'lr'", "> 0")
    _one_line_error(_xtl("run", "--preset", "fast", "--show-config"), "--preset", "quick, paper, offline-full")
    _one_line_error(_xtl("run", "--explain-methods", "gradcam,nope", "--show-config"), "--explain-methods", "nope")


def test_config_without_validation_images_is_refused(tmp_path, cifar):
    path = _config_file(tmp_path, cifar, train={**TINY["train"], "val_size": 0})
    _one_line_error(_xtl("run", "-c", str(path), "--show-config"), str(path), "key 'val_size'", ">= 1", "validation")
    _one_line_error(_xtl("run", "--train", "val_size=0", "--show-config"), "option --train", "key 'val_size'", ">= 1")


def test_config_checks_come_from_the_one_settings_toolkit(tmp_path):
    """xtl run's keys and its `train` keys are checked by the same rules and say so the same way."""
    from xtl.errors import XtlError

    path = tmp_path / "c.yaml"
    cases = [
        ("explain_target: guessed\n", "key 'explain_target' must be one of predicted, true, not 'guessed'"),
        ("explain_images: 0\n", "key 'explain_images' must be >= 1 or null (all), not 0"),
        ("train: {lr: .nan}\n", "key 'lr' must be a finite number, not nan"),
        ("train: {seed: -3}\n", "key 'seed' must be >= 0, not -3"),
        ("per_model: {efficientnet_lite0: {label_smoothing: .inf}}\n", "key 'label_smoothing' must be a finite number, not inf"),
        ("train: {learning_rate: 1}\n", "key 'train': unknown key(s) learning_rate; known: accelerator, augment, "),
        ("explain_imgaes: 3\n", "unknown key(s) explain_imgaes; known: data_randomisation, device, explain_batch_size, "),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(XtlError, match="^" + re.escape(f"{path}: {message}")):
            load_config(path)
    with pytest.raises(XtlError, match="^" + re.escape("option --explain-target must be one of predicted, true, not 'x'")):
        load_config(None, {"explain_target": "x"})


@pytest.mark.parametrize("name", ["quick", "paper"])
def test_a_preset_name_means_the_same_recipe_in_finetune_and_run(name):
    """`xtl finetune --preset quick|paper` and `xtl run --preset quick|paper` fine-tune each model alike."""
    from xtl.config import preset

    config = load_config(None, {"preset": name})
    for model in config.models:
        assert config.run_config(model) == preset(name, model, source=config.source), model


def test_broken_or_missing_config_file_is_named(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [a, b\n")
    _one_line_error(_xtl("run", "-c", str(broken)), str(broken), "cannot be parsed")
    _one_line_error(_xtl("run", "-c", str(tmp_path / "none.toml")), "none.toml", "does not exist")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    _one_line_error(_xtl("run", "-c", str(listing)), str(listing), "mapping")


def test_every_config_key_is_an_option_and_back():
    import typer.main

    from xtl.cli import app

    command = typer.main.get_command(app).commands["run"]
    options = {name.lstrip("-").replace("-", "_") for p in command.params for name in p.opts}
    keys = {f for f in PipelineConfig.__dataclass_fields__}
    assert keys <= options, keys - options
    assert options - keys == {"config", "c", "force", "show_config", "progress"}


def test_yaml_toml_and_options_layer_in_that_order(tmp_path, cifar):
    toml = tmp_path / "c.toml"
    toml.write_text(f'models = ["timm:resnet10t"]\nsource = "{cifar}"\nexplain_images = 5\n\n[train]\nepochs = 4\nlr = 1e-4\n')
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"models: [timm:resnet10t]\nsource: {cifar}\nexplain_images: 5\ntrain:\n  epochs: 4\n  lr: 1e-4\n")
    from_toml, from_yaml = load_config(toml), load_config(yaml_file)
    assert from_toml == from_yaml
    assert from_toml.run_config("timm:resnet10t").lr == 1e-4 and from_toml.run_config("timm:resnet10t").epochs == 4
    assert from_toml.run_config("timm:resnet10t").train_size == 4500  # the quick preset under the file
    assert from_toml.run_config("timm:resnet10t").freeze_blocks == 0  # frozen blocks only for the measured models
    layered = load_config(yaml_file, {"explain_images": 7, "train": {"epochs": 1}, "preset": "offline-full"})
    assert layered.explain_images == 7 and layered.run_config("timm:resnet10t").epochs == 1
    assert layered.run_config("timm:resnet10t").lr == 1e-4 and layered.run_config("timm:resnet10t").split == "paper"
    shown = _xtl("run", "-c", str(yaml_file), "--train", "epochs=1", "--explain-images", "all", "--show-config")
    assert shown.returncode == 0, shown.stderr
    again = tmp_path / "again.yaml"
    again.write_text(shown.stdout)  # the printed configuration is a valid config file of the same run
    expected = load_config(yaml_file, {"train": {"epochs": 1}})
    expected.explain_images = None
    assert load_config(again) == expected


# ----------------------------------------------------------------------------- the pipeline


def test_run_writes_every_step(finished):
    folder, _, result = finished
    for model, methods in (("timm_resnet10t", "gradcam-saliency"), ("timm_vit_tiny_patch16_224", "gradcam-transformer_attribution-saliency")):
        run = folder / model
        for name in ("model.safetensors", "metrics.json", "predictions.csv", "faithfulness.csv", f"figures/gallery_correct_{methods}.png",
                     f"figures/gallery_misclassified_{methods}.png", "figures/training_curves.png"):
            assert (run / name).is_file(), run / name
    maps = folder / "timm_resnet10t" / "explanations" / "test"
    assert len(list((maps / "saliency").glob("*/batch_*.safetensors"))) == 2  # 16 images in batches of 8, one set
    # the quick preset's explain_every_image: Grad-CAM of all 30 test images too, in the same set (batches 0-7 .. 24-29)
    assert len(list((maps / "gradcam").glob("*/batch_*.safetensors"))) == 4
    from xtl.explain.runner import read_stored_maps
    from xtl.runs import RunDir

    assert len(read_stored_maps(RunDir(folder / "timm_resnet10t"), "gradcam")[2]) == 30
    assert not (maps / "transformer_attribution").exists()  # a ViT method, skipped for the CNN
    assert len(list((folder / "timm_vit_tiny_patch16_224" / "explanations" / "test" / "transformer_attribution").glob("*/batch_*"))) == 2
    vit = yaml.safe_load((folder / "timm_vit_tiny_patch16_224" / "config.yaml").read_text())["run"]
    assert vit["lr"] == 3e-4 and vit["epochs"] == 2  # per-model over train over the preset
    for name in ("pipeline.yaml", "steps.json", "data.json", "faithfulness_combined.csv", "report/report.html",
                 "analysis/analysis.json", "analysis/figures/agreement.png",
                 "figures/class_distribution.png", "figures/faithfulness_combined.png"):
        assert (folder / name).is_file(), name
    assert "test accuracy" in result.stdout
    # the grid pointing game needs confidently correct test images of 4 classes, which random-init models
    # lack: the run goes on, and the report's localisation section says why it was not played
    game = json.loads((folder / "grid_pointing" / "grid_pointing.json").read_text())
    assert "needs confidently correct test images of 4 classes" in game["not_played"]
    assert "grid pointing game not played: " in result.stderr
    html = (folder / "report" / "report.html").read_text()
    assert "Not played: the grid pointing game needs confidently correct test images" in html
    # stderr is a pipe: no live bars, but plain progress lines while explaining (the last one always)
    assert "explain timm_resnet10t: 16/16 images, gradcam+saliency (" in result.stderr
    assert "explain timm_vit_tiny_patch16_224: 16/16 images, gradcam+transformer_attribution+saliency (" in result.stderr


def test_further_seeds_share_the_split_and_carry_accuracy_and_verdicts(finished):
    """The quick preset's seeds 0, 1, 2: seeds 1 and 2 are fine-tuned on seed 0's split into
    seeds/seed-<s>/, evaluated and explained with the claims' methods; the analysis gives accuracy
    per seed (McNemar per seed, from the same predictions) and each claim's verdict per seed."""
    import csv

    from xtl.evaluate import read_predicted
    from xtl.evaluate.metrics import mcnemar, paired_correctness
    from xtl.explain.runner import read_stored_maps
    from xtl.runs import RunDir

    folder, _, _ = finished
    analysis = json.loads((folder / "analysis" / "analysis.json").read_text())
    primary = {m: RunDir(folder / m) for m in ("timm_resnet10t", "timm_vit_tiny_patch16_224")}
    for seed in (1, 2):
        for name, run in primary.items():
            other = RunDir(folder / "seeds" / f"seed-{seed}" / name)
            assert (other.path / "split.csv").read_bytes() == (run.path / "split.csv").read_bytes()
            recorded = yaml.safe_load(other.config_path.read_text())["run"]
            assert (recorded["seed"], recorded["split_seed"]) == (seed, 0)
            assert load_file(str(other.weights_path)).keys() == load_file(str(run.weights_path)).keys()
            assert any(not torch.equal(a, b) for a, b in zip(load_file(str(other.weights_path)).values(),
                                                               load_file(str(run.weights_path)).values()))
            assert len(read_stored_maps(other, "gradcam")[2]) == 30  # every test image, for the error claims
            assert len(read_stored_maps(other, "saliency")[2]) == 16  # a method of both models: the paired claim
            assert read_stored_maps(other, "transformer_attribution") is None  # one model's own method: not needed
            assert not list(other.figures.glob("gallery_*.png"))
    seeds = analysis["seeds"]
    assert seeds["seeds"] == [0, 1, 2] and analysis["seed"] == 0
    for row in seeds["accuracy"]:
        name = row["model"].replace(":", "_")
        runs = [primary[name]] + [RunDir(folder / "seeds" / f"seed-{s}" / name) for s in (1, 2)]
        assert row["per_seed"] == pytest.approx([r.metrics()["accuracy"] for r in runs])
        assert row["min"] <= row["mean"] <= row["max"] and row["primary_low"] <= row["primary"] <= row["primary_high"]
    (pair,) = seeds["pairs"]
    for r in pair["per_seed"]:
        where = folder if r["seed"] == 0 else folder / "seeds" / f"seed-{r['seed']}"
        a, b = (read_predicted(RunDir(where / m)) for m in ("timm_resnet10t", "timm_vit_tiny_patch16_224"))
        test = mcnemar(*paired_correctness(a, b))
        assert (r["only_a"], r["only_b"], r["p_value"]) == (test.b, test.c, pytest.approx(test.p_value))
    for claim in analysis["claims"]:
        assert [r["seed"] for r in claim["seeds"]] == [0, 1, 2]
        agree = len({r["verdict"] for r in claim["seeds"]}) == 1
        assert claim["verdict"] == (claim["seeds"][0]["verdict"] if agree else "cannot decide")
    with open(folder / "analysis" / "claim_tests.csv", newline="") as f:
        tested = {(r["claim"], r["seed"]) for r in csv.DictReader(f)}
    assert {("vit_vs_cnn", str(s)) for s in (0, 1, 2)} <= tested
    html = (folder / "report" / "report.html").read_text()
    assert "Accuracy over fine-tuning seeds" in html and "vit_vs_cnn per fine-tuning seed" in html


def test_data_randomisation_trains_on_shuffled_labels_and_checks_the_maps(finished):
    """data_randomisation: each model fine-tuned once more on shuffled labels (same recipe and split,
    the test labels true), and every gating method's maps compared with its twin's on the same images."""
    import csv

    folder, _, _ = finished
    analysis = json.loads((folder / "analysis" / "analysis.json").read_text())
    for name in ("timm_resnet10t", "timm_vit_tiny_patch16_224"):
        twin = folder / "sanity" / "shuffled-labels" / name
        recorded = yaml.safe_load((twin / "config.yaml").read_text())["run"]
        assert recorded["shuffle_labels"] and recorded["seed"] == 0
        tests = lambda p: [r for r in csv.DictReader(open(p, newline="")) if r["split"] == "test"]  # noqa: E731
        assert tests(twin / "split.csv") == tests(folder / name / "split.csv")
        trained = lambda p: [r["label"] for r in csv.DictReader(open(p, newline="")) if r["split"] == "train"]  # noqa: E731
        assert trained(twin / "split.csv") != trained(folder / name / "split.csv")
        assert (twin / "metrics.json").is_file()
    rows = {(r["model"], r["method"]): r for r in analysis["data_randomisation"]}
    checked = {(r["model"], r["method"]) for r in analysis["class_sensitivity"]}
    assert set(rows) == checked and ("timm:resnet10t", "saliency") in rows
    assert rows[("timm:resnet10t", "saliency")]["n"] == 16 and rows[("timm:resnet10t", "gradcam")]["n"] == 30
    assert all(-1 <= r["mean"] <= 1 for r in rows.values() if r["mean"] is not None)
    assert (folder / "analysis" / "data_randomisation.csv").is_file()
    assert "Spearman with the shuffled-labels model&#39;s map" in (folder / "report" / "report.html").read_text() or \
        "Spearman with the shuffled-labels model's map" in (folder / "report" / "report.html").read_text()


def test_seeds_are_checked_once_with_the_key_named(tmp_path, cifar):
    for changes, fragments in (({"seeds": [0, 0]}, ("seeds", "names a seed twice")),
                               ({"seeds": []}, ("seeds", "one or more whole numbers")),
                               ({"seeds": [0, -1]}, ("seeds", "whole numbers >= 0")),
                               ({"seeds": [0, 1], "train": {**TINY["train"], "seed": 3}}, ("seeds", "train", "key seeds alone"))):
        with pytest.raises(XtlError) as err:
            load_config(_config_file(tmp_path, cifar, **changes))
        assert all(f in str(err.value) for f in fragments), str(err.value)
    assert load_config(_config_file(tmp_path, cifar, seeds=None, train={**TINY["train"], "seed": 3})).all_seeds == [3]
    _one_line_error(_xtl("run", "-c", str(_config_file(tmp_path, cifar)), "--seeds", "0,x"), "--seeds", "0,x")


def test_rerun_after_finishing_recomputes_nothing(finished):
    folder, config, _ = finished
    watched = [p for p in folder.rglob("*") if p.is_file() and p.name != "pipeline.yaml"]
    before = {p: p.stat().st_mtime_ns for p in watched}
    result = _xtl("run", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in watched} == before


@pytest.mark.parametrize("setting, shown", [("compile=true", "compile: true"), ("eval_batch_size=7", "eval_batch_size: 7")])
def test_a_speed_only_setting_retrains_nothing(setting, shown, finished):
    """`compile` and `eval_batch_size` change how fast a model trains and is evaluated, not what it
    learns: only the report (which shows the configuration) is rebuilt."""
    folder, config, _ = finished
    weights = folder / "timm_resnet10t" / "model.safetensors"
    before, steps_before = weights.stat().st_mtime_ns, json.loads((folder / "steps.json").read_text())
    result = _xtl("run", "--config", str(config), "--train", setting)
    assert result.returncode == 0, result.stderr
    steps = json.loads((folder / "steps.json").read_text())
    assert {k: v for k, v in steps.items() if k != "report"} == {k: v for k, v in steps_before.items() if k != "report"}
    assert steps["report"]["fingerprint"] != steps_before["report"]["fingerprint"]
    assert weights.stat().st_mtime_ns == before
    assert shown in (folder / "pipeline.yaml").read_text()
    restored = _xtl("run", "--config", str(config))  # back to the fixture's configuration
    assert restored.returncode == 0, restored.stderr


def test_changed_training_settings_are_refused_without_force(finished, tmp_path):
    folder, config, _ = finished
    changed = tmp_path / "changed.yaml"
    data = yaml.safe_load(config.read_text())
    data["train"]["lr"] = 0.01
    changed.write_text(yaml.safe_dump(data))
    _one_line_error(_xtl("run", "-c", str(changed)), "timm_resnet10t", "lr: 0.001 -> 0.01", "--force")
    assert yaml.safe_load((folder / "timm_resnet10t" / "config.yaml").read_text())["run"]["lr"] == 0.001


def test_a_folder_that_is_not_a_run_folder_is_left_alone(tmp_path, cifar):
    folder = tmp_path / "runs" / "tiny"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    _one_line_error(_xtl("run", "-c", str(_config_file(tmp_path, cifar)), "--force"), str(folder), "not an xtl run folder")
    assert (folder / "notes.txt").read_text() == "mine"


def test_report_sections_and_numbers(finished):
    folder, _, _ = finished
    html = (folder / "report" / "report.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
    metrics = yaml.safe_load((folder / "timm_resnet10t" / "metrics.json").read_text())
    assert f"{100 * metrics['accuracy']:.1f} %" in html
    assert "most confused pair" in html or "made no mistakes" in html
    assert "<script" not in html and "<link" not in html and not re.search(r"""(src|href)=["']https?:""", html)
    beside = sorted(p.name for p in (folder / "report" / "figures").glob("*.png"))
    assert len(beside) == html.count("data:image/png;base64,") and "class_distribution.png" in beside


def test_report_in_headless_chromium(finished):
    """Every section shows, every image decodes, nothing is fetched from the network."""
    folder, _, _ = finished
    requested = []
    with chromium_page(viewport=(1280, 1600)) as page:
        page.on("request", lambda request: requested.append(request.url))
        page.goto((folder / "report" / "report.html").resolve().as_uri(), wait_until="load")
        for section in SECTIONS:
            assert page.locator(f"section#{section} h2").is_visible(), section
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        assert len(images) >= 12
        for alt, complete, width, height in images:
            assert complete and width > 0 and height > 0, alt
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    assert [u for u in requested if not u.startswith(("file:", "data:"))] == []
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_compare_builds_the_comparison_part_from_existing_runs(finished, tmp_path):
    folder, _, _ = finished
    out = tmp_path / "cmp"
    result = _xtl("compare", str(folder / "timm_resnet10t"), str(folder / "timm_vit_tiny_patch16_224"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Test results" in result.stdout
    html = (out / "report" / "report.html").read_text()
    for section in ("summary", "comparison", "confusions", "galleries", "faithfulness"):
        assert f'<section id="{section}">' in html
    assert '<section id="models">' not in html
    assert (out / "figures" / "compare_misclassified.png").is_file()


def test_presets_follow_the_paper_and_the_offline_recipe():
    paper = load_config(None, {"preset": "paper"})
    assert paper.models == ["alexnet", "resnet34", "vit_b16_in21k"] and paper.folder == Path("runs/paper")
    resnet, vit = paper.run_config("resnet34"), paper.run_config("vit_b16_in21k")
    assert (resnet.optimizer, resnet.lr, resnet.weight_decay, resnet.epochs, resnet.split) == ("adam", 1e-5, 5e-4, 5, "paper")
    assert (vit.lr, vit.weight_decay, vit.batch_size, vit.epochs, vit.augment) == (2e-5, 0.01, 32, 3, False)
    assert resnet.pretrained and resnet.weights is None  # hub weights
    full = load_config(None, {"preset": "offline-full"})
    assert full.models == ["efficientnet_lite0", "vit_s14_dinov2"]
    lite = full.run_config("efficientnet_lite0")
    assert (lite.split, lite.optimizer, lite.input_size) == ("paper", "adamw", None) and full.explain_images is None
    quick = load_config()
    assert quick.run_config("vit_s14_dinov2").train_size == 4500 and quick.faithfulness_images == 64
    # the recipe the quick preset stands for is what a run records (BENCHMARKS.md chose it)
    vit, cnn = quick.run_config("vit_s14_dinov2"), quick.run_config("efficientnet_lite0")
    assert (vit.freeze_blocks, vit.input_size, vit.epochs, vit.cache_frozen, vit.precision) == (6, 112, 2, True, "auto")
    assert (cnn.freeze_blocks, cnn.input_size, cnn.test_size, cnn.head_epochs) == (11, 128, 1000, 0)
    assert (cnn.epochs, cnn.patience, vit.patience, quick.seeds) == (6, 2, 2, [0, 1, 2])
    later = quick.run_config("vit_s14_dinov2", seed=2)  # a further seed: seed 0's split
    assert (later.seed, later.split_seed, vit.seed, vit.split_seed) == (2, 0, 0, None)
    assert (quick.faithfulness_grid, quick.faithfulness_steps, full.faithfulness_steps) == ("common", 10, 10)
    assert (quick.baselines, full.baselines, full.faithfulness_sensitivity_grids) == (["zero"], ["zero", "road"], ["model", "none"])
