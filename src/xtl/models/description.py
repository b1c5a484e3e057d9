"""What describes a model, apart from how any registry builds it.

A `ModelDescription` is plain data: the family, the input size and normalisation, the classifier
and the layer CAM methods hook, the patch size and prefix tokens of a ViT. It travels with a model
as `model.xtl_spec` (like timm's `pretrained_cfg`), and `describe_model` reads it back:

1. the description passed in (`spec=`),
2. else the one attached to the model (`model.xtl_spec`: xtl's registry attaches it),
3. else what inspecting the model tells: timm ViTs and CNNs (from `pretrained_cfg`), torchvision
   classifiers (CNNs and `VisionTransformer`), Hugging Face image classifiers;
4. else a bare description (`family="other"`): methods that need nothing from it (saliency,
   integrated gradients, SmoothGrad, ...) still work, and those that need a layer or a patch grid
   say what to pass.

`resolve_data_config(model)` is the preprocessing twin of timm's function of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_VIT_TYPES = frozenset({"vit", "deit", "beit", "dinov2", "vit_msn", "vit_mae", "data2vec-vision"})

Family = Literal["cnn", "vit", "other"]


@dataclass(frozen=True)
class ModelDescription:
    """Plain data about a model that explanation and preprocessing read.

    `target_layer` and `classifier` are dotted paths ("layer4", "blocks.-1.norm1"; negative
    numbers index from the end); empty when unknown. `prefix_tokens` is the number of tokens
    before the patches (class and register tokens); None means "ask the model" (timm's
    `num_prefix_tokens`, else 1)."""

    name: str = "model"
    family: Family = "other"
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    classifier: str = ""
    target_layer: str = ""
    patch_size: int | None = None
    prefix_tokens: int | None = None

    def with_input_size(self, size: int | None):
        return self if size is None else replace(self, input_size=int(size))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "classifier": self.classifier,
            "target_layer": self.target_layer,
            "patch_size": self.patch_size,
            "weights": getattr(self, "weights", ""),
        }


def describe_model(model: nn.Module, spec: ModelDescription | None = None) -> ModelDescription:
    """The model's description: `spec`, else the attached one, else inspection (see the module)."""
    if spec is not None:
        return spec
    attached = getattr(model, "xtl_spec", None)
    if isinstance(attached, ModelDescription):
        return attached
    return inspect_model(model)


def attach_description(model: nn.Module, description: ModelDescription) -> nn.Module:
    """Attach `description` to `model` (as xtl's registry does), so that it travels with it."""
    model.xtl_spec = description
    return model


def inspect_model(model: nn.Module) -> ModelDescription:
    """Describe timm, torchvision and Hugging Face classifiers by their structure; anything else
    gets a bare description (family "cnn" when it has a convolution, else "other")."""
    from xtl.models.hf import HFClassifier

    if isinstance(model, HFClassifier):
        inner = _hf_description(model.hf)
        return replace(inner, target_layer=_prefixed("hf", inner.target_layer), classifier=_prefixed("hf", inner.classifier))
    if is_hf_model(model):
        return _hf_description(model)
    if type(model).__module__.startswith("timm.") and (
            hasattr(model, "pretrained_cfg") or (hasattr(model, "blocks") and hasattr(model, "patch_embed"))):
        # timm.create_model attaches pretrained_cfg; a ViT built by its class (VisionTransformer(...)) has none
        return _timm_description(model)
    if type(model).__module__.startswith("torchvision.models"):
        return _torchvision_description(model)
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return ModelDescription(name=type(model).__name__, family="cnn" if has_conv else "other",
                            classifier=last_linear(model))


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face `PreTrainedModel` (its forward returns an output object, not logits)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) is not None and type(model).__module__.startswith("transformers.")


