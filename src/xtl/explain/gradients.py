"""Input-gradient methods through Captum, for CNNs and ViTs alike: saliency, integrated gradients, SmoothGrad.

The raw map is at input resolution [B, H, W]:
- saliency, smoothgrad: |gradient| summed over the colour channels (SmoothGrad averages |gradient|
  over the noisy copies, as Captum's NoiseTunnel over Saliency does);
- integrated_gradients: the attribution summed over the colour channels, sign kept: a pixel's net
  contribution to the logit relative to the baseline (positive: for the class, negative: against);
  the map's sum is the logit minus the baseline's logit (completeness). The method is `signed`, so
  figures draw it on a zero-centred scale.
"""

from __future__ import annotations

import torch
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from xtl.explain.base import ExplainMethod, check_counts, register_method
from xtl.models import ModelSpec


@register_method
class SaliencyMap(ExplainMethod):
    """Simonyan et al. 2014: |d logit_target / d input|."""

    name = "saliency"
    reference = "Simonyan, Vedaldi & Zisserman, Deep Inside Convolutional Networks, ICLR Workshop 2014"

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelSpec, **options
    ) -> torch.Tensor:
        inputs = images.detach().clone().requires_grad_(True)  # Captum flips requires_grad on what it gets
        return Saliency(model).attribute(inputs, target=targets, abs=True).sum(1)


@register_method
class InputTimesGradient(ExplainMethod):
    """Shrikumar et al. 2016: input x d logit_target / d input, summed over the colour channels
    (signed; the input is the normalised image, so a pixel at the mean colour contributes 0)."""

    name = "input_x_gradient"
    signed = True
    reference = "Shrikumar et al., Not Just a Black Box: Learning Important Features Through Propagating Activation Differences, 2016"

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelSpec
    ) -> torch.Tensor:
        inputs = images.detach().clone().requires_grad_(True)  # Captum flips requires_grad on what it gets
        return InputXGradient(model).attribute(inputs, target=targets).sum(1)


PATH_POINTS_PER_PASS = 8


@register_method
class IntegratedGradientsMap(ExplainMethod):
    """Sundararajan et al. 2017: the path integral of the gradient from a baseline to the image,
    summed over the colour channels with its sign (evidence for and against the class)."""

    name = "integrated_gradients"
    reference = "Sundararajan, Taly & Yan, Axiomatic Attribution for Deep Networks, ICML 2017"
    signed = True

    def attribute(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        spec: ModelSpec,
        n_steps: int = 32,
        internal_batch_size: int | None = None,
        baselines: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw maps [B, H, W], signed.

        `baselines`: the input the path starts from, in the model's normalised input space (the space
        of `images`): None (default) the all-zero input, i.e. the data set's mean image under the
        usual mean/std normalisation; a float, the same value in every pixel and channel; or a tensor
        broadcastable to `images` ([3, H, W], [B, 3, H, W], [3, 1, 1] per channel, ...). A black
        image in pixel space is `(0 - mean) / std` per channel, not 0.
        `internal_batch_size`: path points times images per forward pass; None, `PATH_POINTS_PER_PASS`
        (8) points per image, so memory is that of 8 batches whatever `n_steps` is (all 32 points of 50
        images at once ran a 24 GiB machine out of memory). The maps do not depend on it.
        """
        check_counts(self.name, n_steps=n_steps)
        inputs = images.detach()
        if internal_batch_size is None:
            internal_batch_size = PATH_POINTS_PER_PASS * len(inputs)
        if baselines is None:
            start = torch.zeros_like(inputs)
        elif isinstance(baselines, torch.Tensor):
            start = torch.broadcast_to(baselines.to(inputs), inputs.shape).contiguous()
        else:
            start = torch.full_like(inputs, float(baselines))
        attributions = IntegratedGradients(model).attribute(
            inputs, baselines=start, target=targets,
            n_steps=n_steps, internal_batch_size=internal_batch_size,
        )
        return attributions.sum(1)


@register_method
class SmoothGrad(ExplainMethod):
    """Smilkov et al. 2017: mean saliency over `n_samples` noisy copies; the noise's standard
    deviation is `stdev` times each image's value range (the paper's noise level)."""

    name = "smoothgrad"
    reference = "Smilkov et al., SmoothGrad: removing noise by adding noise, 2017"

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
        check_counts(self.name, n_samples=n_samples)
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
