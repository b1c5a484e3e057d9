"""Reliability, as a catalogue (docs/reliability.md): bad input, faults and interruptions.

Each test pins what a user sees: a user error is one line `error: ...` naming the file or the
option, exit status 2, no traceback; a fault (NaN, out of memory, a full disk, a kill) loses
nothing that was finished, leaves no half-written or temporary file, and a second run continues.
Entries already pinned elsewhere are named in docs/reliability.md, not repeated here.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import XTL, class_folder, one_line_error, tiny_run
from xtl.config import RunConfig
from xtl.data import SplitSpec, decode_image, load_split, open_source
from xtl.errors import Interrupted, XtlError, sigterm_as_interrupt
from xtl.explain import runner as explain_runner
from xtl.faithfulness import runner as faithfulness_runner
from xtl.io import write_json, write_text
from xtl.models import build_model
from xtl.models.registry import load_run_weights
from xtl.runs import RunDir, split_spec
from xtl.train import finetune
from xtl.train import loop as train_loop

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = dict(model="timm:resnet10t", pretrained=False, input_size=32, split="random", train_size=64, val_size=16,
            test_size=32, stratified=True, batch_size=16, epochs=2, warmup_epochs=0.5, patience=0, lr=1e-3)


def _xtl(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([XTL, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV, **kwargs)


_user_error = one_line_error


def _temporary_files(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*.tmp")]


def _data_command(folder: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`xtl data` decoding every image of the 3-class tiny folder (36 train + 12 test)."""
    return _xtl("data", "--source", folder, "--split", "random", "--train-size", 30, "--val-size", 6,
                "--figure", tmp_path / "distribution.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cifar) -> RunDir:
    """A real tiny fine-tuned and evaluated CNN run (40 train / 24 test images at 32 px) on a
    3-class folder of CIFAR-10 images (small, so every command that reloads the split is quick)."""
    folder = class_folder(tmp_path_factory.mktemp("data"), cifar)
    return tiny_run(tmp_path_factory.mktemp("runs") / "cnn", folder, "timm:resnet10t", 32)


def _copy_run(run: RunDir, dest: Path) -> RunDir:
    ignore = shutil.ignore_patterns("explanations", "faithfulness*", "figures")
    return RunDir(shutil.copytree(run.path, dest, ignore=ignore))


# ============================================================================= input files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_file(kind: str, folder: Path) -> tuple[Path, str]:
    """Spoil one training image of the tiny folder; return it and the expected message's end."""
    target = folder / "train" / "dog" / "0003.jpg"
    pixels = np.asarray(Image.open(target).convert("RGB"))
    if kind == "empty":
        target.write_bytes(b"")
        return target, "is empty"
    if kind == "truncated_jpeg":
        _truncate(target)
        return target, "cannot be read as an image"
    if kind == "truncated_png":
        target.unlink()
        target = target.with_suffix(".png")
        Image.fromarray(pixels).save(target)
        _truncate(target)
        return target, "cannot be read as an image: image file is truncated"
    if kind == "not_an_image":
        target.write_text("name,label\ncat,3\n")
        return target, "cannot be read as an image"
    if kind == "huge":  # 10,000 x 10,000 pixels in 12 kB: over Image.MAX_IMAGE_PIXELS (64 M)
        target.unlink()
        target = target.with_suffix(".png")
        Image.new("1", (10_000, 10_000)).save(target)
        return target, "is too large to decode safely"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["empty", "truncated_jpeg", "truncated_png", "not_an_image", "huge"])
def test_a_bad_image_file_is_a_one_line_error_naming_it(kind, tiny_folder, tmp_path):
    bad, message = _bad_file(kind, tiny_folder)
    _user_error(_data_command(tiny_folder, tmp_path), f"image file {bad}", message)


