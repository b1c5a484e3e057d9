"""The streamed data path (`xtl.data.stream`): the same images and the same training as in memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xtl.config import RunConfig
from xtl.data import SplitSpec, load_split
from xtl.data import stream
from xtl.data.stream import StreamedImages
from xtl.errors import XtlError
from xtl.evaluate import evaluate
from xtl.runs import RunDir, split_spec
from xtl.train import finetune

from helpers import assert_same_images

SPEC = SplitSpec("random", train_size=120, val_size=30, test_size=40, seed=5, stratified=True)


def test_streamed_images_are_the_in_memory_images_bit_for_bit(cifar):
    memory = load_split(str(cifar), SPEC)
    assert_same_images(memory, load_split(str(cifar), SPEC, data_path="stream", num_workers=2))


def test_streamed_images_of_mixed_sizes_are_resized_as_in_memory(tiny_folder):
    """A folder of mixed sizes: both paths fit every image to 256 px (`images_to_uint8`), EXIF rotation
    included in the size check; a folder of one size is kept at its size."""
    for k, path in enumerate(sorted((tiny_folder / "train" / "cat").iterdir())[:3]):
        Image.open(path).resize((40 + 10 * k, 30)).save(path)
    spec = SplitSpec("random", val_size=6, seed=1)
    memory, streamed = load_split(str(tiny_folder), spec), load_split(str(tiny_folder), spec, data_path="stream")
    assert memory["train"].images.shape[-1] == 256 and memory["test"].images.shape[-1] == 32
    assert_same_images(memory, streamed)


TINY = dict(model="timm:resnet10t", pretrained=False, input_size=32, split="random", train_size=200, val_size=40,
            test_size=40, stratified=True, batch_size=32, epochs=1, warmup_epochs=0.5, patience=0, lr=1e-3)


def test_streamed_training_gives_the_in_memory_result(cifar, tmp_path):
    """1 epoch of resnet10t (random init, 32 px, 200 images, flips and shifts) with the same seed:
    the same loss at every step, the same validation and test metrics."""
    results = {}
    for data_path in ("memory", "stream"):
        config = RunConfig(source=str(cifar), data_path=data_path, num_workers=2, **TINY)
        run = RunDir(tmp_path / data_path)
        data = load_split(config.source, split_spec(config), config.data_path, config.num_workers)
        state = finetune(config, data, run, progress=False)
        metrics = evaluate(run, data, device="cpu")
        assert run.read()["derived"]["data_path"] == data_path
        results[data_path] = (state, metrics)
    (memory, m_metrics), (streamed, s_metrics) = results["memory"], results["stream"]
    assert [b["loss"] for b in streamed.batches] == pytest.approx([b["loss"] for b in memory.batches], abs=1e-5)
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert streamed.epochs[0][key] == pytest.approx(memory.epochs[0][key], abs=1e-5), key
    assert s_metrics["accuracy"] == pytest.approx(m_metrics["accuracy"])
    assert s_metrics["confusion_matrix"] == m_metrics["confusion_matrix"]


def test_auto_streams_only_when_the_images_would_not_fit(cifar, monkeypatch):
    # 190 CIFAR images x 32 x 32 x 3 bytes = 583,680 bytes
    assert stream.decoded_bytes(190, (32, 32)) == 583_680
    assert load_split(str(cifar), SPEC, data_path="auto").data_path == "memory"
    monkeypatch.setattr(stream, "available_memory", lambda: 4 * 583_680)  # a quarter of it is just too small
    assert load_split(str(cifar), SPEC, data_path="auto").data_path == "stream"
    monkeypatch.setattr(stream, "available_memory", lambda: 4 * 583_680 + 4)
    assert load_split(str(cifar), SPEC, data_path="auto").data_path == "memory"
    monkeypatch.setattr(stream, "MEMORY_FRACTION", 1e-9)
    assert load_split(str(cifar), SPEC, data_path="auto").data_path == "stream"


def test_the_size_of_a_png_is_read_from_its_header_without_decoding_it(tmp_path, monkeypatch):
    """PIL's getexif() on a PNG decodes the whole image to look for EXIF after the pixels; the header
    read for the streamed path's sizes does not (an EXIF rotation stored before them still counts)."""
    from PIL import PngImagePlugin

    from xtl.data.sources import header_size

    plain, rotated = tmp_path / "plain.png", tmp_path / "rotated.png"
    Image.new("RGB", (300, 200)).save(plain)
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn
    Image.new("RGB", (300, 200)).save(rotated, exif=exif)

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    assert header_size(plain) == (300, 200) and header_size(rotated) == (200, 300)


