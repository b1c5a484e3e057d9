"""Sanity checks that gate the claims: does a method's map depend on the model and on the class?

    randomisation       Adebayo et al. 2018: cascading model-parameter randomisation, every layer group
                        from the head down to the input (`xtl.analysis.metrics.randomisation_similarity`,
                        Quantus's MPRT); the Spearman correlation of the trained model's map with the
                        map once every group is randomised
    data randomisation  Adebayo et al. 2018: the map of the model against the map of the same model
                        fine-tuned with the same recipe on shuffled labels, for the same class and images
                        (Spearman, maps made absolute): a map that a model which learnt nothing of the
                        labels draws alike does not explain what the model learnt; run where a
                        shuffled-labels model exists (`xtl run` key `data_randomisation`)
    class sensitivity   the map of the predicted class against the map of the least likely class of the
                        same image (Spearman, maps made absolute as MPRT makes them): a map that barely
                        changes with the class does not explain the class (Sixt et al. 2020 for
                        gradient-based methods; Rebuffi et al. 2020)

A method passes (`status`) when both checks ran on at least `MIN_IMAGES` images, every layer group
was randomised, and both mean correlations are below `DEPENDS` (and data randomisation's too, where
it ran: a run without it says so in its settings and report) (0.5, the threshold the randomisation
check used before any claim was gated on it). A method that fails, or was not checked, is flagged in
every table and left out of every verdict (`xtl.analysis.claims.combine`).
"""

from __future__ import annotations

import torch

DEPENDS = 0.5
MIN_IMAGES = 64


def class_sensitivity(model, spec, images: torch.Tensor, probabilities: torch.Tensor, method: str,
                      **options) -> torch.Tensor:
    """Spearman correlation per image [B] of the absolute maps of the most and the least likely class
    (`probabilities` [B, classes], the model's own). Where exactly one of the two maps is constant (a
    Grad-CAM with no positive evidence for the least likely class) the maps share no ranking: 0; NaN
    where both are."""
    from xtl.explain import explain

    p = probabilities.to(images.device)
    top = explain(model, images, p.argmax(1), method, spec=spec, **options).maps
    low = explain(model, images, p.argmin(1), method, spec=spec, **options).maps
    return _rank_similarity(top, low)


def _rank_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman per row of two absolute maps [B, ...]; 0 where exactly one of the two is constant
    (they share no ranking), NaN where both are."""
    from xtl.analysis.metrics import spearman

    a, b = a.flatten(1).abs().double().cpu(), b.flatten(1).abs().double().cpu()
    flat_a, flat_b = (a == a[:, :1]).all(1), (b == b[:, :1]).all(1)
    values = spearman(a, b)
    return torch.where(flat_a ^ flat_b, torch.zeros_like(values), values)


def data_randomisation(model, shuffled, spec, images: torch.Tensor, targets: torch.Tensor, method: str,
                       **options) -> torch.Tensor:
    """Spearman correlation per image [B] of the absolute maps of `model` and of `shuffled` (the same
    architecture fine-tuned on shuffled labels) for the same `targets`; 0 where exactly one map is
    constant, NaN where both are."""
    from xtl.explain import explain

    mine = explain(model, images, targets, method, spec=spec, **options).maps
    theirs = explain(shuffled, images, targets, method, spec=spec, **options).maps
    return _rank_similarity(mine, theirs)


def status(randomised: dict | None, sensitivity: dict | None, min_images: int = MIN_IMAGES,
           data: dict | None = None) -> str:
    """"passes", or why a method does not: `randomised` {spearman, n, complete (every layer group),
    undefined}, `sensitivity` {mean, n} (None: not checked); `data` {mean, n}: data randomisation,
    where it ran (None: it did not, which does not stop a method passing)."""
    if randomised is None or sensitivity is None:
        missing = [name for name, found in (("randomisation", randomised), ("class sensitivity", sensitivity))
                   if found is None]
        return f"not checked ({' and '.join(missing)})"
    gone = randomised["spearman"] != randomised["spearman"] and randomised.get("undefined") == randomised["n"] > 0
    if not randomised.get("complete"):
        return "not checked (randomisation stopped before the input)"
    if randomised["spearman"] == randomised["spearman"] and randomised["spearman"] >= DEPENDS:
        return f"fails randomisation (Spearman {randomised['spearman']:.2f} with every layer randomised)"
    if sensitivity["mean"] == sensitivity["mean"] and sensitivity["mean"] >= DEPENDS:
        return f"fails class sensitivity (Spearman {sensitivity['mean']:.2f} with the least likely class's map)"
    if min(randomised["n"], sensitivity["n"]) < min_images:
        return f"not checked on {min_images} images ({min(randomised['n'], sensitivity['n'])})"
    if randomised["spearman"] != randomised["spearman"] and not gone:
        return "not checked (randomisation undefined)"
    if sensitivity["mean"] != sensitivity["mean"]:
        return "not checked (class sensitivity undefined)"
    if data is not None:
        if data["mean"] == data["mean"] and data["mean"] >= DEPENDS:
            return f"fails data randomisation (Spearman {data['mean']:.2f} with the shuffled-labels model's map)"
        if data["n"] < min_images:
            return f"not checked on {min_images} images ({data['n']}, data randomisation)"
        if data["mean"] != data["mean"]:
            return "not checked (data randomisation undefined)"
    return "passes"
