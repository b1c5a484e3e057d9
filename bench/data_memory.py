"""Peak memory of the two data paths against the data set's size (issue 18).

    .venv/bin/python bench/data_memory.py [--sizes 2000 10000 40000] [--paths memory stream]
        [--store-size N] [--workers 2] [--batch 256] [--source ../shared/data/cifar10] [--markdown FILE]

Each measurement is a fresh process (`--child`): `load_split` of a random split of N training
images (no validation or test images) with `data_path` memory or stream, then one epoch of that
part in shuffled batches of `--batch`, as training reads it (`xtl.data.stream.image_batches`:
slices of the tensor in memory, or batches decoded ahead in `--workers` worker processes), each
batch checksummed (crc32) so that it is really read. Reported per measurement:
- `main peak RSS`: the measuring process's peak resident memory (`getrusage(RUSAGE_SELF)`; forked
  workers share its pages until they write them, so their RSS would count those pages again);
- `peak total PSS`: the process and its workers together, shared pages split among them
  (`/proc/PID/smaps_rollup`, sampled every 50 ms: the largest sum seen);
- `seconds`: the load and the epoch, wall time.
`--store-size N` fits every image to N x N first (what a folder of mixed sizes or large images is
stored as), so that the images weigh what larger data sets' do.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

from common import save

REPO = Path(__file__).resolve().parents[1]


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return pids


def child(n: int, path: str, store_size: int | None, workers: int, batch: int, source: str) -> dict:
    import torch

    from xtl.data import SplitSpec, load_split
    from xtl.data.stream import image_batches

    peak = {"pss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["pss"] = max(peak["pss"], sum(_pss_kib(p) for p in _tree(os.getpid())))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    spec = SplitSpec("random", train_size=n, val_size=0, test_size=0, seed=0, store_size=store_size)
    split = load_split(source, spec, data_path=path, num_workers=workers)
    loaded = time.perf_counter()
    images = split["train"].images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    batches = [order[s : s + batch] for s in range(0, len(order), batch)]
    total, seen = 0, 0
    for x in image_batches(images, batches):
        total = zlib.crc32(x.numpy(), total)  # reads every byte (a torch reduction's first call costs ~190 MiB)
        seen += len(x)
    finished = time.perf_counter()
    done.set()
    sampler.join()
    assert seen == n
    return {
        "n": n, "path": split.data_path, "store_size": store_size, "workers": workers,
        "shape": list(images.shape), "decoded_mib": round(n * images.shape[1] * images.shape[2] * images.shape[3] / 2**20, 1),
        "main_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_total_pss_mib": round(peak["pss"] / 1024, 1),
        "load_s": round(loaded - started, 1), "epoch_s": round(finished - loaded, 1),
    }


def machine() -> str:
    model, cores = "", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            total = int(f.readline().split()[1])
        mem = f", {total / 2**20:.0f} GiB"
    except (OSError, ValueError):
        pass
    return f"{model}, {cores} cores{mem}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 40000])
    parser.add_argument("--paths", nargs="+", default=["memory", "stream"])
    parser.add_argument("--store-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--source", default=str(REPO / "../shared/data/cifar10"))
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.n, args.path, args.store_size, args.workers, args.batch, args.source)))
        return
    rows = []
    load_before = os.getloadavg()
    for n in args.sizes:
        for path in args.paths:
            command = [sys.executable, __file__, "--child", "--n", str(n), "--path", path, "--workers",
                       str(args.workers), "--batch", str(args.batch), "--source", args.source]
            if args.store_size:
                command += ["--store-size", str(args.store_size)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    load_after = os.getloadavg()
    lines = [
        f"{datetime.date.today().isoformat()}, {machine()}, load average {load_before[0]:.1f} before / "
        f"{load_after[0]:.1f} after; images {rows[0]['shape'][1:]} uint8, {args.workers} decode workers "
        f"(stream), batches of {args.batch}.",
        "",
        "| images | path | decoded images MiB | main peak RSS MiB | peak total PSS MiB (with workers) | load s | epoch s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['path']} | {r['decoded_mib']} | {r['main_peak_rss_mib']} | "
                     f"{r['peak_total_pss_mib']} | {r['load_s']} | {r['epoch_s']} |")
    save({}, None, "\n".join(lines), args.markdown)  # printed, and written to --markdown


if __name__ == "__main__":
    main()
