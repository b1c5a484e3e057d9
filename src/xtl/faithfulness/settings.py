"""The settings of a faithfulness job, checked once: `FaithfulnessSettings`.

    settings = FaithfulnessSettings(steps=10, baseline="road", grid="native", n_images=200)
    # a bad value raises XtlError naming the option, when the object is made

The orchestration (`xtl.faithfulness.runner`) passes this one object down instead of a dozen
arguments. `grid` may name a grid ("native", "model") that only a run or a model can resolve;
`with_grid` gives the settings with the cells per side that the images are scored on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from xtl.errors import XtlError
from xtl.explain import METHODS
from xtl.faithfulness.perturbation import NAMED_GRIDS, check_scoring_options

REFERENCES = ("random", "uniform")  # map sets scored beside every method, to compare against
# the baselines a job scores by default: a fixed fill (zero: the data set's mean colour) and ROAD's noisy
# linear imputation (Rong et al. 2022), whose filled pixels tell the model little about the mask
DEFAULT_BASELINES = ("zero", "road")
DEFAULT_METHODS = {  # methods=None: these, where the model's family has them
    "cnn": ["gradcam", "gradcam++", "layercam", "saliency", "integrated_gradients", "lrp_epsilon"],
    "vit": ["transformer_attribution", "attnlrp", "attention_rollout", "raw_attention", "gradcam", "saliency",
            "integrated_gradients"],
    "other": ["saliency", "integrated_gradients", "smoothgrad"],  # no layer or patch grid described
}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FaithfulnessSettings:
    """What the scores depend on (and what the resume cache is keyed on), and which images and methods.

    `steps`: each curve's steps (at most 1 / steps wide, `metrics.metric_fractions`); `baseline`: what
    masked pixels become (`BASELINES`); `grid`: cells per side of the perturbed grid, "common" (the
    default: one grid for every model, `runner.common_grid`), "native", "model" or None (pixels); `batch_size`: perturbed images
    per forward pass; `explain_batch_size`: images explained (and scored) at a time; `seed`: of the
    random maps and ROAD's noise; `n_images`: the first images of `split`; `methods`: the methods
    asked for (None: the family's defaults; the references are always scored); `method_options`:
    method -> keyword arguments of `explain`.
    """

    steps: int = 10
    baseline: str = "zero"
    grid: int | str | None = "common"
    batch_size: int = 64
    explain_batch_size: int = 8
    seed: int = 0
    n_images: int = 100
    split: str = "test"
    methods: tuple[str, ...] | None = None
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "method_options", dict(self.method_options or {}))
        self.check()

    def check(self) -> None:
        """One line naming the option for the first bad value."""
        if self.explain_batch_size < 1:
            raise XtlError(f"option --explain-batch-size must be at least 1, not {self.explain_batch_size}")
        if self.n_images < 1:
            raise XtlError(f"option --images must be at least 1, not {self.n_images}")
        if self.split not in SPLITS:
            raise XtlError(f"option --split must be train, val or test, not '{self.split}'")
        check_scoring_options(self.steps, self.batch_size, self.baseline, self.grid, native=True)
        check_methods(self.methods)

    def with_grid(self, cells: int | None) -> FaithfulnessSettings:
        """These settings with the grid resolved to cells per side (None: pixels)."""
        return replace(self, grid=cells)

    @property
    def cells(self) -> int | None:
        """The grid as cells per side; a named grid must have been resolved (`with_grid`) first."""
        if self.grid in NAMED_GRIDS:
            raise XtlError(f"option --grid {self.grid} names a grid only a run or a model resolves; "
                           "give the cells per side")
        return self.grid  # type: ignore[return-value]


def check_methods(methods) -> None:
    """Every method named must be an explanation method or a reference."""
    unknown = [m for m in methods or [] if m not in METHODS and m not in REFERENCES]
    if unknown:
        raise XtlError(f"option --methods: unknown method(s) {', '.join(unknown)}; "
                       f"known: {', '.join(sorted(METHODS))} (random and uniform are always scored)")

