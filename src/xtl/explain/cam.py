"""The CAM family of pytorch-grad-cam on tensors: Grad-CAM, Grad-CAM++, Score-CAM, LayerCAM, EigenCAM.

Each method is the library's formula on the target layer's activations A [B, C, h, w] and the
gradients G = d logit_target / dA (ViT tokens folded into the patch grid first). The raw map is
ReLU(CAM) on that feature grid: what pytorch-grad-cam has before it min-max scales and resizes
each map with OpenCV, so `explain()`'s upsampling and normalisation give the library's own map
(the tests check it against the library). Unlike the library, everything stays batched on the
images' device (but EigenCAM's SVD, which runs in NumPy for the library's sign: one reduced SVD for
the batch), and no parameter gradients are accumulated.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from xtl.errors import XtlError
from xtl.explain.base import ExplainMethod, patch_grid, register_method
from xtl.models import ModelDescription, submodule

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


def token_grid(model: nn.Module, spec: ModelDescription, images: torch.Tensor, layer_name: str) -> Reshape:
    """ViT tokens [B, N, C] -> [B, C, h, w]: drop the prefix tokens (CLS, registers), fold the patches."""
    if spec.patch_size is None:
        raise XtlError(f"layer {layer_name} of {spec.name} gives tokens [B, N, C] and the model has no patch size "
                       "described: pass reshape_transform= (tokens -> [B, C, h, w]) or spec= with patch_size")
    height, width = patch_grid(spec, images)
    prefix = spec.prefix_tokens if spec.prefix_tokens is not None else getattr(model, "num_prefix_tokens", 1)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != prefix + height * width:
            raise XtlError(
                f"layer {layer_name} of {spec.name} gives {tuple(tokens.shape)}, "
                f"not [B, {prefix} + {height}x{width} tokens, C]: pass reshape_transform= for this layer"
            )
        patches = tokens[:, prefix:]
        return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


def resolve_layer(model: nn.Module, spec: ModelDescription, target_layer: nn.Module | str | None,
                  method: str) -> tuple[nn.Module, str]:
    """The layer to hook and its name: `target_layer` (a module of the model or a dotted path),
    else the description's; one line saying how to give one when there is none."""
    if isinstance(target_layer, nn.Module):
        names = [name for name, module in model.named_modules() if module is target_layer]
        if not names:
            raise XtlError(f"option target_layer of method {method}: the {type(target_layer).__name__} given is not "
                           f"a module of {spec.name}")
        return target_layer, names[0].removeprefix("model.") or type(target_layer).__name__
    path = target_layer if target_layer is not None else spec.target_layer
    if not path:
        raise XtlError(f"method {method} needs a target layer and none is described for {spec.name}: pass "
                       "target_layer= a module (e.g. target_layer=model.layer4) or a dotted path (e.g. 'layer4')")
    if not isinstance(path, str):
        raise XtlError(f"option target_layer of method {method} must be a module or a dotted path, not {type(path).__name__}")
    try:
        return submodule(model, path), path
    except (AttributeError, IndexError, TypeError, ValueError):
        raise XtlError(f"option target_layer of method {method}: {spec.name} has no layer '{path}'") from None