@pytest.mark.parametrize("data_path", ["memory", "stream"])
@pytest.mark.parametrize("kind", ["empty", "not_an_image"])
def test_a_part_whose_every_header_is_unreadable_names_the_file_on_both_data_paths(kind, data_path, tmp_path, cifar):
    """Issue 28's regression: when every image of a part has a header that cannot be read (here a part
    of one image: an empty file or text), the sizes read from headers were all unknown, so the part
    looked like one of images of size -1 x -1 and ended in `RuntimeError: negative dimension`. The
    file is named in one line before anything is decoded or trained, on both data paths."""
    folder = tmp_path / "data"
    for part, name in (("train", "cat"), ("train", "dog"), ("test", "cat"), ("test", "dog")):
        (folder / part / name).mkdir(parents=True, exist_ok=True)
    bad = {"cat": folder / "train" / "cat" / "a.jpg", "dog": folder / "train" / "dog" / "b.jpg"}
    if kind == "empty":
        bad["cat"].write_bytes(b""), bad["dog"].write_bytes(b"")
    else:
        bad["cat"].write_text("hello\n"), bad["dog"].write_text("name,label\n")
    for name in ("cat", "dog"):
        for f in sorted((cifar / "test" / name).iterdir())[:2]:
            shutil.copy(f, folder / "test" / name / f.name)
    spec = SplitSpec("random", train_size=1, val_size=1, test_size=2)
    with pytest.raises(XtlError, match=r"^image file .*/train/(cat/a|dog/b)\.jpg (is empty|cannot be read as an image)"):
        load_split(str(folder), spec, data_path=data_path, num_workers=0)


