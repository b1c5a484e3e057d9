"""Single-token peaks in a ViT's stored maps: a sign of the high-norm-token artefact.

ViTs trained without register tokens repurpose a few low-information patch tokens (often in the
background or at the border) as global stores; these tokens get very large norms and soak up
attention (Darcet et al., "Vision Transformers Need Registers", ICLR 2024). Attention rollout and
transformer attribution then put much of a map's mass on one such token.

What is counted, on the raw token-grid map [h, w] of each image (negative values set to 0):
a map *peaks on a single token* when its largest cell holds more than `MASS_SHARE` (a third) of
the map's total mass AND that cell either lies on the grid's border or is isolated: each of its
(up to 8) neighbours holds less than `ISOLATED` (half) of the peak's value. A map with no mass is
not counted as peaked. The report mentions it when at least `NOTABLE_SHARE` of the images and at
least `NOTABLE_MIN` images peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xtl.explain.runner import read_stored_maps
from xtl.runs import RunDir

ARTEFACT_METHODS = ("attention_rollout", "transformer_attribution")
MASS_SHARE = 1 / 3
ISOLATED = 0.5
NOTABLE_SHARE = 0.1
NOTABLE_MIN = 2


@dataclass(frozen=True)
class PeakCount:
    method: str
    peaked: int  # maps that peak on a single token
    of: int  # maps read

    @property
    def notable(self) -> bool:
        return self.of > 0 and self.peaked >= NOTABLE_MIN and self.peaked >= NOTABLE_SHARE * self.of


def single_token_peaks(maps: np.ndarray, mass_share: float = MASS_SHARE, isolated: float = ISOLATED) -> np.ndarray:
    """For raw maps [N, h, w], whether each peaks on a single token (see the module's docstring)."""
    maps = np.clip(np.asarray(maps, dtype=np.float64), 0.0, None)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, h, w], not {maps.shape}")
    n, h, w = maps.shape
    flags = np.zeros(n, dtype=bool)
    for k in range(n):
        m = maps[k]
        total = m.sum()
        if not total > 0:
            continue
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        peak = m[r, c]
        if peak <= mass_share * total:
            continue
        border = r in (0, h - 1) or c in (0, w - 1)
        window = m[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].copy()
        window[r - max(r - 1, 0), c - max(c - 1, 0)] = -np.inf  # the peak itself
        alone = window.size == 1 or bool(np.all(window < isolated * peak))
        flags[k] = border or alone
    return flags


def peak_counts(run: RunDir, methods: tuple[str, ...] = ARTEFACT_METHODS) -> list[PeakCount]:
    """Single-token peaks in each of `methods`' stored maps of the run (methods without maps are left out)."""
    counts = []
    for method in methods:
        stored = read_stored_maps(run, method)
        maps = stored[0].double().numpy() if stored is not None else None
        if maps is None or maps.ndim != 3 or not len(maps):
            continue
        counts.append(PeakCount(method, int(single_token_peaks(maps).sum()), len(maps)))
    return counts