def layer_signals(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription, with_gradients: bool,
    target_layer: nn.Module | str | None = None, reshape_transform: Reshape | None = None, method: str = "cam",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activations [B, C, h, w] of the target layer and, optionally, d logit_target / d activations."""
    layer, layer_name = resolve_layer(model, spec, target_layer, method)
    # the input carries the graph, so that frozen models (no parameter needs a gradient) work too
    images = images.detach().requires_grad_(with_gradients)
    with layer_outputs(layer) as outputs, torch.set_grad_enabled(with_gradients):
        logits = model(images)
    if not outputs:
        raise XtlError(f"target layer {layer_name} of {spec.name} did not run in the forward pass")
    activations = outputs[0]  # the first call, as pytorch-grad-cam takes
    if isinstance(activations, (tuple, list)):
        activations = activations[0]
    if reshape_transform is not None:
        reshape = reshape_transform
    elif activations.ndim == 3:
        reshape = token_grid(model, spec, images, layer_name)
    elif activations.ndim == 4:
        reshape = _identity
    else:
        raise XtlError(f"target layer {layer_name} of {spec.name} gives {tuple(activations.shape)}, not feature maps "
                       "[B, C, h, w] or tokens [B, N, C]: pass reshape_transform= or another target_layer")
    if not with_gradients:
        return _checked(reshape(activations).detach(), layer_name), None
    score = logits.gather(1, targets[:, None]).sum()  # images are independent: one backward for the batch
    (gradients,) = torch.autograd.grad(score, activations)
    return _checked(reshape(activations).detach(), layer_name), reshape(gradients)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _checked(activations: torch.Tensor, layer_name: str) -> torch.Tensor:
    if activations.ndim != 4:
        raise XtlError(f"reshape_transform of layer {layer_name} gives {tuple(activations.shape)}, not [B, C, h, w]")
    return activations


class CamMethod(ExplainMethod):
    """Hook the target layer, one forward (and backward); subclasses say how channels are weighted
    (`channel_weights`) or, in full, how the map is made from activations and gradients (`cam_image`)."""

    uses_gradients: ClassVar[bool] = True

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription,
        target_layer: nn.Module | str | None = None, reshape_transform: Reshape | None = None,
    ) -> torch.Tensor:
        activations, gradients = layer_signals(model, images, targets, spec, self.uses_gradients,
                                               target_layer, reshape_transform, self.name)
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
    reference = "Selvaraju et al., Grad-CAM, ICCV 2017"

    def channel_weights(self, activations, gradients):
        return gradients.mean((2, 3))


@register_method
class GradCamPlusPlus(CamMethod):
    """Chattopadhay et al. 2018 (eq. 19): positive gradients weighted by alpha_ij."""

    name = "gradcam++"
    reference = "Chattopadhay et al., Grad-CAM++, WACV 2018"

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
    reference = "Jiang et al., LayerCAM, IEEE TIP 2021"

    def cam_image(self, activations, gradients):
        return (gradients.clamp_min(0) * activations).sum(1)


@register_method
class ScoreCam(CamMethod):
    """Wang et al. 2020: channel weight = softmax over channels of the target logit when the input
    is masked by that channel's (upsampled, min-max scaled) activation. One forward per channel,
    `batch_size` masked images at a time, across the images of the batch."""

    name = "scorecam"
    reference = "Wang et al., Score-CAM, CVPR Workshops 2020"
    gradient_based = False
    uses_gradients = False

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription,
        target_layer: nn.Module | str | None = None, reshape_transform: Reshape | None = None, batch_size: int = 32,
    ) -> torch.Tensor:
        if batch_size < 1:
            raise XtlError(f"option batch_size of method {self.name} must be at least 1, not {batch_size}")
        activations, _ = layer_signals(model, images, targets, spec, False, target_layer, reshape_transform, self.name)
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
    reference = "Muhammad & Yeasin, Eigen-CAM, IJCNN 2020"
    class_discriminative = False
    gradient_based = False
    uses_gradients = False

    def cam_image(self, activations, gradients):
        return first_component_projection(activations)


def first_component_projection(activations: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h, w]: pytorch-grad-cam's `get_2d_projection` (NaN -> 0, positions centred
    per channel, projection on the first right-singular vector), with a reduced SVD of the whole
    batch in one call instead of one full SVD per image (whose V^T is C x C: 2048 x 2048 on a
    ResNet-50) -- the first component is the same. The component's sign is arbitrary and only the
    same LAPACK routine gives the library's: NumPy's reduced SVD (the same gesdd) keeps it, torch's
    (MKL on the CPU, cuSOLVER on a GPU) flips about half of the maps, so the SVD runs in NumPy, on
    one BLAS thread: the matrices are small ([hw, C] per image), and OpenBLAS's threads on a busy
    CPU made the same SVD 10-30 times slower (measured on a shared 2-core machine)."""
    import numpy as np

    batch = np.nan_to_num(activations.detach().float().cpu().numpy(), nan=0.0)
    n, channels, height, width = batch.shape
    positions = batch.reshape(n, channels, height * width).transpose(0, 2, 1)  # [B, hw, C]
    positions = positions - positions.mean(axis=1, keepdims=True)
    with _one_blas_thread():
        _, _, vt = np.linalg.svd(positions, full_matrices=False)
        projection = np.matmul(positions, vt[:, 0, :, None])[..., 0].reshape(n, height, width)
    return torch.from_numpy(np.float32(projection)).to(activations.device)


_BLAS_CONTROLLER = None


def _one_blas_thread():
    """NumPy's BLAS/LAPACK limited to one thread for the block (threadpoolctl, a scikit-learn
    dependency; no limit where it is missing). The controller's scan of the loaded libraries runs once."""
    global _BLAS_CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")