def _odd_images(folder: Path) -> dict[str, Path]:
    """Valid images in every awkward encoding, written beside the CIFAR images of class cat."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    cat = folder / "train" / "cat"
    files = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        files[name] = cat / name
        img.save(files[name], **kw)

    save("gray.png", Image.fromarray(rgb[..., 0]))
    rgba = np.dstack([rgb, np.full((32, 32), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one transparent pixel: composited on white
    save("rgba.png", Image.fromarray(rgba))
    save("palette.png", Image.fromarray(rgb).convert("P"))
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    save("palette_transparent.png", palette, transparency=palette.info["transparency"])
    save("sixteen.png", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
    wide = np.zeros((16, 32, 3), np.uint8)
    wide[:, :8] = 255  # a white stripe on the left as stored
    exif = Image.fromarray(wide).getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    save("exif_rotated.jpg", Image.fromarray(wide), exif=exif, quality=95)
    save("one_pixel.png", Image.fromarray(rgb[:1, :1]))
    return files


def test_awkward_but_valid_images_decode_to_8_bit_rgb(tiny_folder):
    files = _odd_images(tiny_folder)
    decoded = {name: decode_image(path) for name, path in files.items()}
    assert all(img.mode == "RGB" for img in decoded.values())
    rgb = np.asarray(Image.open(files["rgba.png"]).convert("RGB"))
    assert np.asarray(decoded["rgba.png"])[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert np.array_equal(np.asarray(decoded["rgba.png"])[1:], rgb[1:])
    assert np.asarray(decoded["palette_transparent.png"])[0, 0].tolist() == [255, 255, 255]
    assert np.array_equal(np.asarray(decoded["sixteen.png"])[..., 1], np.asarray(decoded["gray.png"])[..., 1])
    cmyk_error = np.abs(np.asarray(decoded["cmyk.jpg"]).astype(int) - np.asarray(decoded["rgba.png"]).astype(int))
    assert cmyk_error[1:].mean() < 12  # the same colours, up to JPEG's loss
    rotated = np.asarray(decoded["exif_rotated.jpg"])
    assert rotated.shape == (32, 16, 3)  # the stripe that was on the left is now on top
    assert rotated[:8].mean() > 200 and rotated[10:].mean() < 30
    assert decoded["one_pixel.png"].size == (1, 1)


def test_a_folder_of_awkward_images_and_stray_files_fine_tunes(tiny_folder, tmp_path):
    """Every encoding above, plus files that are not data, through `xtl finetune` end to end."""
    files = _odd_images(tiny_folder)
    for junk in ("notes.txt", ".DS_Store", "Thumbs.db", "._0000.jpg"):  # ._*: macOS resource forks, not JPEGs
        (tiny_folder / "train" / "cat" / junk).write_bytes(b"\x00\x05\x16\x07 not an image")
    (tiny_folder / "train" / "README.md").write_text("a stray file beside the class folders\n")
    (tiny_folder / "test" / ".ipynb_checkpoints").mkdir()
    result = _xtl("finetune", "--model", "timm:resnet10t", "--random-init", "--input-size", 32,
                  "--source", tiny_folder, "--split", "random", "--train-size", 40, "--val-size", 4,
                  "--batch-size", 16, "--epochs", 1, "--patience", 0, "--accelerator", "cpu",
                  "--runs-dir", tmp_path / "runs", "--name", "odd", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    keys = {row["key"] for row in csv.DictReader(open(tmp_path / "runs" / "odd" / "split.csv"))}
    assert {f"train/cat/{name}" for name in files} <= keys  # every odd image was used
    assert not any("notes" in k or "DS_Store" in k or "._" in k or "Thumbs" in k for k in keys)
    assert json.loads((tmp_path / "runs" / "odd" / "metrics.json").read_text())["n_images"] == 12


def test_folders_with_no_images_are_named(tiny_folder, tmp_path):
    for f in (tiny_folder / "train" / "ship").iterdir():
        f.rename(f.with_suffix(".txt"))
    with pytest.raises(XtlError, match=f"class folder {tiny_folder / 'train' / 'ship'} has no images"):
        open_source(str(tiny_folder))
    (tmp_path / "no_classes" / "train").mkdir(parents=True)
    with pytest.raises(XtlError, match="has no class subfolders"):
        open_source(str(tmp_path / "no_classes"))
    shutil.copytree(tiny_folder / "train", tmp_path / "empty_test" / "train")
    for name in ("cat", "dog"):
        (tmp_path / "empty_test" / "test" / name).mkdir(parents=True)
    (tmp_path / "empty_test" / "train" / "ship").rename(tmp_path / "ship")  # keep train valid
    with pytest.raises(XtlError, match=f"data folder {tmp_path / 'empty_test' / 'test'} has no images"):
        open_source(str(tmp_path / "empty_test"))


def test_a_class_folder_missing_from_test_keeps_the_training_class_indices(tiny_folder):
    shutil.rmtree(tiny_folder / "test" / "dog")
    split = load_split(str(tiny_folder), SplitSpec("random", train_size=30, val_size=6, seed=0))
    assert split.class_names == ["cat", "dog", "ship"]
    assert split.summary()["test"] == [4, 0, 4]
    assert all(key.split("/")[1] == split.class_names[label]
               for key, label in zip(split["test"].keys, split["test"].labels.tolist()))
    (tiny_folder / "test" / "zebra").mkdir()  # the other way round is an error: no label for it
    with pytest.raises(XtlError, match="class folders not in train/: zebra"):
        open_source(str(tiny_folder))


def test_unknown_extra_files_are_ignored(tiny_folder):
    before = open_source(str(tiny_folder))
    for part in ("train", "test"):
        (tiny_folder / part / "cat" / "labels.csv").write_text("x\n")
        (tiny_folder / part / "cat" / ".hidden.jpg").write_bytes(b"junk")
        (tiny_folder / part / "LICENSE").write_text("CC0\n")
        (tiny_folder / part / ".cache").mkdir()
    (tiny_folder / "metadata.json").write_text("{}\n")
    (tiny_folder / "unlabeled").mkdir()
    after = open_source(str(tiny_folder))
    assert after.class_names == before.class_names
    for part in ("train", "test"):
        assert after.partition(part).keys == before.partition(part).keys


# ============================================================================= models and weights


def test_a_weights_file_for_another_class_count_gives_its_backbone_and_a_fresh_head(tmp_path):
    """`--weights`: transfer learning from a model trained for 5 classes to a 3-class task."""
    other, _ = build_model("timm:resnet10t", n_classes=5, pretrained=False)
    path = tmp_path / "five_classes.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    model, spec = build_model("timm:resnet10t", n_classes=3, pretrained=False, weights=path)
    mine, theirs = model.state_dict(), other.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith(spec.classifier))
    assert mine[f"{spec.classifier}.weight"].shape == (3, 512)


def test_a_run_refuses_weights_of_another_class_count_or_architecture(tmp_path):
    model, _ = build_model("timm:resnet10t", n_classes=3, pretrained=False)
    five, _ = build_model("timm:resnet10t", n_classes=5, pretrained=False)
    save_file({k: v.contiguous() for k, v in five.state_dict().items()}, str(tmp_path / "five.safetensors"))
    with pytest.raises(XtlError, match=f"weights file {tmp_path / 'five.safetensors'} is for 5 classes; "
                                       "model timm:resnet10t of this run has 3"):
        load_run_weights(model, tmp_path / "five.safetensors", "timm:resnet10t")
    save_file({"conv.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(XtlError, match="other.safetensors does not fit model timm:resnet10t"):
        load_run_weights(model, tmp_path / "other.safetensors", "timm:resnet10t")


@pytest.mark.xdist_group("reliability_run")  # shares the module's tiny run
def test_evaluate_a_run_whose_weights_are_for_another_class_count(run, tmp_path):
    copy = _copy_run(run, tmp_path / "run")
    five, _ = build_model("timm:resnet10t", n_classes=5, pretrained=False)
    save_file({k: v.contiguous() for k, v in five.state_dict().items()}, str(copy.weights_path))
    _user_error(_xtl("evaluate", copy.path), f"weights file {copy.weights_path} is for 5 classes")


@pytest.mark.xdist_group("reliability_run")  # shares the module's tiny run
def test_a_corrupt_model_file_in_a_run_is_a_one_line_error(run, tmp_path):
    copy = _copy_run(run, tmp_path / "run")
    _truncate(copy.weights_path)  # as a copy cut short would be
    _user_error(_xtl("evaluate", copy.path), f"weights file {copy.weights_path}")


@pytest.mark.xdist_group("reliability_run")  # shares the module's tiny run
def test_a_run_directory_of_another_version_is_named(run, tmp_path):
    copy = _copy_run(run, tmp_path / "run")
    data = yaml_load(copy.config_path)
    data["format_version"] = 99
    write_yaml(copy.config_path, data)
    _user_error(_xtl("evaluate", copy.path), f"run directory {copy.path} has format version 99", "reads 1")
    data["format_version"] = 1
    data["run"]["mixup_alpha"] = 0.2  # a setting a newer xtl wrote
    write_yaml(copy.config_path, data)
    with pytest.raises(XtlError, match=r"config.yaml: unknown key\(s\) mixup_alpha"):
        copy.config()


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


# ============================================================================= training


def _config(cifar: Path, **changes) -> RunConfig:
    return RunConfig(source=str(cifar), **{**TINY, **changes})


@pytest.fixture(scope="module")
def tiny_split(cifar):
    config = _config(cifar)
    return load_split(config.source, split_spec(config))


def _inject_in_step(monkeypatch, exception_or_nan, at_call: int) -> None:
    """Make the model's forward pass in training step `at_call` (1-based) return NaN or raise."""
    real_build = train_loop.build_model
    calls = []

    def build(*args, **kwargs):
        model, spec = real_build(*args, **kwargs)

        def hook(module, inputs, output):
            if module.training:
                calls.append(1)
                if len(calls) == at_call:
                    if exception_or_nan == "nan":
                        return output * float("nan")
                    raise exception_or_nan
            return output

        model.register_forward_hook(hook)
        return model, spec

    monkeypatch.setattr(train_loop, "build_model", build)


