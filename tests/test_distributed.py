"""Issue 18: `xtl explain / evaluate / faithfulness --devices 2` (two CPU processes, DDP on gloo) give
the files of one process: the same map shards, predictions, metrics and faithfulness table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from xtl.distributed import Ranks, launch
from xtl.errors import XtlError
from xtl.evaluate import evaluate
from xtl.explain.runner import explain_run
from xtl.faithfulness import faithfulness_run
from xtl.faithfulness.results import read_rows
from xtl.runs import RunDir

from helpers import XTL, one_line_error, tiny_run

METHODS = "gradcam,saliency"
FAITHFULNESS = ["--methods", METHODS, "--baseline", "zero", "--images", "16", "--steps", "4", "--explain-batch-size", "4",
                "--batch-size", "32"]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, cifar):
    """The same tiny run twice: explained, evaluated and scored by one process, and by two."""
    root = tmp_path_factory.mktemp("distributed")
    one = tiny_run(root / "one", cifar, "timm:resnet10t", 32)
    two = RunDir(shutil.copytree(one.path, root / "two"))
    explain_run(one, METHODS.split(","), batch_size=8, device="cpu", progress=False, gallery_size=3)
    evaluate(one, device="cpu")
    faithfulness_run([one], METHODS.split(","), n_images=16, steps=4, explain_batch_size=4, batch_size=32,
                     device="cpu", progress=False, baseline="zero")
    for command in (["explain", str(two.path), "--methods", METHODS, "--batch-size", "8"],
                    ["evaluate", str(two.path)],
                    ["faithfulness", str(two.path), *FAITHFULNESS]):
        result = two_processes(command, root)
        assert result.returncode == 0, result.stderr[-3000:]
    return one, two


def two_processes(command: list[str], cwd) -> subprocess.CompletedProcess:
    extra = ["--no-progress"] if command[0] != "evaluate" else []
    return subprocess.run([XTL, *command, "--device", "cpu", "--devices", "2", *extra], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def shards(run: RunDir, method: str) -> dict[str, dict]:
    """The stored maps of `method`: shard file name (with its set's key folder) -> tensors."""
    folder = run.path / "explanations" / "test" / method
    return {str(p.relative_to(folder)): load_file(str(p)) for p in sorted(folder.glob("*/batch_*.safetensors"))}


def test_two_processes_store_the_maps_of_one(one_and_two):
    one, two = one_and_two
    for method in METHODS.split(","):
        expected, got = shards(one, method), shards(two, method)
        assert list(got) == list(expected) and len(got) == 3  # 24 images in batches of 8: the same files
        for name, tensors in expected.items():
            assert torch.equal(got[name]["ids"], tensors["ids"]) and torch.equal(got[name]["targets"], tensors["targets"])
            torch.testing.assert_close(got[name]["raw"], tensors["raw"], rtol=1e-4, atol=1e-5)
    assert (two.figures / "gallery_correct_gradcam-saliency.png").stat().st_size > 10_000


def test_two_processes_evaluate_as_one(one_and_two):
    one, two = one_and_two
    assert two.file("predictions.csv").read_text() == one.file("predictions.csv").read_text()
    metrics = [json.loads(run.file("metrics.json").read_text()) for run in (one, two)]
    assert metrics[0] == metrics[1]


def test_two_processes_score_faithfulness_as_one(one_and_two):
    one, two = one_and_two
    expected, got = (read_rows(run.file("faithfulness.csv")) for run in (one, two))
    assert [r["method"] for r in got] == [r["method"] for r in expected] == ["gradcam", "saliency", "random", "uniform"]
    timings = {"run", "explain_s", "score_s", "score_images_per_s"}  # the run's name and the time it took
    for a, b in zip(expected, got):
        assert set(a) == set(b)
        for column in set(a) - timings:
            assert b[column] == (pytest.approx(a[column], rel=1e-4, abs=1e-6) if isinstance(a[column], float)
                                 else a[column]), column


def test_a_killed_two_process_explanation_resumes_per_shard(one_and_two, tmp_path):
    _, two = one_and_two
    folder = two.path / "explanations" / "test" / "gradcam"
    files = sorted(folder.glob("*/batch_*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in files}
    files[1].unlink()  # a batch of rank 1 never written
    result = two_processes(["explain", str(two.path), "--methods", "gradcam", "--batch-size", "8"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files[1].is_file()
    assert all(p.stat().st_mtime_ns == before[p] for p in (files[0], files[2]))


def test_shares_of_the_work():
    ranks = [Ranks(r, 2) for r in range(2)]
    assert [[k for k in range(5) if r.mine(k)] for r in ranks] == [[0, 2, 4], [1, 3]]
    assert [list(r.block(5)) for r in ranks] == [[0, 1, 2], [3, 4]]
    assert launch(1, 1) == Ranks()


def test_more_processes_than_the_machine_is_one_line(tmp_path, monkeypatch):
    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(XtlError, match=r"^option --devices \d+: on the CPU each device is a process"):
        launch(too_many, 1, "cpu")
    with pytest.raises(XtlError, match=r"^option --num-nodes 2: several nodes need a launcher on each node"):
        launch(1, 2, "cpu")
    with pytest.raises(XtlError, match=r"^option --device cuda:1 with --devices 2: each process takes its own device"):
        launch(2, 1, "cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(XtlError, match=r"^options --devices 2 x --num-nodes 1 make 2 processes, but the launcher "
                                       r"started WORLD_SIZE=3"):
        launch(2, 1, "cpu")
    result = subprocess.run([XTL, "explain", str(tmp_path), "--devices", "2", "--model", "timm:resnet10t"],
                            capture_output=True, text=True, timeout=120)
    one_line_error(result, "options --devices and --num-nodes apply to run directories")
    result = subprocess.run([XTL, "evaluate", str(tmp_path), "--devices", "0"], capture_output=True, text=True,
                            timeout=120)
    one_line_error(result, "--devices")
    for command in ("explain", "evaluate", "faithfulness"):  # checked before the processes start: one line, not two
        result = subprocess.run([XTL, command, str(tmp_path / "missing"), "--devices", "2", "--device", "cpu"],
                                capture_output=True, text=True, timeout=120)
        one_line_error(result, f"run directory {tmp_path / 'missing'} has no config.yaml")


def test_a_killed_two_process_faithfulness_resumes_per_batch(one_and_two, tmp_path):
    """A batch of rank 1 lost (the job killed before it was written): the same command computes that
    batch alone and the table is the one of the whole run."""
    _, two = one_and_two
    cache = sorted(two.file("faithfulness_cache").glob("*/gradcam/batch_*.safetensors"))
    assert len(cache) == 4  # 16 images in batches of 4, dealt out to 2 processes
    before = {p: p.stat().st_mtime_ns for p in cache}
    table = shutil.copy(two.file("faithfulness.csv"), tmp_path / "before.csv")
    cache[1].unlink()
    result = two_processes(["faithfulness", str(two.path), *FAITHFULNESS], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert cache[1].is_file() and all(p.stat().st_mtime_ns == before[p] for p in cache if p != cache[1])
    drop_timing = lambda rows: [{k: v for k, v in r.items() if k not in {"explain_s", "score_s", "score_images_per_s"}}  # noqa: E731
                                for r in rows]
    assert drop_timing(read_rows(two.file("faithfulness.csv"))) == drop_timing(read_rows(table))


def test_processes_started_by_torchrun_are_joined_not_spawned(one_and_two, tmp_path):
    """`torchrun --nproc-per-node 2 -m xtl explain RUN --devices 2`: Fabric joins the two processes
    torchrun started (its environment) instead of starting its own; the maps are those of one process."""
    import sys

    one, _ = one_and_two
    run = RunDir(shutil.copytree(one.path, tmp_path / "torchrun", ignore=shutil.ignore_patterns("explanations")))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "xtl", "explain", str(run.path), "--methods", "gradcam", "--batch-size", "8",
                             "--device", "cpu", "--devices", "2", "--no-progress"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = shards(one, "gradcam"), shards(run, "gradcam")
    assert list(got) == list(expected)
    for name, tensors in expected.items():
        assert torch.equal(got[name]["ids"], tensors["ids"])
        torch.testing.assert_close(got[name]["raw"], tensors["raw"], rtol=1e-4, atol=1e-5)


FAILING_RANK = """
import os

from xtl.errors import XtlError
from xtl.explain import runner

real = runner.RunExplainer._write_shard


def failing(self, shard, positions, *args, **kwargs):
    if os.environ.get("LOCAL_RANK") == "1":
        if os.environ["XTL_TEST_FAULT"] == "error":  # the environment reaches the process Fabric starts
            raise XtlError(f"injected failure in process 2 at {shard.name}")
        os.kill(os.getpid(), 9)
    return real(self, shard, positions, *args, **kwargs)


runner.RunExplainer._write_shard = failing
from xtl.cli import main

main()
"""


@pytest.mark.parametrize("fault", ["error", "kill"])
def test_a_failed_or_killed_process_is_one_line_per_error_and_the_same_command_resumes(fault, one_and_two, tmp_path):
    """Issue 28 probe: with `--devices 2`, process 2 fails (an error of its own, printed once by it) or
    is killed (SIGKILL) at its first batch. Process 1 waited for it in a barrier, and gloo's
    `Connection closed by peer` came out as a traceback, exit 1. Now it is one line, exit 2, no hang;
    process 1's finished shards are kept, no temporary file is left, and the same command finishes
    the rest to the one-process result."""
    import sys

    _, two = one_and_two
    run = RunDir(shutil.copytree(two.path, tmp_path / "run", ignore=shutil.ignore_patterns("explanations")))
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    command = ["explain", str(run.path), "--methods", "saliency", "--batch-size", "8", "--device", "cpu",
               "--devices", "2", "--no-progress"]
    result = subprocess.run([sys.executable, str(script), *command], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "XTL_TEST_FAULT": fault})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    lost = ("error: process 1 of 2: another process of this command failed (its error is above) or was killed; "
            "finished work is kept, and the same command continues from it")
    expected = (["error: injected failure in process 2 at batch_00001_8-15.safetensors"] if fault == "error" else []) + [lost]
    assert result.returncode == 2 and sorted(errors) == sorted(expected), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    kept = sorted(p.name for p in (run.path / "explanations").rglob("batch_*.safetensors"))
    assert kept == ["batch_00000_0-7.safetensors", "batch_00002_16-23.safetensors"]
    assert not list(run.path.rglob("*.tmp"))
    again = two_processes(command[:-5], tmp_path)  # without --device cpu --devices 2 --no-progress, which it adds
    assert again.returncode == 0, again.stderr[-3000:]
    assert shards(run, "saliency").keys() == shards(two, "saliency").keys()


def test_an_interrupt_of_a_multi_process_command_is_said_once(monkeypatch, capsys):
    """Ctrl-C reaches every process of a `--devices 2` command (its process group), and each said
    `interrupted: …` (the line twice, run together). Only the first process of the first node says
    it; each still stops (exit 130) with its finished batches kept."""
    from xtl.errors import sigterm_as_interrupt

    for env, said in (({}, True), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
                      ({"RANK": "3"}, False), ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False)):
        for key in ("RANK", "LOCAL_RANK", "NODE_RANK"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(KeyboardInterrupt):
            with sigterm_as_interrupt(lambda: "finished shards are kept"):
                raise KeyboardInterrupt
        assert (capsys.readouterr().err == "interrupted: finished shards are kept\n") is said, env
