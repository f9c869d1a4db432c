"""The method registry: a method defined anywhere registers itself and joins the results and the report."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from audio_residual.evaluation.report import write_report
from audio_residual.experiments.baselines import run_baselines
from audio_residual.layout import RunLayout
from audio_residual.methods import REGISTRY, Method, register
from audio_residual.workspace import Workspace


class MeanOfTraining:
    """Scores every clip by its cosine with each class's mean training embedding."""

    def __init__(self, centres: torch.Tensor):
        self.centres = torch.nn.functional.normalize(centres, dim=-1)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return emb @ self.centres.T


@pytest.fixture
def toy_method():
    @register
    class ClassMeans(Method):
        name = "class_means"

        def fit(self, ctx):
            emb, labels = ctx.embed(ctx.split.train), torch.as_tensor(ctx.labels(ctx.split.train))
            n_classes = len(ctx.ws.table.class_names)
            return MeanOfTraining(torch.stack([emb[labels == c].mean(0) for c in range(n_classes)]))

        def trainable_params(self, model) -> int:
            return model.centres.numel()

    yield ClassMeans
    del REGISTRY["class_means"]


def test_a_registered_method_appears_in_the_results_and_the_report(toy_method, synthetic_esc50, tmp_path):
    ws = Workspace.open(synthetic_esc50, model="tiny-random", cache_dir=tmp_path / "cache", device="cpu")
    store = run_baselines(ws, tmp_path, methods=("zeroshot", "class_means"), folds=(1, 2))
    rows = pd.read_csv(RunLayout(tmp_path).results)
    toy = rows[rows["method"] == "class_means"]
    assert sorted(toy["fold"]) == [1, 2] and toy["accuracy"].between(0, 1).all()
    assert (toy["trainable_params"] == 4 * ws.classifier.class_embeddings.shape[1]).all()
    table = write_report(store, tmp_path, ws.table.class_names)
    assert "| class_means |" in table and "class_means" in RunLayout(tmp_path).report.read_text()


def test_a_second_method_of_the_same_name_is_refused(toy_method):
    with pytest.raises(ValueError, match="already registered"):

        @register
        class Impostor(Method):
            name = "class_means"