def _finished_epoch(run: RunDir) -> int:
    return torch.load(run.last_checkpoint, weights_only=False)["state"]["epoch"]


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(cifar, tiny_split, tmp_path, monkeypatch):
    config = _config(cifar)
    run = RunDir(tmp_path / "run")
    _inject_in_step(monkeypatch, "nan", at_call=6)  # 4 steps per epoch: the second step of epoch 2
    with pytest.raises(XtlError) as caught:
        finetune(config, tiny_split, run, progress=False)
    message = str(caught.value)
    assert message == (f"training loss became nan at epoch 2, batch 2; the last good checkpoint is kept in "
                       f"{run.path}; try a lower --lr")
    assert _finished_epoch(run) == 1 and not _temporary_files(run.path)
    weights = load_file(str(run.weights_path))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    monkeypatch.undo()
    state = finetune(config, tiny_split, run, resume=True, progress=False)  # and it continues from there
    assert state.epoch == 2


def test_gpu_out_of_memory_suggests_a_smaller_batch(cifar, tiny_split, tmp_path, monkeypatch):
    config = _config(cifar)
    run = RunDir(tmp_path / "run")
    _inject_in_step(monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 7)
    with pytest.raises(XtlError) as caught:
        finetune(config, tiny_split, run, progress=False)
    assert str(caught.value) == (f"out of GPU memory in epoch 2 with --batch-size 16 per device; try a smaller "
                                 f"--batch-size, e.g. 8 (epochs finished so far are kept in {run.path})")
    assert _finished_epoch(run) == 1 and not _temporary_files(run.path)


