"""Transfer levers of the quick recipe on real CIFAR-10 images: frozen blocks computed once and cached,
LP-FT's head-only phase, bf16 where the CPU has it, and an honest per-batch throughput."""

from __future__ import annotations

import csv
import statistics

import pytest
import torch
from safetensors.torch import load_file

from xtl.config import RunConfig
from xtl.data import load_split
from xtl.errors import XtlError
from xtl.models import build_model, registry
from xtl.models.trunk import split_model
from xtl.runs import RunDir, model_preprocess, split_spec
from xtl.train import finetune
from xtl.train import loop as train_loop

TINY = dict(
    model="torchvision:resnet18", pretrained=False, input_size=32, split="random", train_size=48, val_size=16,
    test_size=16, stratified=True, batch_size=16, epochs=2, warmup_epochs=0.5, patience=0, lr=1e-3,
    precision="32-true",
)


@pytest.fixture(scope="module")
def tiny_split(cifar):
    config = RunConfig(source=str(cifar), **TINY)
    return load_split(config.source, split_spec(config))


def _images(split, config: RunConfig, n: int = 6) -> torch.Tensor:
    return model_preprocess(config)(split["val"].images[:n])


@pytest.mark.parametrize("name, size, blocks", [
    ("efficientnet_lite0", 64, (1, 8, 15)),  # real ImageNet weights, the package's drop-connect blocks
    ("timm:vit_tiny_patch16_224", 32, (1, 6, 11)),
    ("torchvision:resnet18", 32, (1, 4, 7)),
])
def test_the_cached_path_gives_the_whole_models_logits(cifar, tiny_split, name, size, blocks):
    """tail(trunk(x)) is the model's own forward, for every cut, on real images."""
    model, _ = build_model(name, 10, pretrained=name == "efficientnet_lite0", input_size=size)
    model.eval()
    x = _images(tiny_split, RunConfig(**{**TINY, "model": name, "input_size": size, "source": str(cifar)}))
    with torch.no_grad():
        whole = model(x)
        for k in blocks:
            parts = split_model(model, k)
            torch.testing.assert_close(parts.tail(parts.trunk(x)), whole, rtol=0, atol=1e-5)


def test_frozen_blocks_stay_bit_identical_and_the_rest_trains(cifar, tiny_split, tmp_path):
    config = RunConfig(source=str(cifar), **{**TINY, "freeze_blocks": 4, "bn_momentum": 0.5})
    torch.manual_seed(config.seed)
    before, _ = build_model(config.model, 10, pretrained=False, input_size=32)
    initial = {k: v.clone() for k, v in before.state_dict().items()}
    run = RunDir(tmp_path / "run")
    state = finetune(config, tiny_split, run, progress=False)
    assert state.epoch == 2
    trained = load_file(str(run.weights_path))
    frozen_prefixes = ("conv1.", "bn1.", "layer1.", "layer2.")  # stem + the first 4 BasicBlocks
    frozen = [k for k in initial if k.startswith(frozen_prefixes)]
    assert frozen and any("running_mean" in k for k in frozen)
    for key in frozen:  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(trained[key], initial[key]), key
    changed = [k for k in initial if not k.startswith(frozen_prefixes) and not torch.equal(trained[k], initial[k])]
    assert any(k.startswith("layer4.") for k in changed) and "fc.weight" in changed
    # the model is whole again afterwards: no forward left patched
    model, _ = run.load_model()
    assert "forward" not in model.__dict__


def test_cached_training_equals_training_the_tail_on_the_whole_model(cifar, tiny_split, tmp_path):
    """Without augmentation, training on cached trunk outputs is the same computation as training the
    frozen-trunk model on images: the same weights come out."""
    # lr 1e-4: Adam moves a weight by about lr whatever its gradient's size, so at 1e-3 a gradient near 0
    # whose sign the rounding flips sends the two runs apart within an epoch for some initialisations
    base = {**TINY, "freeze_blocks": 4, "augment": False, "lr": 1e-4}
    cached = finetune(RunConfig(source=str(cifar), **base), tiny_split, RunDir(tmp_path / "cached"), progress=False)
    plain = finetune(RunConfig(source=str(cifar), **{**base, "cache_frozen": False}), tiny_split,
                     RunDir(tmp_path / "plain"), progress=False)
    a, b = load_file(str(tmp_path / "cached" / "model.safetensors")), load_file(str(tmp_path / "plain" / "model.safetensors"))
    for key in a:
        # equal up to float32 summation order (the trunk runs on batches of another size when caching):
        # a weight whose gradient is near 0 can have its Adam step's sign flipped by the rounding (one
        # step is about lr), so allow a few such weights per tensor, and none far off
        close = torch.isclose(a[key].float(), b[key].float(), rtol=1e-2, atol=1e-3)
        assert close.float().mean() >= 0.99, (key, int((~close).sum()), close.numel())
        assert (a[key].float() - b[key].float()).abs().max() <= 5e-3, key
    assert [round(e["val_loss"], 3) for e in cached.epochs] == [round(e["val_loss"], 3) for e in plain.epochs]


