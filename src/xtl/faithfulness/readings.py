"""How a map is read before its pixels are ranked: the three readings of a signed map.

A signed method (AttnLRP, CP-LRP, LRP, integrated gradients, input x gradient, occlusion, SHAP,
LIME, DeepLift, full LRP: `ExplainMethod.signed`) says for each pixel whether it is evidence *for*
the explained class (positive) or *against* it (negative). Ranking such a map is a choice, and each
faithfulness metric answers a different question under each choice:

- `signed`: the map as it is. Most relevant first masks the strongest positive evidence first; least
  relevant first masks the strongest *negative* evidence first, which raises the class's
  probability. So insertion and negative perturbation reward a map for finding counter-evidence,
  which a method whose maps are non-negative (Grad-CAM, transformer attribution, rollout, saliency)
  cannot do: a signed map's lead there is partly its sign, not a better ranking of the evidence for
  the class.
- `positive`: the positive part, max(R, 0); the negative evidence ties with the irrelevant pixels.
  This is the reading that compares with a non-negative method on equal terms.
- `absolute`: |R|, "how much the pixel matters either way", the reading of most saliency-style
  benchmarks; masking strong negative evidence early then *helps* the class, so |R| can lose on
  deletion and positive perturbation while ranking importance well.

Every row of a faithfulness table says its reading; a method whose maps are non-negative is scored
once, in the reading `unsigned`. A reading is applied to the raw map on the method's own grid, before
it is upsampled to the input and normalised (`read_raw`).
"""

from __future__ import annotations

import torch

SIGNED_READINGS = ("signed", "positive", "absolute")
UNSIGNED = "unsigned"  # a non-negative method, or a reference map: scored as it is, once
READINGS = SIGNED_READINGS + (UNSIGNED,)
READING_WORDS = {"signed": "signed", "positive": "positive part", "absolute": "|R|", UNSIGNED: ""}


def readings_of(method: str) -> tuple[str, ...]:
    """The readings a method's maps are scored in: the three of a signed method, else `unsigned`."""
    from xtl.explain import METHODS

    spec = METHODS.get(method)
    return SIGNED_READINGS if spec is not None and spec.signed else (UNSIGNED,)


def read_raw(raw: torch.Tensor, reading: str) -> torch.Tensor:
    """The raw maps [B, h, w] in `reading`: as they are (signed, unsigned), max(R, 0) or |R|."""
    if reading == "positive":
        return raw.clamp(min=0)
    if reading == "absolute":
        return raw.abs()
    if reading in ("signed", UNSIGNED):
        return raw
    raise ValueError(f"unknown reading {reading!r}; known: {', '.join(READINGS)}")


def set_name(method: str, reading: str) -> str:
    """The name of one scored map set: the method for its signed (or only) reading, else method:reading
    (a folder name of the resume cache, and the key of `score_maps`)."""
    return method if reading in ("signed", UNSIGNED) else f"{method}:{reading}"


def split_name(name: str) -> tuple[str, str]:
    """`set_name`'s inverse: (method, reading)."""
    method, _, reading = name.partition(":")
    return method, reading or readings_of(method)[0]


def label(method: str, reading: str) -> str:
    """How tables and sentences name a map set: `attnlrp (signed)`, `attnlrp (|R|)`, `gradcam`."""
    words = READING_WORDS.get(reading, reading)
    return f"{method} ({words})" if words else method