def test_a_full_disk_keeps_the_previous_file_and_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": 0.9})

    def write_half_then_fail(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(XtlError, match=f"cannot write {path}: no space left on device "
                                       r"\(its previous content is unchanged\)"):
        write_json(path, {"accuracy": 0.5})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"accuracy": 0.9}
    assert os.listdir(tmp_path) == ["metrics.json"]
    with pytest.raises(XtlError, match=f"cannot write {tmp_path / 'new.txt'}: .* \\(nothing was written\\)"):
        monkeypatch.setattr(Path, "write_text", write_half_then_fail)
        write_text(tmp_path / "new.txt", "hello")
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(cifar, tiny_split, tmp_path, monkeypatch):
    config = _config(cifar)
    run = RunDir(tmp_path / "run")
    real_save, saves = torch.save, []

    def save_then_run_out_of_space(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the checkpoint after epoch 2
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_run_out_of_space)
    with pytest.raises(XtlError, match=f"cannot write {run.last_checkpoint}: no space left on device "
                                       r"\(its previous content is unchanged\)"):
        finetune(config, tiny_split, run, progress=False)
    monkeypatch.undo()
    assert _finished_epoch(run) == 1 and not _temporary_files(run.path)


@pytest.mark.parametrize("limit_mb, fails", [
    (1, "model.safetensors"),  # safetensors' own writer fails
    (30, "checkpoints/last.pt"),  # torch.save's
], ids=["weights", "checkpoint"])
def test_a_real_write_failure_in_a_process_leaves_no_half_file(limit_mb, fails, cifar, tmp_path):
    """The kernel refuses the write (a file-size limit: EFBIG): `xtl finetune` stops with one line, and
    since no epoch's checkpoint was kept, the failed first start removes the run folder it made
    (`xtl.locations.FirstStart`): no half file, and the same command can simply be run again."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_mb * 1_000_000, limit_mb * 1_000_000))

    result = subprocess.run(
        [XTL, "finetune", "--model", "timm:resnet10t", "--random-init", "--input-size", "32", "--source", str(cifar),
         "--split", "random", "--train-size", "32", "--val-size", "8", "--test-size", "8", "--batch-size", "16",
         "--epochs", "1", "--accelerator", "cpu", "--runs-dir", str(tmp_path), "--name", "full", "--no-progress"],
        capture_output=True, text=True, timeout=300, env=ENV, preexec_fn=limit)
    run = RunDir(tmp_path / "full")
    _user_error(result, f"cannot write {run.file(fails)}: file too large", "(nothing was written)")
    assert not run.path.exists() and list(tmp_path.iterdir()) == []  # the runs folder existed before: it stays


def test_sigterm_inside_a_job_unwinds_like_ctrl_c():
    with pytest.raises(Interrupted) as caught, sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


FINETUNE = ["finetune", "--model", "timm:resnet10t", "--random-init", "--input-size", "32", "--split", "random",
            "--train-size", "240", "--val-size", "16", "--test-size", "32", "--stratified", "--batch-size", "8",
            "--epochs", "2", "--warmup-epochs", "0.5", "--patience", "0", "--lr", "1e-3", "--accelerator", "cpu",
            "--precision", "32-true",  # bf16 finishes epoch 2 before a loaded machine's poller sends the signal
            "--no-progress"]


@pytest.fixture(scope="module")
def uninterrupted(cifar, tmp_path_factory) -> RunDir:
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = _xtl(*FINETUNE, "--source", cifar, "--runs-dir", folder, "--name", "whole")
    assert result.returncode == 0, result.stderr[-3000:]
    return RunDir(folder / "whole")


def _epoch_rows(run: RunDir) -> list[dict]:
    with open(run.file("history_epochs.csv"), newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.xdist_group("reliability_kill")  # shares the uninterrupted run
def test_killed_mid_epoch_then_resumed_gives_the_uninterrupted_result(signum, uninterrupted, cifar, tmp_path):
    args = [*FINETUNE, "--source", cifar, "--runs-dir", tmp_path, "--name", "killed"]
    run = RunDir(tmp_path / "killed")
    # SIGINT back to its default in the child: a test run started in the background inherits it ignored,
    # and Python then installs no KeyboardInterrupt handler
    process = subprocess.Popen([XTL, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (run.file("history_epochs.csv").is_file() and len(_epoch_rows(run)) == 1):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.01)
    process.send_signal(signum)  # epoch 1 is on disk; epoch 2 (30 batches) has just begun
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip() == f"interrupted: 1 finished epoch(s) kept in {run.path}; `xtl finetune --resume` (or the same `xtl run`) continues"
    assert _finished_epoch(run) == 1 and len(_epoch_rows(run)) == 1
    assert not run.file("metrics.json").exists() and not _temporary_files(run.path)

    resumed = _xtl("finetune", "--resume", "--runs-dir", tmp_path, "--name", "killed", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    assert _epoch_rows(run) == _epoch_rows(uninterrupted)
    ours, theirs = (json.loads(r.file("metrics.json").read_text()) for r in (run, uninterrupted))
    for m in (ours, theirs):
        m.pop("images_per_s_train")
    assert ours == theirs
    ours, theirs = load_file(str(run.weights_path)), load_file(str(uninterrupted.weights_path))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert run.file("predictions.csv").read_text() == uninterrupted.file("predictions.csv").read_text()


# ============================================================================= explanation and faithfulness jobs


def _fail_on_call(monkeypatch, module, name: str, at_call: int) -> list:
    """Replace `module.name` by a counting wrapper that raises `Interrupted` (SIGTERM) at call `at_call`."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == at_call:
            raise Interrupted(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _counting_explain(calls: list):
    from xtl.explain import explain

    def counted(*args, **kwargs):
        calls.append(args)
        return explain(*args, **kwargs)

    return counted


@pytest.mark.xdist_group("reliability_run")  # shares the module's tiny run
def test_an_explanation_job_killed_midway_resumes_without_recomputing(run, tmp_path, monkeypatch, capsys):
    reference = explain_runner.RunExplainer(_copy_run(run, tmp_path / "reference")).stream(
        ["gradcam"], n_images=24, batch_size=4, target="predicted", progress=False)
    capsys.readouterr()  # its plain progress lines (stderr is not a terminal here)
    copy = _copy_run(run, tmp_path / "killed")
    explainer = explain_runner.RunExplainer(copy)
    calls = _fail_on_call(monkeypatch, explain_runner, "explain", at_call=4)
    with pytest.raises(KeyboardInterrupt):
        explainer.stream(["gradcam"], n_images=24, batch_size=4, target="predicted", progress=False)
    maps = copy.path / "explanations" / "test" / "gradcam"
    assert len(list(maps.glob("*/batch_*"))) == 3 and not _temporary_files(copy.path)  # <key>/: xtl.explain.stored
    assert capsys.readouterr().err == (f"interrupted: finished shards are kept in {maps.parent}; "
                                       "the same command continues\n")
    calls.clear()
    monkeypatch.setattr(explain_runner, "explain", _counting_explain(calls))
    explainer.stream(["gradcam"], n_images=24, batch_size=4, target="predicted", progress=False)
    assert len(calls) == 3  # shards 4, 5, 6 of 6
    for shard in sorted(reference.joinpath("gradcam").glob("*/batch_*")):  # the same key: the same settings
        ours, theirs = load_file(str(maps / shard.parent.name / shard.name)), load_file(str(shard))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), shard.name


