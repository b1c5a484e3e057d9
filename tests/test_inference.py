"""A run loaded for inference (`xtl.inference.LoadedRun`): what explain, faithfulness and the app start from."""

from __future__ import annotations

import pytest
import torch

from xtl.evaluate import read_predictions
from xtl.explain.runner import RunExplainer
from xtl.inference import LoadedRun

from helpers import tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, cifar):
    return tiny_run(tmp_path_factory.mktemp("runs") / "cnn", cifar, "timm:resnet10t", 32)


def test_a_loaded_run_has_its_model_preprocessing_split_and_the_evaluations_probabilities(run, monkeypatch):
    import xtl.inference

    loaded = LoadedRun(run, "test", "cpu")
    assert not loaded.model.training and loaded.device == torch.device("cpu")
    assert loaded.class_names == run.class_names and loaded.split_name == "test"
    x = loaded.inputs([0, 1, 2])
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, loaded.preprocess(loaded.part.images[:3]))
    # the test split's probabilities are the evaluation's own, read back, not predicted again
    monkeypatch.setattr(xtl.inference, "predict", lambda *a, **k: pytest.fail("predicted again"))
    ids, _, probabilities = read_predictions(run)
    assert ids.tolist() == loaded.part.ids.tolist()
    assert torch.equal(loaded.probabilities, probabilities)


def test_another_split_is_predicted_once_and_only_when_asked(run, monkeypatch):
    import xtl.inference

    calls = []
    real = xtl.inference.predict
    monkeypatch.setattr(xtl.inference, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    loaded = LoadedRun(run, "val", "cpu")
    assert calls == []  # loading alone predicts nothing (faithfulness never needs the probabilities)
    assert loaded.probabilities.shape == (len(loaded.part), len(run.class_names))
    assert torch.allclose(loaded.probabilities.sum(1), torch.ones(len(loaded.part)), atol=1e-4)
    loaded.probabilities
    assert calls == [1]


def test_the_explainer_is_a_loaded_run_that_explains(run):
    explainer = RunExplainer(run, "test", "cpu")
    assert isinstance(explainer, LoadedRun)
    result = explainer.explain_positions([0, 1], "saliency")
    assert result.maps.shape == (2, 32, 32)