def test_seeds_share_the_frozen_blocks_cache_and_train_the_same(cifar, tiny_split, tmp_path, capsys):
    """A shared `frozen_cache` computes a model's frozen blocks once for its seeds: the second run
    reuses the tensors and trains to the same weights as without the cache; a randomly initialised
    model's frozen blocks are the seed's, so another seed computes its own."""
    base = {**TINY, "freeze_blocks": 4, "weights": None}
    shared: dict = {}
    finetune(RunConfig(source=str(cifar), **base), tiny_split, RunDir(tmp_path / "first"), progress=False,
             frozen_cache=shared)
    assert len(shared) == 2  # train (with mirror images) and val
    kept = {k: v[0] for k, v in shared.items()}
    capsys.readouterr()
    finetune(RunConfig(source=str(cifar), **base), tiny_split, RunDir(tmp_path / "again"), progress=False,
             frozen_cache=shared)
    assert capsys.readouterr().out.count("computed for an earlier run: reused") == 2
    assert all(shared[k][0] is kept[k] for k in kept)
    finetune(RunConfig(source=str(cifar), **base), tiny_split, RunDir(tmp_path / "alone"), progress=False)
    a, b = load_file(str(tmp_path / "again" / "model.safetensors")), load_file(str(tmp_path / "alone" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    finetune(RunConfig(source=str(cifar), **{**base, "seed": 1, "split_seed": 0}), tiny_split,
             RunDir(tmp_path / "seed1"), progress=False, frozen_cache=shared)
    assert len(shared) == 4  # random initialisation: seed 1's frozen blocks are not seed 0's


def test_shuffled_labels_permute_training_and_validation_labels_only(cifar, tiny_split, tmp_path):
    """The data-randomisation check's training data: labels permuted within the training and the
    validation part (class counts kept, seeded), test labels and the caller's split untouched; a run
    with shuffle_labels records it and its split.csv holds the labels it trained on."""
    before = {name: part.labels.clone() for name, part in tiny_split.parts.items()}
    shuffled = train_loop.shuffled_labels(tiny_split, seed=0)
    for name, part in tiny_split.parts.items():
        assert torch.equal(part.labels, before[name])
    for name in ("train", "val"):
        a, b = shuffled[name].labels, before[name]
        assert not torch.equal(a, b) and torch.equal(a.bincount(minlength=10), b.bincount(minlength=10))
        assert shuffled[name].images is tiny_split[name].images
    assert torch.equal(shuffled["test"].labels, before["test"])
    assert torch.equal(train_loop.shuffled_labels(tiny_split, seed=0)["train"].labels, shuffled["train"].labels)
    config = RunConfig(source=str(cifar), **{**TINY, "epochs": 1, "shuffle_labels": True})
    run = RunDir(tmp_path / "shuffled")
    finetune(config, tiny_split, run, progress=False)
    with open(run.file("split.csv"), newline="") as f:
        trained = [int(r["label"]) for r in csv.DictReader(f) if r["split"] == "train"]
    assert trained == shuffled["train"].labels.tolist() and run.config().shuffle_labels


def test_lp_ft_head_phase_touches_only_the_head(cifar, tiny_split):
    config = RunConfig(source=str(cifar), **{**TINY, "head_epochs": 3, "head_lr": 1e-2})
    model, spec = build_model(config.model, 10, pretrained=False, input_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fabric = train_loop.make_fabric(config)
    inputs = {n: train_loop.ModelInputs(tiny_split[n], model_preprocess(config)) for n in ("train", "val")}
    result = train_loop.fit_head(fabric, model, spec.classifier, None, inputs, config)
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["fc.bias", "fc.weight"]  # BatchNorm statistics included: the body ran in eval mode
    assert result["epochs"] == 3 and 0 <= result["val_accuracy"] <= 1


def test_lp_ft_on_cached_features_then_fine_tuning_is_recorded(cifar, tiny_split, tmp_path):
    config = RunConfig(source=str(cifar), **{**TINY, "freeze_blocks": 6, "head_epochs": 2})
    run = RunDir(tmp_path / "run")
    state = finetune(config, tiny_split, run, progress=False)
    assert state.head["epochs"] == 2 and state.epoch == 2
    recorded = run.config()
    assert (recorded.freeze_blocks, recorded.head_epochs, recorded.cache_frozen) == (6, 2, True)


def test_bf16_where_the_cpu_has_it_and_float32_elsewhere(cifar, tiny_split, tmp_path, monkeypatch):
    auto = RunConfig(source=str(cifar), **{**TINY, "precision": "auto", "accelerator": "cpu", "epochs": 1})
    monkeypatch.setattr(registry, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert train_loop.resolve_precision(auto) == ("cpu", "bf16-mixed")
    monkeypatch.setattr(registry, "_cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert registry.native_bf16("cpu")
    monkeypatch.setattr(registry, "_cpu_flags", lambda: {"avx2", "avx512f"})  # no native bf16: emulated, slower
    assert train_loop.resolve_precision(auto) == ("cpu", "32-true")
    assert not torch.is_autocast_enabled("cpu")
    with registry.inference_autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    run = RunDir(tmp_path / "fp32")
    finetune(auto, tiny_split, run, progress=False)  # trains, and says what `auto` meant here
    assert run.read()["derived"]["precision"] == "32-true"
    monkeypatch.setattr(registry, "_cpu_flags", lambda: {"avx512_bf16"})
    run = RunDir(tmp_path / "bf16")
    finetune(auto, tiny_split, run, progress=False)
    assert run.read()["derived"]["precision"] == "bf16-mixed"


def test_freeze_blocks_is_checked_by_name(cifar, tiny_split, tmp_path):
    with pytest.raises(XtlError, match=r"option --freeze-blocks must be in 0..7 .* not 8"):
        finetune(RunConfig(source=str(cifar), **{**TINY, "freeze_blocks": 8}), tiny_split, RunDir(tmp_path / "a"),
                 progress=False)
    with pytest.raises(XtlError, match=r"option --freeze-blocks: a ResNet cannot be cut .*supported"):
        finetune(RunConfig(source=str(cifar), **{**TINY, "model": "timm:resnet10t", "freeze_blocks": 2}), tiny_split,
                 RunDir(tmp_path / "b"), progress=False)
    with pytest.raises(XtlError, match="option --freeze-blocks must be >= 0"):
        RunConfig(**{**TINY, "freeze_blocks": -1})


def test_the_last_batch_of_an_epoch_reports_a_true_images_per_second(cifar, tiny_split, tmp_path):
    config = RunConfig(source=str(cifar), **{**TINY, "train_size": 48, "batch_size": 8, "epochs": 1})
    run = RunDir(tmp_path / "run")
    finetune(config, load_split(config.source, split_spec(config)), run, progress=False)
    with open(run.file("history_batches.csv")) as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f)]
    assert len(rates) == 6
    typical = statistics.median(rates)
    assert all(rate < 5 * typical for rate in rates), rates  # the last one was ~1,000x before the fix


def test_xtl_finetune_freeze_blocks_errors_are_one_line(tiny_folder, tmp_path):
    import subprocess

    from helpers import XTL

    base = [XTL, "finetune", "--model", "torchvision:resnet18", "--random-init", "--input-size", "32", "--source",
            str(tiny_folder), "--runs-dir", str(tmp_path), "--split", "random", "--train-size", "12",
            "--val-size", "6", "--epochs", "1", "--no-progress"]
    for extra, fragment in ((["--freeze-blocks", "8", "--name", "a"], "option --freeze-blocks must be in 0..7"),
                            (["--freeze-blocks", "-1", "--name", "b"], "option --freeze-blocks must be >= 0, not -1")):
        result = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        lines = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line]
        assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(cifar, tiny_split, tmp_path):
    """Resuming reads checkpoints with weights_only=True: the run's own checkpoint resumes, and one
    whose pickle calls a function (here os.system) is refused without calling it."""
    import os
    import pickle

    config = RunConfig(source=str(cifar), **{**TINY, "epochs": 1, "freeze_blocks": 4})
    run = RunDir(tmp_path / "run")
    finetune(config, tiny_split, run, progress=False)
    longer = RunConfig(source=str(cifar), **{**TINY, "epochs": 2, "freeze_blocks": 4})
    assert finetune(longer, tiny_split, run, resume=True, progress=False).epoch == 2  # plain values load

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(run.last_checkpoint, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(XtlError, match=r"checkpoint .*last.pt cannot be resumed: UnpicklingError"):
        finetune(RunConfig(source=str(cifar), **{**TINY, "epochs": 3, "freeze_blocks": 4}), tiny_split, run,
                 resume=True, progress=False)
    assert not marker.exists()