def _scores(path: Path) -> list[dict]:
    timing = {"explain_s", "score_s", "score_images_per_s", "run"}
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in timing} for row in csv.DictReader(f)]


@pytest.mark.xdist_group("reliability_run")  # shares the module's tiny run
def test_a_faithfulness_job_killed_midway_resumes_without_recomputing(run, tmp_path, monkeypatch, capsys):
    options = dict(methods=["gradcam", "saliency"], n_images=12, steps=2, explain_batch_size=4, progress=False,
                   baseline="zero")
    reference = _copy_run(run, tmp_path / "reference")
    faithfulness_runner.faithfulness_run([reference], **options)

    copy = _copy_run(run, tmp_path / "killed")
    real_score_batch, batches = faithfulness_runner._score_batch, []

    def counted_score_batch(model, spec, images, *args, **kwargs):
        batches.append(images.shape[0])
        return real_score_batch(model, spec, images, *args, **kwargs)

    def explain_until_killed(*args, **kwargs):
        if len(batches) == 2:  # killed while explaining the second of three batches
            raise Interrupted(signal.SIGTERM)
        return explained_for_real(*args, **kwargs)

    explained_for_real = faithfulness_runner.explain
    monkeypatch.setattr(faithfulness_runner, "_score_batch", counted_score_batch)
    monkeypatch.setattr(faithfulness_runner, "explain", explain_until_killed)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        faithfulness_runner.faithfulness_run([copy], **options)
    assert not copy.file("faithfulness.csv").exists() and not _temporary_files(copy.path)
    assert capsys.readouterr().err.startswith(f"interrupted: finished batches are kept in {copy.file('faithfulness_cache')}/")
    cached = sorted(p.relative_to(copy.path).parts[-2:] for p in copy.path.glob("faithfulness_cache/*/*/*"))
    assert cached == [(m, "batch_00000_0-3.safetensors") for m in ("gradcam", "random", "saliency", "uniform")]

    monkeypatch.setattr(faithfulness_runner, "explain", explained_for_real)
    batches.clear()
    faithfulness_runner.faithfulness_run([copy], **options)
    assert batches == [4, 4]  # batches 2 and 3 only; batch 1 came from the cache
    assert _scores(copy.file("faithfulness.csv")) == _scores(reference.file("faithfulness.csv"))
    batches.clear()
    faithfulness_runner.faithfulness_run([copy], **options)  # everything cached: nothing explained or scored
    assert batches == []
    assert _scores(copy.file("faithfulness.csv")) == _scores(reference.file("faithfulness.csv"))


