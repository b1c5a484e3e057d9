"""CAM (pytorch-grad-cam), input-gradient (Captum) and LRP (Zennit) explanations of CNNs and ViTs:
equal to the libraries, batched, with known answers, sensitive to the weights, conserving."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from conftest import CIFAR, DINOV2
from xtl.data import Preprocess, SplitSpec, load_split
from xtl.errors import XtlError
from xtl.explain import METHODS, explain
from xtl.models import ModelSpec, build_model, submodule

torch.set_num_threads(1)

CAM = ["gradcam", "gradcam++", "scorecam", "layercam", "eigencam"]
CAPTUM = ["saliency", "integrated_gradients", "smoothgrad"]
LRP = ["lrp_epsilon", "lrp_alpha_beta", "lrp_zplus"]
OURS = CAM + CAPTUM + LRP
FEW_STEPS = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 3},  # keeps CPU runs short
             "rise": {"n_masks": 20, "masks_per_eval": 8}}  # 8 + 8 + 4: the last chunk is short


def _build(name: str, pretrained: bool = False, size: int = 64) -> tuple[nn.Module, ModelSpec]:
    torch.manual_seed(0)
    model, spec = build_model(name, 10, pretrained=pretrained, input_size=size)
    return model.eval(), spec


def _custom_spec(name: str, target_layer: str, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> ModelSpec:
    return ModelSpec(name=name, family="cnn", builder=None, input_size=64, mean=mean, std=std, target_layer=target_layer)


def _cifar(n: int, size: int, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_split(str(CIFAR), SplitSpec("random", train_size=0, val_size=0, test_size=n, seed=0))["test"]
    return Preprocess(size, spec.mean, spec.std)(test.images), test.labels


def _no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def lite0():
    return _build("efficientnet_lite0", pretrained=True)


@pytest.fixture(scope="module")
def vit_tiny():
    return _build("timm:vit_tiny_patch16_224")


@pytest.fixture(scope="module")
def alexnet():
    return _build("alexnet")


# ----------------------------------------------------------------------------- equal to pytorch-grad-cam


@pytest.mark.parametrize("name, method", [
    ("resnet34", "gradcam"), ("resnet34", "gradcam++"), ("resnet34", "layercam"), ("resnet34", "eigencam"),
    ("timm:vit_tiny_patch16_224", "gradcam"), ("timm:vit_tiny_patch16_224", "gradcam++"),
    ("timm:vit_tiny_patch16_224", "layercam"), ("timm:vit_tiny_patch16_224", "eigencam"),
    ("timm:vit_tiny_patch16_224", "scorecam"),
])
def test_cam_maps_equal_pytorch_grad_cam(name, method):
    model, spec = _build(name, size=96 if "vit" in name else 64)  # the ViT: a 6x6 grid, not 14x14
    x = torch.randn(2, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([1, 7])
    ours = explain(model, x, targets, method).maps
    torch.testing.assert_close(ours, _library_maps(method, model, spec, x, targets), atol=1e-5, rtol=0)


def test_vit_cams_drop_every_prefix_token():
    """A timm ViT with 4 register tokens behind its CLS token: the library, told to drop 5, agrees."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=2, reg_tokens=4, num_classes=10)
    model.xtl_spec = ModelSpec(name="vit_with_registers", family="vit", builder=None, input_size=64,
                               classifier="head", target_layer="blocks.-1.norm1", patch_size=16)
    x = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([2, 3])
    for method in ("gradcam", "layercam"):
        theirs = _library_maps(method, model.eval(), model.xtl_spec, x, targets, prefix_tokens=5)
        torch.testing.assert_close(explain(model, x, targets, method).maps, theirs, atol=1e-5, rtol=0)


