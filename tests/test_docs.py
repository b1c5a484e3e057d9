"""Every Python block of docs/api.md runs, in order, in one namespace: the docs cannot rot."""

from __future__ import annotations

import os
import re


from conftest import IMAGENET_SAMPLE, REPO

DOC = REPO / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_api_page_has_code_for_every_kind_of_model():
    text = DOC.read_text()
    blocks = python_blocks(text)
    assert len(blocks) >= 6
    for needle in ("torchvision.models.resnet50", "timm.create_model", "ViTForImageClassification", "score(", "save_overlay"):
        assert any(needle in block for block in blocks), needle


def test_every_block_of_the_api_page_runs(tmp_path, capsys):
    assert IMAGENET_SAMPLE.is_dir()
    # run from a copy of the layout the page assumes (repository root, ../shared beside it)
    root = tmp_path / "repo"
    root.mkdir()
    (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        namespace: dict = {}
        for k, block in enumerate(python_blocks(DOC.read_text())):
            exec(compile(block, f"{DOC.name} block {k + 1}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "has no option 'n_steps'" in printed
    assert (root / "runs" / "api-example" / "gradcam.png").is_file()
    assert "torch.Size([1, 14, 14])" in printed
