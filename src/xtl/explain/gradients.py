"""Input-gradient methods through Captum, for CNNs and ViTs alike: saliency, integrated gradients, SmoothGrad.

The raw map is at input resolution [B, H, W]:
- saliency, smoothgrad: |gradient| summed over the colour channels (SmoothGrad averages |gradient|
  over the noisy copies, as Captum's NoiseTunnel over Saliency does);
- integrated_gradients: the attribution summed over the colour channels first, then |.|: a pixel's
  net contribution to the logit (completeness holds per pixel before the abs), not its magnitude.
"""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from xtl.explain.base import ExplainMethod, register_method
from xtl.models import ModelSpec


@register_method
class SaliencyMap(ExplainMethod):
    """Simonyan et al. 2014: |d logit_target / d input|."""

    name = "saliency"

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelSpec, **options
    ) -> torch.Tensor:
        inputs = images.detach().clone().requires_grad_(True)  # Captum flips requires_grad on what it gets
        return Saliency(model).attribute(inputs, target=targets, abs=True).sum(1)


@register_method
class IntegratedGradientsMap(ExplainMethod):
    """Sundararajan et al. 2017, from the all-zero input in normalised space (the data set's mean image)."""

    name = "integrated_gradients"

    def attribute(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        spec: ModelSpec,
        n_steps: int = 32,
        internal_batch_size: int | None = None,
    ) -> torch.Tensor:
        inputs = images.detach()
        attributions = IntegratedGradients(model).attribute(
            inputs, baselines=torch.zeros_like(inputs), target=targets,
            n_steps=n_steps, internal_batch_size=internal_batch_size,
        )
        return attributions.sum(1).abs()


@register_method
class SmoothGrad(ExplainMethod):
    """Smilkov et al. 2017: mean saliency over `n_samples` noisy copies; the noise's standard
    deviation is `stdev` times each image's value range (the paper's noise level)."""

    name = "smoothgrad"

    def attribute(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        spec: ModelSpec,
        n_samples: int = 16,
        stdev: float = 0.15,
        seed: int = 0,
        samples_per_batch: int | None = None,
    ) -> torch.Tensor:
        tunnel = SeededNoiseTunnel(Saliency(model), seed)
        attributions = tunnel.attribute(
            images.detach(), nt_type="smoothgrad", nt_samples=n_samples, stdevs=float(stdev),
            nt_samples_batch_size=samples_per_batch, target=targets,
        )
        return attributions.sum(1)


class SeededNoiseTunnel(NoiseTunnel):
    """NoiseTunnel with noise from its own generator, the same draws for every image of a batch:
    maps are reproducible and do not depend on which other images share the batch. Captum's own
    draws come from the global RNG, in one block for the whole batch."""

    def __init__(self, attribution_method: Saliency, seed: int) -> None:
        super().__init__(attribution_method)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on any device

    def _add_noise_to_input(self, input: torch.Tensor, stdev: float, nt_samples_partition: int) -> torch.Tensor:
        n_images = input.shape[0]
        noise = torch.randn((nt_samples_partition, *input.shape[1:]), generator=self.generator).to(input)
        value_range = (input.flatten(1).amax(1) - input.flatten(1).amin(1)).view(-1, 1, 1, 1)
        scale = (stdev * value_range).repeat_interleave(nt_samples_partition, dim=0)
        # Captum lays the copies out image-major (repeat_interleave), so the noise repeats per image
        return input.repeat_interleave(nt_samples_partition, dim=0) + scale * noise.repeat(n_images, 1, 1, 1)