def _library_maps(method: str, model: nn.Module, spec: ModelSpec, x: torch.Tensor, targets: torch.Tensor,
                  prefix_tokens: int = 1) -> torch.Tensor:
    """pytorch-grad-cam's own maps; for ViTs with its documented recipe (drop the prefix, fold the grid)."""
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    library = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM, "eigencam": EigenCAM,
               "scorecam": ScoreCAM}[method]
    reshape = None
    if spec.family == "vit":
        grid = x.shape[-1] // spec.patch_size
        reshape = lambda t: t[:, prefix_tokens:].reshape(len(t), grid, grid, t.shape[2]).permute(0, 3, 1, 2)  # noqa: E731
    with library(model, target_layers=[submodule(model, spec.target_layer)], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return torch.from_numpy(maps)


# ----------------------------------------------------------------------------- batched = one by one


@pytest.mark.parametrize("method", OURS + ["rise"])
def test_a_batch_gives_the_maps_of_its_images_one_by_one(alexnet, vit_tiny, method):
    for model, spec in [alexnet] + ([vit_tiny] if "vit" in METHODS[method].families else []):
        x = torch.randn(3 if method != "scorecam" else 2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        targets = torch.tensor([0, 4, 9])[: len(x)]
        options = FEW_STEPS.get(method, {})
        batched = explain(model, x, targets, method, **options).raw
        single = torch.cat([explain(model, x[i : i + 1], targets[i : i + 1], method, **options).raw for i in range(len(x))])
        assert batched.abs().amax() > 0, f"{method} on {spec.name} gives an all-zero map"
        torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4 * batched.abs().amax().item())


def test_smoothgrad_is_reproducible_and_leaves_the_global_rng_alone(vit_tiny):
    model, _ = vit_tiny
    x = torch.randn(2, 3, 64, 64)
    state = torch.get_rng_state()
    first = explain(model, x, 3, "smoothgrad", n_samples=4).raw
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, explain(model, x, 3, "smoothgrad", n_samples=4).raw)
    assert not torch.equal(first, explain(model, x, 3, "smoothgrad", n_samples=4, seed=1).raw)


# ----------------------------------------------------------------------------- a known answer


class TopLeftNet(nn.Module):
    """Only the top-left quadrant can reach the output: the input is masked, then a bias-free net
    with 4x4 patch convolutions (so no feature outside the quadrant sees inside it)."""

    def __init__(self, size: int = 64) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, size, size)
        mask[..., : size // 2, : size // 2] = 1
        self.register_buffer("mask", mask)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 4, stride=4, bias=False), nn.ReLU(), nn.Conv2d(16, 32, 1, bias=False), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x * self.mask)).flatten(1))


@pytest.mark.parametrize("method", [m for m in OURS if METHODS[m].class_discriminative])
def test_class_discriminative_maps_sit_where_the_evidence_is(method):
    """Share of the positive part of the raw map (upsampled) inside the quadrant; for non-negative
    maps that is the normalised map's share, for signed LRP maps it leaves out the zero level."""
    torch.manual_seed(0)
    model = TopLeftNet().eval()
    model.xtl_spec = _custom_spec("top_left_net", "features.3")
    images, _ = _cifar(2, 64, model.xtl_spec)
    explanation = explain(model, images, None, method, **FEW_STEPS.get(method, {}))
    positive = F.interpolate(explanation.raw[:, None], size=(64, 64), mode="bilinear").squeeze(1).clamp_min(0)
    inside = positive[:, :32, :32].sum((1, 2)) / positive.sum((1, 2))
    assert (inside > 0.8).all(), inside


# ----------------------------------------------------------------------------- model randomisation (Adebayo et al.)


# Grad-CAM++ weights channels by positive gradients only, so its map leans towards "where the
# activations are strong", which a random network shares with a trained one on object-centred
# images: 0.47-0.52 over three re-initialisations (the other methods <= 0.35 here; SmoothGrad at
# its default 16 samples 0.43).
RANK_CORRELATION_LIMIT = {"gradcam++": 0.65}


def test_maps_change_when_the_weights_are_reinitialised():
    """Real ImageNet weights (classifier included) vs the same network re-initialised, on real
    CIFAR-10 images at 224 px (a 7x7 CAM grid), for the trained model's predicted classes: every
    gradient-based method must rank the pixels differently (mean Spearman rank correlation < 0.5;
    a flat map, which has no ranking, counts as 0)."""
    trained, spec = build_model("efficientnet_lite0", None, pretrained=True, input_size=224)
    trained.eval()
    random_init = _reinitialise(copy.deepcopy(trained))
    images, _ = _cifar(4, 224, spec)
    with torch.no_grad():
        targets = trained(images).argmax(1)
    correlations = {}
    for method in [m for m in OURS if METHODS[m].gradient_based]:
        a = explain(trained, images, targets, method, **FEW_STEPS.get(method, {})).maps.flatten(1)
        b = explain(random_init, images, targets, method, **FEW_STEPS.get(method, {})).maps.flatten(1)
        rhos = [spearmanr(a[i], b[i]).statistic if a[i].std() > 0 and b[i].std() > 0 else 0.0 for i in range(len(a))]
        correlations[method] = round(sum(rhos) / len(rhos), 3)
    assert all(rho < RANK_CORRELATION_LIMIT.get(m, 0.5) for m, rho in correlations.items()), correlations


