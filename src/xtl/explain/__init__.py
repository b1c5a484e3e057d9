"""Explanations: one `explain()` for any PyTorch image classifier; one module per method family.

    explanation = explain(model, images, targets=None, method="gradcam")

`model` is any `nn.Module` returning logits (or a Hugging Face image classifier); `images` a
preprocessed batch [B, 3, H, W] (`xtl.models.preprocessing(model)` makes one from uint8 images).
What a method needs to know about the model (its CAM layer, patch grid, normalisation) comes from
`xtl.models.describe_model`: `spec=`, the description attached to the model, or inspection of
timm, torchvision and Hugging Face models. Methods register themselves by name in `METHODS`;
`xtl explain --list-methods` and `help(xtl.explain.explain)` list them with their options.
"""

from __future__ import annotations

import torch
from torch import nn

from xtl.errors import XtlError
from xtl.explain.base import (
    METHODS,
    ExplainMethod,
    Explanation,
    RowWise,
    Target,
    as_batch,
    get_method,
    logits_model,
    per_image_targets,
    prepare_images,
    register_method,
    resolve_targets,
    upsample_and_normalise,
)
from xtl.explain.drawing import overlay, save_overlay
from xtl.models import ModelDescription, describe_model

__all__ = ["METHODS", "ExplainMethod", "Explanation", "describe_methods", "explain", "methods_for", "overlay",
           "register_method", "save_overlay"]

_FAMILY_WORDS = {"cnn": "CNNs", "vit": "ViTs (timm, torchvision and Hugging Face VisionTransformers)", "other": "any model"}


def explain(
    model: nn.Module,
    images: torch.Tensor,
    targets: Target = None,
    method: str = "gradcam",
    spec: ModelDescription | None = None,
    **options,
) -> Explanation:
    """Explain `model`'s output for `targets` on a preprocessed batch `images` with `method`.

    Args:
        model: any classifier returning logits [B, classes] (xtl's registry, timm, torchvision, your
            own `nn.Module`), or a Hugging Face image classifier (its `.logits` are read).
        images: preprocessed float images [B, 3, H, W] on the model's device (or one [3, H, W]);
            another float dtype (float64, bf16) is converted to the model's (float32) for the call;
            images on another device are refused in one line naming both devices; images that look
            like raw pixels (values above 10) get a warning (`xtl.models.preprocessing(model)` makes
            preprocessed ones from uint8 images).
        targets: what to explain: None (each image's predicted class), an int (one class for all),
            a list or int tensor (one class per image), or a callable on the model output returning
            one number per image (e.g. ``lambda logits: logits.softmax(1)[:, 3]``; gradient and
            CAM methods only). pytorch-grad-cam's targets work too: ``[ClassifierOutputTarget(3)]``
            (class 3; one per image or one for all) and other callables on one image's output [C]
            (gradient and CAM methods; a different one per image explains the images one by one).
        method: a name from `METHODS` (the list below).
        spec: the model's description (`xtl.models.ModelDescription`), when neither the attached
            one nor inspection gives what the method needs.
        **options: the method's own options (below); an unknown one is refused with the known
            ones named. CAM methods take `target_layer` (a module such as ``model.layer4`` or a
            dotted path such as ``"layer4"``) and `reshape_transform` (tokens [B, N, C] -> [B, C,
            h, w] for a token model, as in pytorch-grad-cam).

    Returns:
        An `Explanation`: `raw` [B, h, w] on the method's grid, `maps` [B, H, W] in [0, 1], the
        `targets` explained, whether the raw maps are `signed`, and a uint8 copy of the `images` to
        draw on (`Explanation.plot()`; a notebook shows the overlays by itself).

    The model is put in eval mode for the call and restored after, also on error.
    """
    explainer = get_method(method)
    explainer.check_options(options)
    description = describe_model(model, spec)
    if description.family not in explainer.families:
        applies = " and ".join(_FAMILY_WORDS[f] for f in sorted(explainer.families))
        described = f"a {description.family.upper()}" if description.family != "other" else "neither a CNN nor a ViT"
        raise XtlError(f"method {method} applies to {applies}; model {description.name} is described as {described} "
                       "(pass spec=ModelDescription(family=...) if that is wrong)")
    images = prepare_images(model, as_batch(images))
    per_image = per_image_targets(targets, images.shape[0])
    was_training = model.training
    model.eval()
    try:
        classifier = logits_model(model)
        if per_image is not None and all(isinstance(t, int) for t in per_image):
            per_image, targets = None, per_image  # pytorch-grad-cam's ClassifierOutputTarget(c): class c
        if per_image is None:
            scored, target_tensor = resolve_targets(classifier, images, targets, explainer, description)
            raw = explainer.attribute(scored, images, target_tensor, description, **options).detach().float()
        elif all(t is per_image[0] for t in per_image):  # one callable for every image: one call
            scored, target_tensor = resolve_targets(classifier, images, RowWise(per_image[0]), explainer, description)
            raw = explainer.attribute(scored, images, target_tensor, description, **options).detach().float()
        else:  # a target per image: each image explained on its own, its target read on every row it makes
            parts, classes = [], []
            for i, target in enumerate(per_image):
                one = images[i:i + 1]
                scored, target_one = resolve_targets(classifier, one, target if isinstance(target, int) else RowWise(target),
                                                     explainer, description)
                parts.append(explainer.attribute(scored, one, target_one, description, **options).detach().float())
                classes.append(target_one)
            raw, target_tensor = torch.cat(parts), torch.cat(classes)
    finally:
        model.train(was_training)
    return Explanation(method=method, targets=target_tensor, raw=raw, maps=upsample_and_normalise(raw, images.shape[-2:]),
                       signed=explainer.signed, inputs=images.detach(), description=description)


def methods_for(family: str | nn.Module | ModelDescription) -> list[str]:
    """The methods that apply to a model family: "cnn", "vit" or "other", a model (described as
    `explain()` describes it: `xtl.models.describe_model`) or its `ModelDescription`."""
    if isinstance(family, nn.Module):
        family = describe_model(family).family
    elif isinstance(family, ModelDescription):
        family = family.family
    if family not in _FAMILY_WORDS:
        raise XtlError(f"methods_for(): family must be cnn, vit or other, a model or a ModelDescription, not {family!r}")
    return sorted(name for name, m in METHODS.items() if family in m.families)


def describe_methods() -> str:
    """Every registered method: families, sign, what it computes, options with defaults, reference."""
    return "\n\n".join(METHODS[name].summary() for name in sorted(METHODS))


from xtl.explain import propagation  # noqa: F401,E402
from xtl.explain import transformer_attribution  # noqa: F401,E402
from xtl.explain import attnlrp, cam, cnn_lrp, gradients, occlusion, shapley  # noqa: F401,E402

explain.__doc__ += "\n    Methods:\n\n" + "\n\n".join(  # type: ignore[operator]
    "        " + METHODS[name].summary() for name in sorted(METHODS)) + "\n"
