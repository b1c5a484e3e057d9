"""Issue 27: xtl's wheel installs into a research environment that already has torch, and keeps it.

The "research environment" is a new virtual environment that sees this environment's packages
through a `.pth` file (torch and the rest "already installed", as in a user's own environment),
less xtl itself and the extras' big packages (gradio, transformers, datasets, ...), so that the
core dependencies are shown to be enough on their own. The wheel is installed with dependency
resolution but offline (`--no-index`, only the wheel's folder to find packages in): it succeeds
only where every core requirement is met by what is there, and it cannot replace torch.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.xdist_group("install")

REPO = Path(__file__).resolve().parents[1]
# Distributions left out of the research environment: xtl (its editable install here) and the
# packages of the extras (app, hf, test), which `pip install xtl` must not need
LEFT_OUT = ("xtl", "gradio", "gradio_client", "transformers", "datasets", "grad-cam", "quantus")
TORCH_LIKE = ("torch", "torchvision", "triton", "nvidia-", "cuda-")


def _run(*args, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env,
                            **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _left_out_entries() -> set[str]:
    """The top-level site-packages entries (packages, dist-info folders, .pth files) of LEFT_OUT."""
    entries = set()
    for name in LEFT_OUT:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        entries |= {Path(f).parts[0] for f in dist.files or () if Path(f).parts[0] != ".."}
    return entries


def _research_env(tmp_path: Path) -> tuple[Path, Path]:
    """A new venv whose .pth makes a view of this environment's site-packages (less LEFT_OUT) visible."""
    site = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path / "research-site-packages"
    view.mkdir()
    skip = _left_out_entries()
    for entry in site.iterdir():
        if entry.name not in skip and not entry.name.endswith(".pth") and entry.name != "__pycache__":
            (view / entry.name).symlink_to(entry)
    env = tmp_path / "env"
    # without pip of its own: its pip (and the setuptools that torch requires) are the research
    # environment's, as they would be there, not the older ones that ensurepip brings
    _run(sys.executable, "-m", "venv", "--without-pip", env)
    python = env / "bin" / "python"
    env_site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (env_site / "research_env.pth").write_text(f"{view}\n")
    return python, env_site


def _wheel(tmp_path: Path) -> Path:
    """xtl's wheel, built offline from a copy of the sources (no build files left in the work tree)."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--isolated", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", wheels, tree)
    assert len(list(wheels.glob("xtl-*.whl"))) == 1
    return wheels


CHECK = """
import importlib.util, json, os, sys
import torch, xtl
import timm
from xtl.explain import explain
torch.manual_seed(0)
model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
explanation = explain(model, torch.rand(1, 3, 32, 32), method="saliency")
maps = explanation.maps
print(json.dumps({
    "torch": os.path.realpath(torch.__file__), "xtl": os.path.realpath(xtl.__file__),
    "shape": list(maps.shape), "finite": bool(torch.isfinite(maps).all()),
    "range": [float(maps.min()), float(maps.max())],
    "heavy": sorted(m for m in ("gradio", "transformers", "datasets") if m in sys.modules),
    "findable": sorted(m for m in ("gradio", "transformers", "datasets", "pytorch_grad_cam")
                       if importlib.util.find_spec(m) is not None),
}))
"""


def test_wheel_installs_beside_the_torch_already_there(tmp_path):
    wheels = _wheel(tmp_path)
    python, env_site = _research_env(tmp_path)
    here_torch = os.path.realpath(torch.__file__)

    report = tmp_path / "pip-report.json"
    _run(python, "-m", "pip", "install", "--isolated", "--no-index", "--find-links", wheels, "--no-cache-dir",
         "--report", report, "xtl", cwd=tmp_path)
    installed = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    assert installed == [("xtl", importlib.metadata.version("xtl"))], installed

    listed = json.loads(_run(python, "-m", "pip", "list", "--isolated", "--path", env_site, "--format", "json").stdout)
    names = {p["name"].lower() for p in listed}
    assert "xtl" in names and not [n for n in names if n.startswith(TORCH_LIKE)], names

    result = json.loads(_run(python, "-c", CHECK, cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert result["torch"] == here_torch  # the torch that was there, not a new one
    assert result["xtl"].startswith(str(env_site.resolve()))  # the wheel's xtl, not the source tree
    assert result["shape"] == [1, 32, 32] and result["finite"], result
    assert 0.0 <= result["range"][0] <= result["range"][1] <= 1.0, result
    assert result["heavy"] == [], f"import xtl.explain imported {result['heavy']}"
    assert result["findable"] == [], result  # the extras' packages were indeed left out

    version = _run(python.with_name("xtl"), "--version", cwd=tmp_path).stdout
    assert version.strip() == f"xtl {importlib.metadata.version('xtl')}"
