"""Stage-prefix cache: same embeddings and logits as the full model, shared on disk, resumable."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.clap import stage_cache
from audio_residual.clap.encode import audio_embeddings, encode_from_stage, stage_input
from audio_residual.clap.loading import ModelSource
from audio_residual.clap.stage_cache import StagePrefix
from audio_residual.layout import FeatureStoreLayout
from audio_residual.residual.units import build_residual
from audio_residual.tasks import CLASSIFICATION
from audio_residual.training import TrainConfig, train_residual_fold, trainer
from audio_residual.workspace import Workspace


@pytest.fixture(scope="module")
def experiment(synthetic_esc50, tmp_path_factory):
    return Workspace.open(synthetic_esc50, ModelSource("tiny-random", device="cpu"), cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def trained_residual(experiment):
    """A ResiDual on stages 2–3 with λ far from 1, so a wrong path could not hide behind the identity."""
    rows = experiment.valid_indices()[:8]
    model = experiment.bundle.model
    stats = ResidualStatistics.fit(model, experiment.features.input_features, rows, batch_size=8)
    return build_residual(stats, granularity="head", stages=(2, 3), init="randn", seed=3)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_forward_from_a_stage_input_equals_the_full_forward(experiment, trained_residual, stage):
    model = experiment.bundle.model
    x, _ = experiment.batch(np.arange(6))
    with torch.no_grad():
        hidden = stage_input(model, x, stage)
        assert torch.equal(encode_from_stage(model, hidden, stage).embedding, audio_embeddings(model, x))
        if stage <= 2:
            with trained_residual.attached(model):
                edited = encode_from_stage(model, hidden, stage).embedding
                assert torch.equal(edited, audio_embeddings(model, x))
            assert not torch.allclose(edited, audio_embeddings(model, x))  # the λ hooks fired


def test_cached_prefix_encodes_the_same_tokens_pooled_output_and_embedding(experiment, trained_residual):
    prefix = StagePrefix(experiment, 2, batch_size=5)
    rows = experiment.valid_indices()[3:9]
    (_, hidden, _), = prefix.batches(rows, batch_size=len(rows))
    with torch.no_grad(), trained_residual.attached(experiment.bundle.model):
        full, cached = experiment.encode(*experiment.batch(rows)), prefix.encode(hidden)
        assert torch.equal(prefix.forward(hidden), cached.embedding)
        assert torch.equal(experiment.forward(*experiment.batch(rows)), full.embedding)
    assert cached.grid == full.grid
    for part in ("tokens", "pooled", "embedding"):
        assert torch.equal(getattr(cached, part), getattr(full, part)), part


def test_cached_prefix_gives_bit_identical_logits(experiment, trained_residual):
    prefix = StagePrefix(experiment, 2, batch_size=5)  # batches unlike the evaluation's
    ws = dataclasses.replace(experiment, batch_size=7)
    rows = ws.valid_indices()[3:20]
    for residual in (None, trained_residual):
        full = CLASSIFICATION.scores(ws, trainer.residual_embeddings(ws, residual, rows), rows)
        cached = CLASSIFICATION.scores(ws, trainer.residual_embeddings(ws, residual, rows, prefix=prefix), rows)
        assert torch.equal(full, cached)


def test_prefix_lives_beside_the_features_and_is_reused(experiment, monkeypatch):
    first = StagePrefix(experiment, 3)
    layout = first.layout()
    assert layout.root.parent == FeatureStoreLayout.holding(experiment.features.input_features.filename).root
    assert layout.hidden(3).exists() and layout.progress(3).exists()
    monkeypatch.setattr(stage_cache, "stage_input", lambda *a, **k: pytest.fail("recomputed a cached prefix"))
    again = StagePrefix(experiment, 3)
    np.testing.assert_array_equal(again.hidden, first.hidden)


def test_interrupted_prefix_resumes_from_the_recorded_row(experiment, monkeypatch):
    prefix = StagePrefix(experiment, 1, batch_size=8)
    meta_path = prefix.layout().progress(1)
    complete = np.array(prefix.hidden)
    meta = json.loads(meta_path.read_text())
    meta["rows_done"] = 16
    meta_path.write_text(json.dumps(meta))
    seen = []
    real = stage_cache.stage_input
    monkeypatch.setattr(stage_cache, "stage_input", lambda m, x, *a, **k: seen.append(len(x)) or real(m, x, *a, **k))
    resumed = StagePrefix(experiment, 1, batch_size=8)
    valid = len(experiment.valid_indices())
    assert sum(seen) == 1 + valid - 16  # one shape probe, then only the rows not done
    np.testing.assert_array_equal(resumed.hidden, complete)


def test_training_with_late_stages_uses_the_prefix_and_matches_the_full_path(experiment, monkeypatch):
    split = experiment.splits(val_fraction=0.2)[0]
    config = TrainConfig(granularity="head", stages=(3,), epochs=2, lr=0.3, batch_size=12, init="randn")
    patch_embed = experiment.bundle.model.audio_model.audio_encoder.patch_embed
    calls = []
    handle = patch_embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        StagePrefix(experiment, 3)  # cached beforehand, so training itself never runs the front end
        calls.clear()
        cached = train_residual_fold(experiment, split, config)
        assert calls == []
        monkeypatch.setattr(trainer, "first_stage", lambda stages: 0)  # the full model every step
        full = train_residual_fold(experiment, split, config)
        assert calls
    finally:
        handle.remove()
    assert cached.residual.lambdas.keys() == full.residual.lambdas.keys()
    assert all(torch.equal(cached.residual.lambdas[k], full.residual.lambdas[k]) for k in full.residual.lambdas)
    assert cached.test == full.test and cached.val_score == full.val_score
    assert [h["train_loss"] for h in cached.history] == [h["train_loss"] for h in full.history]


def test_sweep_runs_with_the_same_first_stage_share_prefix_and_statistics(experiment, tmp_path, monkeypatch):
    split = experiment.splits(val_fraction=0.2)[1]
    fits, real_fit = [], ResidualStatistics.fit
    monkeypatch.setattr(trainer.ResidualStatistics, "fit", lambda *a, **k: fits.append(k.get("forward")) or real_fit(*a, **k))
    for lr in (0.01, 0.1):  # two sweep points on one fold
        train_residual_fold(experiment, split, TrainConfig(stages=(3,), epochs=1, lr=lr, batch_size=12),
                            out=tmp_path)
    assert len(fits) == 1 and fits[0] is not None  # fitted once, from the cached stage-3 input
    stats = ResidualStatistics.load(next((tmp_path / "stats").glob("*.safetensors")))
    assert stats.stages() == [3]
