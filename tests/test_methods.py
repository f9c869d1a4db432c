"""The registries: a method or a whole task defined anywhere registers itself and joins the study's results and
its report, with nothing outside its own module dispatching on its name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from audio_residual.clap.loading import ModelSource
from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.study import Study
from audio_residual.layout import RunLayout
from audio_residual.methods import REGISTRIES, Method, register
from audio_residual.tasks import TASKS, Task, register_task
from audio_residual.workspace import Workspace


@pytest.fixture(scope="module")
def ws(synthetic_esc50, tmp_path_factory):
    return Workspace.open(synthetic_esc50, ModelSource("tiny-random", device="cpu"),
                          cache_dir=tmp_path_factory.mktemp("cache"))


class Centroids:
    """Scores every clip by its cosine with each group's mean training embedding."""

    def __init__(self, centres: torch.Tensor):
        self.centres = F.normalize(centres, dim=-1)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return emb @ self.centres.T


def centroids(emb: torch.Tensor, groups: np.ndarray, n_groups: int) -> Centroids:
    groups = torch.as_tensor(groups)
    return Centroids(torch.stack([emb[groups == g].mean(0) for g in range(n_groups)]))


# ---- a method of an existing task ---------------------------------------------------------------------------


@pytest.fixture
def toy_method():
    @register
    class ClassMeans(Method):
        name = "class_means"

        def fit(self, ctx):
            return centroids(ctx.embed(ctx.split.train), ctx.labels(ctx.split.train), len(ctx.ws.table.class_names))

        def scores(self, model, ctx, rows):
            return model.logits(ctx.embed(rows))

        def trainable_params(self, model) -> int:
            return model.centres.numel()

    yield ClassMeans
    del REGISTRIES["classification"]["class_means"]


def test_a_registered_method_appears_in_the_results_and_the_report(toy_method, ws, tmp_path):
    study = Study(ws, tmp_path, StudyConfig(methods=("zeroshot", "class_means")))
    study.methods(folds=(1, 2))
    rows = pd.read_csv(RunLayout(tmp_path).results)
    toy = rows[rows["method"] == "class_means"]
    assert sorted(toy["fold"]) == [1, 2] and toy["accuracy"].between(0, 1).all()
    assert (toy["trainable_params"] == 4 * ws.classifier.class_embeddings.shape[1]).all()
    table = study.report()
    assert "| class_means |" in table and "class_means" in RunLayout(tmp_path).report.read_text()


def test_a_second_method_of_the_same_name_is_refused(toy_method):
    with pytest.raises(ValueError, match="already registered"):

        @register
        class Impostor(Method):
            name = "class_means"


# ---- a task of its own, with its methods ----------------------------------------------------------------------


class EvenLabel(Task):
    """Binary, on a labelled dataset: is a clip's class index even? Scores are (n, 2): odd, even."""

    name = "even_label"
    metrics = ("balanced_accuracy", "even_recall", "odd_recall")
    selection_metric = "balanced_accuracy"
    report_columns = (("even recall", "even_recall"),)
    baseline = "majority"

    def targets(self, ws, rows):
        return (ws.table.labels[np.asarray(rows, dtype=np.int64)] % 2 == 0).astype(np.int64)

    def evaluate(self, scores, targets):
        predicted, targets = torch.as_tensor(scores).argmax(1).numpy(), np.asarray(targets)
        odd, even = (float((predicted[targets == g] == g).mean()) for g in (0, 1))
        return {"balanced_accuracy": (odd + even) / 2, "even_recall": even, "odd_recall": odd}, {}


@pytest.fixture
def toy_task():
    task = register_task(EvenLabel())

    @register
    class Majority(Method):
        """The task's baseline: every clip gets the training split's more frequent answer."""

        name = "majority"
        tasks = by_default = ("even_label",)

        def fit(self, ctx):
            return int(np.bincount(ctx.task.targets(ctx.ws, ctx.split.train), minlength=2).argmax())

        def scores(self, model, ctx, rows):
            return F.one_hot(torch.full((len(rows),), model), 2).float()

        def trainable_params(self, model) -> int:
            return 0

    @register
    class EvenCentroid(Method):
        name = "even_centroid"
        tasks = by_default = ("even_label",)

        def fit(self, ctx):
            return centroids(ctx.embed(ctx.split.train), ctx.task.targets(ctx.ws, ctx.split.train), 2)

        def scores(self, model, ctx, rows):
            return model.logits(ctx.embed(rows))

        def trainable_params(self, model) -> int:
            return model.centres.numel()

    yield task
    del TASKS["even_label"], REGISTRIES["even_label"]


def test_a_registered_task_runs_through_the_study_into_its_results_and_report(toy_task, ws, tmp_path):
    study = Study(ws, tmp_path, StudyConfig(task="even_label"))
    assert study.config.methods == ("majority", "even_centroid")  # the task's own defaults
    study.methods(folds=(1, 2))
    rows = pd.read_csv(RunLayout(tmp_path).results_for("even_label"))
    assert not RunLayout(tmp_path).results.exists()  # classification's table is not this task's
    assert sorted(zip(rows["method"], rows["fold"], strict=True)) == [
        ("even_centroid", 1), ("even_centroid", 2), ("majority", 1), ("majority", 2)]  # fmt: skip
    assert set(EvenLabel.metrics) <= set(rows.columns) and "accuracy" not in rows.columns
    majority = rows[rows["method"] == "majority"]
    assert (majority["balanced_accuracy"] == 0.5).all() and (majority["trainable_params"] == 0).all()
    # the toy method's row is the task's metric of its scores, recomputed here from the split
    dim = ws.classifier.class_embeddings.shape[1]
    for fold in (1, 2):
        split = ws.split(fold, val_fraction=0.1)
        model = centroids(ws.embeddings(split.train), toy_task.targets(ws, split.train), 2)
        metrics, _ = toy_task.evaluate(model.logits(ws.embeddings(split.test)), toy_task.targets(ws, split.test))
        row = rows[(rows["method"] == "even_centroid") & (rows["fold"] == fold)].iloc[0]
        assert row["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
        assert row["even_recall"] == pytest.approx(metrics["even_recall"]) and row["trainable_params"] == 2 * dim
    table = study.report()
    assert "balanced_accuracy (mean ± std)" in table and "even recall" in table and "p vs majority" in table
    assert "| even_centroid |" in table and "| majority |" in table
    assert table in RunLayout(tmp_path).report.read_text()