def test_a_bad_image_decoded_in_a_worker_is_one_line(tiny_folder):
    spec = SplitSpec("random", val_size=6, seed=1)
    streamed = load_split(str(tiny_folder), spec, data_path="stream", num_workers=2)
    bad = tiny_folder / streamed["train"].keys[5]
    bad.write_bytes(b"not an image")
    with pytest.raises(XtlError, match="cannot be read as an image") as err:
        list(streamed["train"].images.batches([range(0, 4), range(4, 8)]))
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_a_batch_a_worker_cannot_hand_over_is_one_line_not_a_hang(tiny_folder, monkeypatch):
    """Shared memory refused to a worker (out of memory, a full /dev/shm): one line, where the queue's
    thread would lose the error and leave the main process waiting for the batch forever."""
    streamed = load_split(str(tiny_folder), SplitSpec("random", val_size=6, seed=1), data_path="stream", num_workers=2)

    def refused(self):
        raise RuntimeError("unable to mmap 28311552 bytes from file </torch_1_2_3>: Cannot allocate memory (12)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", refused)  # in the forked workers too
    with pytest.raises(XtlError, match=r"^a decode worker could not hand over a batch of 4 images \(0 MiB\) through "
                                       r"shared memory \(unable to mmap .*\); free memory") as err:
        list(streamed["train"].images.batches([range(0, 4), range(4, 8)]))
    assert "\n" not in str(err.value)


def test_a_decode_worker_killed_mid_epoch_is_one_line_not_a_hang(tiny_folder, monkeypatch):
    """Issue 28 probe: a worker killed from outside (SIGKILL, the out-of-memory killer) while it decodes
    a batch. DataLoader notices the death and raises; that is one line saying what is kept and how to
    go on, not a DataLoader traceback, and never a wait for the lost batch. The next call decodes all."""
    import os
    import signal

    from xtl.data.stream import StreamedImages

    streamed = load_split(str(tiny_folder), SplitSpec("random", val_size=6, seed=1), data_path="stream", num_workers=2)
    images, parent, real = streamed["train"].images, os.getpid(), StreamedImages.decode

    def dies_on_the_second_batch(self, positions):
        if os.getpid() != parent and positions[0] == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, positions)

    monkeypatch.setattr(StreamedImages, "decode", dies_on_the_second_batch)
    with pytest.raises(XtlError, match=r"^a decode worker process died while decoding streamed images \(DataLoader worker "
                                       r".*\); what was finished is kept, and the same command continues") as err:
        list(images.batches([range(0, 4), range(4, 8), range(8, 12)]))
    assert "\n" not in str(err.value)
    monkeypatch.setattr(StreamedImages, "decode", real)
    assert [len(b) for b in images.batches([range(0, 4), range(4, 8), range(8, 12)])] == [4, 4, 4]


def test_data_path_and_workers_are_checked_by_name(cifar):
    with pytest.raises(XtlError, match=r"^option --data-path must be one of auto, memory, stream, not 'disk'$"):
        RunConfig(data_path="disk")
    with pytest.raises(XtlError, match=r"^option --num-workers must be >= 0 \(0: decode in the training process\), not -1$"):
        RunConfig(num_workers=-1)
    with pytest.raises(XtlError, match="option --data-path must be one of"):
        load_split(str(cifar), SPEC, data_path="disk")
    # speed only: `xtl run` retrains nothing when only these change
    assert RunConfig(data_path="stream", num_workers=4).learning_settings() == RunConfig().learning_settings()


def _xtl(*args):
    return subprocess.run([sys.executable, "-m", "xtl", *args], capture_output=True, text=True, timeout=300)


