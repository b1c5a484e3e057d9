"""Faithfulness of explanations: does the model's output follow the pixels a map calls relevant?

    scores = score(model, images, labels, maps)      # maps: explain(...).maps, [B, H, W]
    scores.curves["deletion"].auc                    # [B], and .values [B, F] per image

Metrics (`METRICS`, registered as data): deletion and insertion (Petsiuk et al. 2018), positive
and negative perturbation (Chefer et al. 2021); masked pixels take a baseline value
(`BASELINES`: zero, mean, blur, or road: ROAD's noisy linear imputation, `road_fill`), pixel by pixel
or, with `grid=G`, cell by cell of a G x G grid. Run level: `faithfulness_run`, `faithfulness_imagenet`
(`runner`), with one checked `FaithfulnessSettings` (`settings`); their scores and files (`results`),
the resume cache (`cache`) and the tables (`tables`) each have their own module.
"""

from xtl.faithfulness.metrics import METRICS, Curve, Metric, register_metric
from xtl.faithfulness.perturbation import (
    BASELINES,
    Scores,
    baseline_inputs,
    cell_maps,
    perturbation_masks,
    random_maps,
    relevance_ranks,
    road_fill,
    road_noise,
    score,
    score_maps,
    uniform_maps,
)
from xtl.faithfulness.results import MethodScores, ModelScores, read_rows
from xtl.faithfulness.runner import faithfulness_imagenet, faithfulness_run, score_model
from xtl.faithfulness.settings import DEFAULT_METHODS, REFERENCES, FaithfulnessSettings
from xtl.faithfulness.tables import faithfulness_table, markdown_table

__all__ = [
    "BASELINES", "DEFAULT_METHODS", "METRICS", "REFERENCES", "Curve", "FaithfulnessSettings", "Metric",
    "MethodScores", "ModelScores", "Scores", "baseline_inputs",
    "cell_maps", "faithfulness_imagenet", "faithfulness_run", "faithfulness_table", "markdown_table",
    "perturbation_masks", "random_maps", "read_rows", "register_metric", "relevance_ranks", "road_fill", "road_noise",
    "score", "score_maps", "score_model",
    "uniform_maps",
]