def _reinitialise(model: nn.Module) -> nn.Module:
    """EfficientNet's own initialisation (the TF reference, timm's `_init_weight_goog`). With the
    package's PyTorch defaults the signal all but vanishes (CAM values ~1e-9) and the maps show
    only the zero padding's centre bias, which the object-centred CIFAR maps share."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0, (2 / fan_out) ** 0.5)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            nn.init.uniform_(module.weight, -(module.out_features**-0.5), module.out_features**-0.5)
            nn.init.zeros_(module.bias)
    return model


# ----------------------------------------------------------------------------- LRP conservation


class BiasFreeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 16, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.mark.parametrize("method, options, tolerance", [
    ("lrp_epsilon", {"epsilon": 1e-9}, 1e-4),  # z^B, gamma, epsilon: all conserve without biases
    ("lrp_zplus", {}, 1e-4),
])
def test_lrp_relevance_sums_to_the_target_logit(method, options, tolerance):
    torch.manual_seed(0)
    model = BiasFreeNet().eval()
    model.xtl_spec = _custom_spec("bias_free_net", "features.3", mean=(0, 0, 0), std=(1, 1, 1))
    images = torch.rand(3, 3, 32, 32)  # positive, inside the [0, 1] box
    explanation = explain(model, images, None, method, **options)  # the predicted class: a logit well away from 0
    with torch.no_grad():
        logits = model(images).gather(1, explanation.targets[:, None]).squeeze(1)
    torch.testing.assert_close(explanation.raw.sum((1, 2)), logits, rtol=tolerance, atol=0)


# ----------------------------------------------------------------------------- every method on the paper's models


def _check_runs(model: nn.Module, spec: ModelSpec, x: torch.Tensor, method: str, grid: tuple[int, int]) -> None:
    explanation = explain(model, x, None, method, **FEW_STEPS.get(method, {}))
    expected = grid if method in CAM else tuple(x.shape[-2:])
    assert explanation.raw.shape == (len(x), *expected), (method, explanation.raw.shape)
    assert explanation.maps.shape == (len(x), *x.shape[-2:])
    assert torch.isfinite(explanation.raw).all() and explanation.raw.dtype == torch.float32
    assert explanation.maps.min() >= 0 and explanation.maps.max() <= 1
    assert explanation.raw.device == x.device
    assert _no_hooks(model), f"{method} left hooks on {spec.name}"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet34", "alexnet"])
def test_every_method_runs_on_the_cnns(name, lite0, alexnet):
    model, spec = {"efficientnet_lite0": lite0, "alexnet": alexnet}.get(name) or _build(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = submodule(model, spec.target_layer)
        grid = tuple(_output_of(model, features, x).shape[-2:])
    assert min(grid) > 0
    if name == "alexnet":
        assert model.features(x).shape == (2, 256, 1, 1)  # 64 px is the smallest input AlexNet takes: 1 x 1 features
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in OURS:
        if method == "scorecam" and name != "alexnet":
            continue  # one forward per channel (512, 1280): covered on AlexNet and the ViTs
        _check_runs(model, spec, x, method, grid)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # LRP works on a copy
    assert not any(hasattr(m, "canonizer_sum") for m in model.modules())


def _output_of(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0]


def test_cam_and_gradient_methods_run_on_a_timm_vit(vit_tiny):
    model, spec = vit_tiny
    x = torch.randn(2, 3, 64, 64)
    for method in CAM + CAPTUM:
        _check_runs(model, spec, x, method, (4, 4))
    for method in LRP:
        with pytest.raises(XtlError, match="applies to CNNs; model .* is described as a VIT"):
            explain(model, x, None, method)


def test_cam_and_gradient_methods_run_on_dinov2_with_real_weights():
    """Batch of 2 at 224 px: a 16x16 grid. Score-CAM is left out here: 384 forward passes of
    ViT-S/14 at 224 px per image is minutes on one CPU thread (it runs on the tiny ViT)."""
    assert DINOV2.is_file()
    model, spec = _build("vit_s14_dinov2", pretrained=True, size=224)
    images, _ = _cifar(2, 224, spec)
    for method in CAM + CAPTUM:
        if method != "scorecam":
            _check_runs(model, spec, images, method, (16, 16))


def test_hooks_are_removed_when_a_method_fails(alexnet, vit_tiny):
    def fail(module, inputs, output):
        raise RuntimeError("failed inside the forward pass")

    for model, spec in (alexnet, vit_tiny):
        layer = submodule(model, spec.target_layer)
        head = submodule(model, spec.classifier)
        for method in OURS if spec.family == "cnn" else CAM + CAPTUM:
            handle = head.register_forward_hook(fail)  # after the target layer, while our hooks are on
            try:
                with pytest.raises(RuntimeError, match="failed inside"):
                    explain(model, torch.randn(1, 3, 64, 64), 0, method)
            finally:
                handle.remove()
            assert not (layer._forward_hooks or layer._backward_hooks or layer._forward_pre_hooks), method
            assert _no_hooks(model), method


def test_cam_and_gradient_methods_run_on_a_hugging_face_vit(tmp_path):
    """HF ViTForImageClassification: one prefix token (CLS), patch grid folded from the config."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(tmp_path / "tiny-vit")
    model, spec = build_model(f"hf:{tmp_path / 'tiny-vit'}", n_classes=3)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for method in ("gradcam", "layercam", "saliency", "transformer_attribution"):
        result = explain(model, images, method=method)
        expected = (2, 4, 4) if method in ("gradcam", "layercam", "transformer_attribution") else (2, 32, 32)
        assert result.raw.shape == expected, method
        assert torch.isfinite(result.maps).all() and result.maps.shape == (2, 32, 32)