def _prefixed(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if path else ""


def _timm_description(model: nn.Module) -> ModelDescription:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    name = cfg.get("architecture") or type(model).__name__
    size = cfg.get("input_size", (3, 224, 224))[-1]
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    classifier = cfg.get("classifier") or last_linear(model)
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        patch = model.patch_embed.patch_size
        img_size = getattr(model.patch_embed, "img_size", None)
        return ModelDescription(
            name=f"timm:{name}", family="vit", input_size=img_size[0] if img_size else size, mean=mean, std=std,
            classifier=classifier, target_layer="blocks.-1.norm1", patch_size=patch[0] if isinstance(patch, tuple) else patch,
            prefix_tokens=getattr(model, "num_prefix_tokens", 1),
        )
    feature_info = getattr(model, "feature_info", None)
    target = ""
    if feature_info:
        last = feature_info[-1] if isinstance(feature_info, list) else None
        target = last.get("module", "") if isinstance(last, dict) else ""
    return ModelDescription(name=f"timm:{name}", family="cnn", input_size=size, mean=mean, std=std,
                            classifier=classifier, target_layer=target or last_conv_parent(model))


def _torchvision_description(model: nn.Module) -> ModelDescription:
    from torchvision.models import VisionTransformer

    name = f"torchvision:{type(model).__name__}"
    if isinstance(model, VisionTransformer):
        return ModelDescription(name=name, family="vit", input_size=model.image_size, classifier="heads.head",
                                target_layer="encoder.layers.-1.ln_1", patch_size=model.patch_size, prefix_tokens=1)
    if type(model).__name__ in ("SwinTransformer", "MaxVit"):
        # windowed attention: neither a CNN's feature maps at the last convolution nor a ViT's class token
        return ModelDescription(name=name, family="other", classifier=last_linear(model))
    family = "cnn" if any(isinstance(m, nn.Conv2d) for m in model.modules()) else "other"
    return ModelDescription(name=name, family=family, classifier=last_linear(model),
                            target_layer=last_conv_parent(model) if family == "cnn" else "")


def _hf_description(model: nn.Module) -> ModelDescription:
    config = model.config
    is_vit = config.model_type in HF_VIT_TYPES
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    names = [n for n, _ in model.named_modules() if n.endswith("layernorm_before")]
    classifier = "classifier" if isinstance(getattr(model, "classifier", None), nn.Linear) else last_linear(model)
    name = f"hf:{getattr(config, 'name_or_path', '') or config.model_type}"
    if is_vit:
        return ModelDescription(name=name, family="vit", input_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                classifier=classifier, target_layer=names[-1] if names else "",
                                patch_size=getattr(config, "patch_size", None), prefix_tokens=1)
    family = "cnn" if any(isinstance(m, nn.Conv2d) for m in model.modules()) else "other"
    return ModelDescription(name=name, family=family, input_size=size, classifier=classifier,
                            target_layer=last_conv_parent(model) if family == "cnn" else "")


def last_linear(model: nn.Module) -> str:
    """Dotted path of the model's last Linear layer ("" when it has none)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else ""


def last_conv_parent(model: nn.Module) -> str:
    """The feature block that holds the last convolution (layer4, features, ...): Grad-CAM's
    usual layer for a CNN."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return ""
    return convs[-1].rsplit(".", 1)[0] if "." in convs[-1] else convs[-1]


def resolve_data_config(model: nn.Module | None = None, spec: ModelDescription | None = None) -> dict:
    """What a model expects as input, from its description (the twin of timm's
    `resolve_data_config`): `{"input_size": (3, S, S), "mean": ..., "std": ..., "interpolation":
    "bilinear"}`."""
    description = spec if spec is not None else describe_model(model)
    return {"input_size": (3, description.input_size, description.input_size), "mean": tuple(description.mean),
            "std": tuple(description.std), "interpolation": "bilinear"}


def preprocessing(model: nn.Module | None = None, spec: ModelDescription | None = None):
    """The model's preprocessing as a callable: uint8 images [B, 3, H, W] in, resized to the
    model's input size and normalised with its mean and std (`xtl.data.transforms.Preprocess`)."""
    from xtl.data.transforms import Preprocess

    config = resolve_data_config(model, spec)
    return Preprocess(size=config["input_size"][-1], mean=config["mean"], std=config["std"])
