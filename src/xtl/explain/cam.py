"""The CAM family of pytorch-grad-cam on tensors: Grad-CAM, Grad-CAM++, Score-CAM, LayerCAM, EigenCAM.

Each method is the library's formula on the target layer's activations A [B, C, h, w] and the
gradients G = d logit_target / dA (ViT tokens folded into the patch grid first). The raw map is
ReLU(CAM) on that feature grid: what pytorch-grad-cam has before it min-max scales and resizes
each map with OpenCV, so `explain()`'s upsampling and normalisation give the library's own map
(the tests check it against the library). Unlike the library, everything stays batched on the
images' device, and no parameter gradients are accumulated.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from xtl.errors import XtlError
from xtl.explain.base import ExplainMethod, patch_grid, register_method
from xtl.models import ModelSpec, submodule

Reshape = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def layer_outputs(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect what `layer` returns during the block; the hook is removed on exit, also on errors."""
    outputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def token_grid(model: nn.Module, spec: ModelSpec, images: torch.Tensor) -> Reshape:
    """ViT tokens [B, N, C] -> [B, C, h, w]: drop the prefix tokens (CLS, registers), fold the patches."""
    height, width = patch_grid(spec, images)
    prefix = getattr(model, "num_prefix_tokens", 1)  # timm says; HF and torchvision ViTs have one CLS token

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[1] != prefix + height * width:
            raise XtlError(
                f"layer {spec.target_layer} of {spec.name} gives {tuple(tokens.shape)}, "
                f"not [B, {prefix} + {height}x{width} tokens, C]"
            )
        patches = tokens[:, prefix:]
        return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


def layer_signals(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelSpec, with_gradients: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activations [B, C, h, w] of the target layer and, optionally, d logit_target / d activations."""
    layer = submodule(model, spec.target_layer)
    reshape = token_grid(model, spec, images) if spec.family == "vit" else (lambda tensor: tensor)
    # the input carries the graph, so that frozen models (no parameter needs a gradient) work too
    images = images.detach().requires_grad_(with_gradients)
    with layer_outputs(layer) as outputs, torch.set_grad_enabled(with_gradients):
        logits = model(images)
    if not outputs:
        raise XtlError(f"target layer {spec.target_layer} of {spec.name} did not run in the forward pass")
    activations = outputs[0]  # the first call, as pytorch-grad-cam takes
    if not with_gradients:
        return reshape(activations).detach(), None
    score = logits.gather(1, targets[:, None]).sum()  # images are independent: one backward for the batch
    (gradients,) = torch.autograd.grad(score, activations)
    return reshape(activations).detach(), reshape(gradients)


class CamMethod(ExplainMethod):
    """Hook the target layer, one forward (and backward); subclasses say how channels are weighted
    (`channel_weights`) or, in full, how the map is made from activations and gradients (`cam_image`)."""

    uses_gradients: ClassVar[bool] = True

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelSpec
    ) -> torch.Tensor:
        activations, gradients = layer_signals(model, images, targets, spec, self.uses_gradients)
        return self.cam_image(activations, gradients).clamp_min(0).float()

    def cam_image(self, activations: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
        return weighted_sum(self.channel_weights(activations, gradients), activations)

    def channel_weights(self, activations: torch.Tensor, gradients: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """[B, C] weights, [B, C, h, w] activations -> [B, h, w]."""
    return (weights[:, :, None, None] * activations).sum(1)


@register_method
class GradCam(CamMethod):
    """Selvaraju et al. 2017: channel weight = mean gradient."""

    name = "gradcam"

    def channel_weights(self, activations, gradients):
        return gradients.mean((2, 3))


@register_method
class GradCamPlusPlus(CamMethod):
    """Chattopadhay et al. 2018 (eq. 19): positive gradients weighted by alpha_ij."""

    name = "gradcam++"

    def channel_weights(self, activations, gradients):
        grads_2 = gradients.pow(2)
        sum_activations = activations.sum((2, 3), keepdim=True)
        alpha = grads_2 / (2 * grads_2 + sum_activations * grads_2 * gradients + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (gradients.clamp_min(0) * alpha).sum((2, 3))


@register_method
class LayerCam(CamMethod):
    """Jiang et al. 2021: positive gradients times activations, per position."""

    name = "layercam"

    def cam_image(self, activations, gradients):
        return (gradients.clamp_min(0) * activations).sum(1)


@register_method
class ScoreCam(CamMethod):
    """Wang et al. 2020: channel weight = softmax over channels of the target logit when the input
    is masked by that channel's (upsampled, min-max scaled) activation. One forward per channel,
    `batch_size` masked images at a time, across the images of the batch."""

    name = "scorecam"
    gradient_based = False
    uses_gradients = False

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelSpec, batch_size: int = 32
    ) -> torch.Tensor:
        activations, _ = layer_signals(model, images, targets, spec, with_gradients=False)
        weights = masked_scores(model, images, targets, activations, batch_size).softmax(-1)
        return weighted_sum(weights, activations).clamp_min(0).float()


def masked_scores(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, activations: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Target logit [B, C] of each image masked by each of its channels."""
    n_images, n_channels = activations.shape[:2]
    maps = activations.flatten(0, 1)  # [B*C, h, w], image-major
    scores = torch.empty(len(maps), device=images.device)
    with torch.no_grad():
        for start in range(0, len(maps), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(maps)), device=images.device)
            owner = rows // n_channels
            logits = model(images[owner] * channel_masks(maps[rows], images.shape[-2:]))
            scores[rows] = logits.gather(1, targets[owner, None]).squeeze(1).float()
    return scores.view(n_images, n_channels)


def channel_masks(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, h, w] -> [N, 1, H, W] in [0, 1], upsampled as the library does (align_corners=True)."""
    masks = F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=True)
    flat = masks.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1, 1)
    high = flat.max(1).values.view(-1, 1, 1, 1)
    return (masks - low) / (high - low + 1e-8)


@register_method
class EigenCam(CamMethod):
    """Muhammad & Yeasin 2020: projection of the activations on their first principal component."""

    name = "eigencam"
    class_discriminative = False
    gradient_based = False
    uses_gradients = False

    def cam_image(self, activations, gradients):
        # the library's own SVD (NumPy, one CPU trip per batch): the component's sign is arbitrary,
        # and only the same LAPACK call gives the same sign as pytorch-grad-cam
        from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

        projection = get_2d_projection(activations.float().cpu().numpy())
        return torch.from_numpy(projection).to(activations.device)