def test_finetune_streams_from_the_command_line(cifar, tmp_path):
    done = _xtl("finetune", "--model", "timm:resnet10t", "--random-init", "--input-size", "32", "--split", "random",
                "--train-size", "64", "--val-size", "16", "--test-size", "16", "--epochs", "1", "--batch-size", "16",
                "--data-path", "stream", "--num-workers", "1", "--runs-dir", str(tmp_path), "--name", "s",
                "--no-progress", "--source", str(cifar))
    assert done.returncode == 0, done.stderr
    run = RunDir(tmp_path / "s")
    assert run.read()["run"]["data_path"] == "stream" and run.read()["derived"]["data_path"] == "stream"
    assert run.metrics()["n_images"] == 16
    refused = _xtl("finetune", "--data-path", "disk", "--runs-dir", str(tmp_path), "--source", str(cifar))
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "option --data-path must be one of auto, memory, stream, not 'disk'" in lines[0]


def test_a_shard_of_streamed_images_stays_streamed(cifar):
    from xtl.data.stream import take

    memory = load_split(str(cifar), SPEC)["test"].images
    streamed = load_split(str(cifar), SPEC, data_path="stream")["test"].images
    shard = take(streamed, slice(10, 25))
    assert isinstance(shard, StreamedImages) and shard.shape == (15, 3, 32, 32)
    assert torch.equal(shard[0:15], memory[10:25]) and torch.equal(take(memory, slice(10, 25)), memory[10:25])


def test_explanations_and_faithfulness_of_a_streamed_run_are_those_of_the_in_memory_run(cifar, tmp_path):
    """The same run read both ways (its config.yaml's data_path changed): the same stored maps, under
    the same key (the images' hash is the same), and the same faithfulness scores."""
    import shutil

    from safetensors.torch import load_file

    from xtl.explain.runner import explain_run
    from xtl.faithfulness.runner import faithfulness_run
    from xtl.io import read_yaml, write_yaml

    from helpers import tiny_run

    memory = tiny_run(tmp_path / "memory", cifar, "timm:resnet10t", 32)
    shutil.copytree(memory.path, tmp_path / "stream")
    streamed = RunDir(tmp_path / "stream")
    data = read_yaml(streamed.config_path)
    data["run"]["data_path"] = "stream"
    write_yaml(streamed.config_path, data)
    assert isinstance(streamed.load_split()["test"].images, StreamedImages)
    maps = {}
    for name, run in (("memory", memory), ("stream", streamed)):
        paths = explain_run(run, ["gradcam"], n_images=12, batch_size=8, progress=False)
        shards = sorted((paths["maps"] / "gradcam").glob("*/batch_*.safetensors"))
        maps[name] = [(s.relative_to(paths["maps"]), load_file(str(s))) for s in shards]
        faithfulness_run([run], ["gradcam"], n_images=8, steps=4, batch_size=8, device="cpu", progress=False,
                         resume=False, baseline="zero")
    assert [p for p, _ in maps["memory"]] == [p for p, _ in maps["stream"]]
    for (_, a), (_, b) in zip(maps["memory"], maps["stream"]):
        assert torch.equal(a["raw"], b["raw"]) and torch.equal(a["ids"], b["ids"])
    from xtl.io import read_csv

    timing = {"run", "explain_s", "score_s", "score_images_per_s"}
    scores = [[{k: v for k, v in row.items() if k not in timing} for row in read_csv(run.path / "faithfulness.csv")]
              for run in (memory, streamed)]
    assert scores[0] == scores[1] and scores[0][0]["method"] == "gradcam"  # then the references