# ============================================================================= configuration


@pytest.mark.parametrize("args, fragments", [
    (["--learning-rate", "0.1"], ["No such option: --learning-rate"]),
    (["--lr", "fast"], ["Invalid value for '--lr'"]),
    (["--batch-size", "0"], ["option --batch-size must be > 0, not 0"]),
    (["--label-smoothing", "1.5"], ["option --label-smoothing must be in [0, 1), not 1.5"]),
    (["--split", "random", "--val-size", "0"], ["option --val-size must be >= 1", "validation"]),
], ids=["unknown", "wrong_type", "out_of_range", "out_of_range_fraction", "no_validation"])
def test_a_bad_finetune_option_is_named(args, fragments, tiny_folder, tmp_path):
    result = _xtl("finetune", "--model", "timm:resnet10t", "--source", tiny_folder, "--runs-dir", tmp_path, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert not list(tmp_path.glob("*/config.yaml"))  # nothing started


def test_a_bad_run_config_names_the_key():
    with pytest.raises(XtlError, match=r"^run\.yaml: unknown key\(s\) learning_rate; known: accelerator, "):
        RunConfig.from_dict({"model": "timm:resnet10t", "learning_rate": 0.1}, where="run.yaml")
    with pytest.raises(XtlError, match=r"^run\.yaml: key 'lr' must be a number, not 'fast'$"):
        RunConfig.from_dict({"model": "timm:resnet10t", "lr": "fast"}, where="run.yaml")
    with pytest.raises(XtlError, match=r"^run\.yaml: key 'epochs' must be > 0, not -1$"):
        RunConfig.from_dict({"model": "timm:resnet10t", "epochs": -1}, where="run.yaml")
    with pytest.raises(XtlError, match=r"^run\.yaml: key 'label_smoothing' must be in \[0, 1\), not 1\.5$"):
        RunConfig.from_dict({"model": "timm:resnet10t", "label_smoothing": 1.5}, where="run.yaml")
    with pytest.raises(XtlError, match=r"^run\.yaml: key 'val_size' must be >= 1 .*validation.*, not 0$"):
        RunConfig.from_dict({"model": "timm:resnet10t", "split": "random", "val_size": 0}, where="run.yaml")


@pytest.mark.parametrize("key, value, message", [
    ("lr", float("nan"), "key 'lr' must be a finite number, not nan"),
    ("weight_decay", float("inf"), "key 'weight_decay' must be a finite number, not inf"),
    ("grad_clip", float("-inf"), "key 'grad_clip' must be a finite number, not -inf"),
    ("seed", -1, "key 'seed' must be >= 0, not -1"),
    ("test_size", -5, "key 'test_size' must be >= 0, not -5"),
    ("bn_momentum", 1.5, "key 'bn_momentum' must be in [0, 1], not 1.5"),
    ("split", "halves", "key 'split' must be one of paper, random, not 'halves'"),
], ids=["nan", "inf", "minus_inf", "negative_seed", "negative_size", "momentum", "choice"])
def test_a_meaningless_number_in_a_run_config_names_the_key(key, value, message):
    """One settings toolkit (xtl.settings) checks both configurations: NaN and infinities, negative
    seeds and sizes, fractions outside [0, 1] are refused in one line naming the key."""
    with pytest.raises(XtlError, match=f"^run\\.yaml: {re.escape(message)}$"):
        RunConfig.from_dict({"model": "timm:resnet10t", key: value}, where="run.yaml")
    with pytest.raises(XtlError, match=f"^{re.escape(message.replace(f'key {key!r}', 'option --' + key.replace('_', '-')))}$"):
        RunConfig(model="timm:resnet10t", **{key: value})


def test_a_whole_number_where_a_number_is_declared_is_kept_as_a_float():
    config = RunConfig.from_dict({"model": "timm:resnet10t", "lr": 1, "grad_clip": 2, "warmup_epochs": 0}, where="run.yaml")
    assert (config.lr, config.grad_clip, config.warmup_epochs) == (1.0, 2.0, 0.0)
    assert all(isinstance(v, float) for v in (config.lr, config.grad_clip, config.warmup_epochs))
    assert isinstance(config.epochs, int)


def test_a_split_with_no_validation_image_is_refused_before_training(tiny_folder, tmp_path):
    """A random split whose validation part is empty (none asked for, or 10 % of a tiny pool rounding
    to none) could never pick a best model: refused before any epoch, naming the option."""
    config = RunConfig(**{**TINY, "source": str(tiny_folder), "train_size": 36, "val_size": None, "test_size": 12})
    split = load_split(str(tiny_folder), SplitSpec("random", train_size=36, val_size=0, test_size=12))
    with pytest.raises(XtlError, match=r"^option --val-size: the validation split of .* is empty"):
        finetune(config, split, RunDir(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_runs_of_other_data_are_not_compared_image_by_image(run, tmp_path, cifar):
    """Issue 28 probe: image ids index a data source's images, so runs of two data sets paired
    different images under one id (`xtl explain A B` ended in `RuntimeError: selected index k out of
    range` when their class counts differed). `xtl compare` and the analysis refuse them in one line
    naming the run; `xtl explain A B` explains each and says why it draws no side-by-side figure."""
    from typer.testing import CliRunner

    from xtl.analysis.run import analyse_runs
    from xtl.cli import app

    folder = class_folder(tmp_path / "two", cifar, per_part=(("train", 30), ("test", 12)), classes=("cat", "truck"))
    other = tiny_run(tmp_path / "runs" / "two", folder, "timm:resnet10t", 32)
    def says(first: RunDir) -> str:
        return (f"run {other.path} is of other data than {first.path} (data {folder.resolve()} vs "
                f"{Path(run.config().source).resolve()}); its image ids name other images, so give runs of one data set")

    message = says(run)
    result = CliRunner().invoke(app, ["compare", str(run.path), str(other.path), "--out", str(tmp_path / "cmp")])
    assert isinstance(result.exception, XtlError) and str(result.exception) == f"xtl compare: {message}"
    assert not (tmp_path / "cmp").exists()
    with pytest.raises(XtlError, match=f"^the analysis: {re.escape(message)}$"):
        analyse_runs([run, other], tmp_path / "analysis")
    copy = _copy_run(run, tmp_path / "copy")
    result = CliRunner().invoke(app, ["explain", str(copy.path), str(other.path), "--methods", "saliency", "--images", "4",
                                      "--no-progress"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert f"side by side: {says(copy)}: each run is explained, no side-by-side figure is drawn" in " ".join(result.output.split())
    assert not list(copy.figures.glob("compare_*.png"))
    assert (copy.path / "explanations" / "test" / "saliency").is_dir() and (other.path / "explanations" / "test" / "saliency").is_dir()


def test_an_analysis_of_flat_maps_finishes_and_says_they_are_flat(run, tmp_path):
    """Issue 28 probe: every stored map identical and flat (here overwritten with ones). The analysis
    finishes without a traceback, scores them as perfectly spread (Gini 0, entropy 1, the centre of
    mass in the middle), and decides nothing from them."""
    from xtl.analysis.run import analyse_runs
    from xtl.explain.stored import shard_metadata

    copy = _copy_run(run, tmp_path / "flat")
    explain_runner.explain_run(copy, ["saliency"], n_images=12, batch_size=4, progress=False)
    shards = sorted((copy.path / "explanations").rglob("batch_*.safetensors"))
    for shard in shards:
        tensors = load_file(str(shard))
        tensors["raw"] = torch.ones_like(tensors["raw"])
        save_file(tensors, str(shard), metadata=shard_metadata(shard))
    result = analyse_runs([copy], tmp_path / "analysis", methods=["saliency"], randomisation_images=0, robustness_images=0)
    with open(tmp_path / "analysis" / "statistics.csv", newline="") as f:
        rows = {r["statistic"]: r for r in csv.DictReader(f) if r["method"] == "saliency" and r["group"] == "all"}
    assert abs(float(rows["gini"]["mean"])) < 1e-9 and abs(float(rows["entropy"]["mean"]) - 1) < 1e-9
    assert float(rows["row"]["mean"]) == pytest.approx(0.5) and rows["gini"]["n"] == "12"
    assert result["claims"] and all(claim["verdict"] == "cannot decide" for claim in result["claims"]), result["claims"]