def test_integrated_gradients_keeps_the_sign_and_takes_a_baseline():
    """IG's raw map is the channel sum with its sign: it sums to logit(image) - logit(baseline)
    (completeness), has pixels against the class as well as for it, and starts from the baseline
    given (zeros by default, a float, or a tensor broadcast to the images)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).double().eval()
    model.xtl_spec = _custom_spec("tiny_tanh", "0")
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([1, 3])
    assert METHODS["integrated_gradients"].signed
    per_channel = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(3, 1, 1)
    with torch.no_grad():
        logits = model(images)[range(2), targets]
    for baselines, start in ((None, torch.zeros_like(images)), (-0.7, torch.full_like(images, -0.7)),
                             (per_channel, per_channel.expand_as(images))):
        raw = METHODS["integrated_gradients"].attribute(model, images, targets, model.xtl_spec, n_steps=200,
                                                        baselines=baselines).double()
        assert raw.shape == (2, 16, 16)
        assert (raw < 0).any() and (raw > 0).any()  # evidence for and against: not |.|
        with torch.no_grad():
            expected = logits - model(start)[range(2), targets]
        torch.testing.assert_close(raw.sum((1, 2)), expected, rtol=1e-3, atol=1e-4)


def test_integrated_gradients_runs_its_path_a_few_points_per_pass_with_the_same_maps():
    """The default internal batch (8 path points per image per forward pass, not all n_steps at
    once: 32 points of 50 images ran a 24 GiB machine out of memory) gives the maps of one pass."""
    from xtl.explain.gradients import PATH_POINTS_PER_PASS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).double().eval()
    model.xtl_spec = _custom_spec("tiny_tanh", "0")
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 2, 3])
    seen = []
    hook = model[0].register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    try:
        chunked = METHODS["integrated_gradients"].attribute(model, images, targets, model.xtl_spec, n_steps=32)
    finally:
        hook.remove()
    assert max(seen) <= PATH_POINTS_PER_PASS * len(images) < 32 * len(images)
    whole = METHODS["integrated_gradients"].attribute(model, images, targets, model.xtl_spec, n_steps=32,
                                                      internal_batch_size=32 * len(images))
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-12)