LIMITED = """
import resource, sys
import torch
from xtl.data import SplitSpec, load_split
from xtl.data.stream import image_batches
from xtl.errors import XtlError
torch.set_num_threads(1)
size = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize")][0]
resource.setrlimit(resource.RLIMIT_AS, (size + 400 * 2**20, resource.RLIM_INFINITY))  # 400 MiB more, no more
spec = SplitSpec("random", train_size=5000, val_size=0, test_size=0, seed=0, store_size=192)
try:
    split = load_split(sys.argv[2], spec, data_path=sys.argv[1], num_workers=2)
    batches = [range(s, min(s + 256, 5000)) for s in range(0, 5000, 256)]
    print("read", sum(len(x) for x in image_batches(split["train"].images, batches)))
except XtlError as err:
    print(err)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmSize from /proc")
def test_a_split_larger_than_the_memory_allowed_is_read_streamed(cifar):
    """5,000 images at 192 px (527 MiB decoded) under an address-space limit of 400 MiB beyond what the
    process holds after its imports: the in-memory path runs out (one line naming the way out), the
    streamed one reads every image."""
    outputs = {}
    for data_path in ("memory", "stream"):
        # glibc's per-thread malloc arenas reserve 64 MiB of address space each: without a cap, the
        # workers' threads alone could use the limit up at random
        done = subprocess.run([sys.executable, "-c", LIMITED, data_path, str(cifar)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
        outputs[data_path] = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    assert outputs == {"memory": "out of memory decoding the 5,000 images of split part 'train' of "
                                 f"{cifar} into memory (527 MiB); use --data-path stream (decoded per batch) or auto",
                       "stream": "read 5000"}


def test_in_memory_images_are_decoded_a_chunk_at_a_time_as_all_at_once(tiny_folder, cifar):
    """The in-memory path fills one tensor a chunk at a time: the values `images_to_uint8` gives for all
    the images at once, for images of one size and of mixed sizes."""
    from dataclasses import replace

    from xtl.data.sources import images_to_uint8, open_source
    from xtl.data.splits import decode_into_memory

    for k, path in enumerate(sorted((tiny_folder / "train" / "cat").iterdir())[:3]):
        Image.open(path).resize((40 + 10 * k, 30)).save(path)  # a mixed-size partition: fitted to 256 px
    for folder, part in ((cifar, "test"), (tiny_folder, "train")):
        partition = open_source(str(folder)).partition(part)
        ids = np.arange(0, min(len(partition), 40))
        whole = images_to_uint8(partition.fetch(ids.tolist()))
        assert torch.equal(decode_into_memory(partition, ids, None, "test", chunk=3), whole)
        assert torch.equal(decode_into_memory(partition, ids, 48, "test", chunk=7), images_to_uint8(partition.fetch(ids.tolist()), 48))
        # headers that mislead (an EXIF rotation stored after a PNG's pixels): decoded all at once, as before
        misled = replace(partition, sizes=lambda chosen: [(16, 16)] * len(chosen))
        assert torch.equal(decode_into_memory(misled, ids, None, "test", chunk=3), whole)


def test_explain_and_faithfulness_decode_a_streamed_split_in_worker_processes(cifar, tmp_path, monkeypatch):
    """`xtl explain` and `xtl faithfulness` on a streamed run: every batch decoded in a DataLoader worker
    (none in the main process), and faithfulness fed a batch at a time (`SplitInputs`) scores as it
    does the tensor of all the images, under the same cache key."""
    from xtl.explain.runner import RunExplainer
    from xtl.faithfulness.cache import cache_folder
    from xtl.faithfulness.runner import score_model
    from xtl.faithfulness.settings import FaithfulnessSettings
    from xtl.inference import LoadedRun, SplitInputs

    from helpers import tiny_run

    run = tiny_run(tmp_path / "run", cifar, "timm:resnet10t", 32, data_path="stream")
    log = tmp_path / "decoded.txt"
    decode = StreamedImages.decode

    def logged(self, positions):
        positions = list(positions)
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {len(positions)}\n")
        return decode(self, positions)

    def decoders() -> list[tuple[int, int]]:
        found = [tuple(map(int, line.split())) for line in log.read_text().splitlines()] if log.is_file() else []
        log.unlink(missing_ok=True)
        return found

    explainer = RunExplainer(run, "test", "cpu")
    assert isinstance(explainer.part.images, StreamedImages)
    explainer.images_digest, explainer.probabilities  # noqa: B018  (read before the count starts)
    monkeypatch.setattr(StreamedImages, "decode", logged)  # forked workers inherit it
    explainer.stream(["gradcam"], 24, 8, "predicted", progress=False)
    decoded = decoders()
    assert sum(n for _, n in decoded) == 24 and os.getpid() not in {pid for pid, _ in decoded}

    loaded = LoadedRun(run, "test", "cpu")
    lazy = loaded.lazy_inputs(16)
    assert isinstance(lazy, SplitInputs) and lazy.shape == (16, 3, 32, 32)
    decoders()
    settings = FaithfulnessSettings(steps=4, explain_batch_size=4, batch_size=16)
    labels = loaded.part.labels[:16]
    scores = score_model(loaded.model, loaded.spec, lazy, labels, ["gradcam"], settings)
    decoded = decoders()
    assert sum(n for _, n in decoded) == 16 and os.getpid() not in {pid for pid, _ in decoded}
    monkeypatch.undo()
    whole = loaded.inputs(slice(0, 16))
    assert torch.equal(torch.cat(list(lazy.batches([slice(0, 5), slice(5, 16)]))), whole)
    expected = score_model(loaded.model, loaded.spec, whole, labels, ["gradcam"], settings)
    for a, b in zip(expected, scores):
        assert a.method == b.method and set(a.curves) == set(b.curves)
        for column in a.curves:
            assert torch.equal(a.curves[column].values, b.curves[column].values), (a.method, column)
    std, resolved = loaded.preprocess.std, settings.with_grid(28)  # "common" at 32 px: 28 cells
    assert cache_folder(tmp_path, loaded.model, lazy, labels, resolved, std) == \
        cache_folder(tmp_path, loaded.model, whole, labels, resolved, std)


CLI_LIMITED = """
import resource, sys
import lightning.fabric, timm, torch  # the heavy imports first: the limit is on what the command adds
import xtl.cli, xtl.explain.runner, xtl.faithfulness.runner, xtl.train  # noqa: F401
size = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize")][0]
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]) * 2**20, resource.RLIM_INFINITY))
sys.argv = ["xtl", *sys.argv[2:]]
xtl.cli.main()
"""


@pytest.fixture(scope="module")
def large_images(tmp_path_factory, cifar) -> Path:
    """A folder of 700 real CIFAR-10 images enlarged to 512 x 512 (4 classes; 550 MiB decoded)."""
    root = tmp_path_factory.mktemp("large")
    for part, per_class in (("train", 150), ("test", 25)):
        for name in ("airplane", "cat", "ship", "truck"):
            (root / part / name).mkdir(parents=True)
            for f in sorted((cifar / part / name).iterdir())[:per_class]:
                Image.open(f).resize((512, 512), Image.Resampling.BILINEAR).save(root / part / name / f.name, quality=85)
    return root


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmSize from /proc")
def test_finetune_explain_and_faithfulness_run_streamed_where_memory_would_not_do(large_images, tmp_path):
    """The commands themselves under an address-space limit of 400 MiB beyond what the process holds
    after its imports, on 700 images of 512 px (550 MiB decoded): `xtl finetune --data-path memory`
    stops with one line naming --data-path stream; streamed, `xtl finetune`, `xtl explain` and
    `xtl faithfulness` all finish."""
    from xtl.faithfulness.results import read_rows

    from helpers import one_line_error

    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}  # arenas: see the test above

    def limited(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", CLI_LIMITED, "400", *args], capture_output=True, text=True,
                              timeout=600, env=env, cwd=tmp_path)

    finetune_args = ["finetune", "--source", str(large_images), "--model", "timm:resnet10t", "--random-init",
                     "--input-size", "32", "--split", "random", "--train-size", "560", "--val-size", "40",
                     "--test-size", "100", "--epochs", "1", "--batch-size", "16", "--eval-batch-size", "16",
                     "--device", "cpu", "--no-progress", "--runs-dir", str(tmp_path)]
    refused = limited(*finetune_args, "--name", "memory", "--data-path", "memory")
    one_line_error(refused, "out of memory decoding the 560 images of split part 'train'", "use --data-path stream")
    done = limited(*finetune_args, "--name", "stream", "--data-path", "stream")
    assert done.returncode == 0, done.stderr[-3000:]
    run = RunDir(tmp_path / "stream")
    assert run.config().data_path == "stream" and run.file("predictions.csv").is_file()
    done = limited("explain", str(run.path), "--methods", "gradcam", "--images", "32", "--device", "cpu",
                   "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((run.path / "explanations" / "test" / "gradcam").glob("*/batch_*.safetensors"))) == 2
    done = limited("faithfulness", str(run.path), "--methods", "gradcam", "--images", "8", "--steps", "4",
                   "--grid", "8", "--baseline", "zero", "--batch-size", "8", "--explain-batch-size", "4", "--device", "cpu", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["method"] for row in read_rows(run.file("faithfulness.csv"))] == ["gradcam", "random", "uniform"]
