"""The served runs' models, loaded once: top-5 probabilities and heatmaps of one image per call."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from xtl.explain import explain
from xtl.explain.gallery import overlay, pick_misclassified
from xtl.explain.runner import applicable_methods
from xtl.inference import LoadedRun
from xtl.models import class_probabilities
from xtl.runs import RunDir, run_title

DEFAULT_METHODS = ("gradcam", "saliency", "transformer_attribution", "attnlrp", "attention_rollout")
DISPLAY_SIZE = 224  # overlays are drawn at this size whatever the model's input size
PREDICTED = "predicted"


@dataclass
class ModelAnswer:
    """One model's answer for one image: probabilities and a [H, W] map in [0, 1] per method."""

    probabilities: dict[str, float]
    target: str
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str = ""


@dataclass
class Answer:
    image: torch.Tensor  # uint8 [3, h, w], as uploaded
    models: list[ModelAnswer]


class ServedRun:
    """A run's evaluated model and test split; one explanation at a time (hooks mutate the model)."""

    def __init__(self, run: RunDir, methods: list[str] | None, device: str | None) -> None:
        self.run = run
        self.loaded = LoadedRun(run, "test", device)
        self.name = run.path.name
        self.title = run_title(self.name, self.loaded.spec.name)
        self.methods = applicable_methods(self.loaded.spec.family, list(methods or DEFAULT_METHODS))
        self.report = run.path.parent / "report" / "report.html"
        self._lock = threading.Lock()

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names

    def metrics(self) -> dict:
        return self.run.metrics() if self.run.file("metrics.json").is_file() else {}

    def misclassified(self, limit: int = 10) -> list[int]:
        return pick_misclassified(self.loaded.part.labels, self.loaded.probabilities, limit=limit)

    def answer(self, image: torch.Tensor, methods: list[str], target: str) -> ModelAnswer:
        e = self.loaded
        x = e.preprocess(image[None].to(e.device))
        with self._lock:
            # in the evaluation's precision: the answer for a test image is the one its gallery shows
            probs = class_probabilities(e.model, x)[0].cpu()
            index, note = self._target_index(probs, target)
            targets = torch.tensor([index], device=e.device)
            maps = {m: explain(e.model, x, targets, method=m, spec=e.spec).maps[0].cpu()
                    for m in methods if m in self.methods}
        top = probs.topk(min(5, len(probs)))
        return ModelAnswer(
            probabilities={self.class_names[int(c)]: float(p) for p, c in zip(*top)},
            target=self.class_names[index], maps=maps, note=note,
        )

    def _target_index(self, probs: torch.Tensor, target: str) -> tuple[int, str]:
        predicted = int(probs.argmax())
        if target == PREDICTED:
            return predicted, ""
        if target not in self.class_names:
            return predicted, f"{self.name} has no class '{target}': its predicted class is explained"
        return self.class_names.index(target), ""


class Explorer:
    """Every served run; `answer()` gives each model's answer for one image."""

    def __init__(self, runs: list[RunDir], methods: list[str] | None = None, device: str | None = None) -> None:
        self.runs = [ServedRun(run, methods, device) for run in runs]

    @property
    def methods(self) -> list[str]:
        """Every method offered by at least one run, in the order asked for."""
        seen = []
        for run in self.runs:
            seen += [m for m in run.methods if m not in seen]
        return seen

    @property
    def class_names(self) -> list[str]:
        names = []
        for run in self.runs:
            names += [c for c in run.class_names if c not in names]
        return names

    def answer(self, image: torch.Tensor, methods: list[str], target: str = PREDICTED) -> Answer:
        """Every run's answer. Each offered method is computed at most once, whatever the request
        repeats (`["saliency"] * 500` was 500 explanations): a request costs at most one explanation
        per offered method and run."""
        offered = [m for m in dict.fromkeys(methods) if m in self.methods]
        return Answer(image, [run.answer(image, offered, target) for run in self.runs])


def overlays(answer: Answer, model: int, alpha: float) -> list[tuple[np.ndarray, str]]:
    """(RGB uint8 image, method name) per map of one model, blended with opacity `alpha`."""
    result = []
    for method, heatmap in answer.models[model].maps.items():
        big = F.interpolate(heatmap[None, None], size=(DISPLAY_SIZE, DISPLAY_SIZE), mode="bilinear", align_corners=False)[0, 0]
        result.append(((overlay(answer.image, big, alpha) * 255).round().astype(np.uint8), method))
    return result


def display_image(image: torch.Tensor) -> np.ndarray:
    """The input as the models see its shape (square), large enough to look at."""
    big = F.interpolate(image[None].float(), size=(DISPLAY_SIZE, DISPLAY_SIZE), mode="bilinear", align_corners=False)
    return big[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()
