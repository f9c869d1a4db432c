"""λ training: it learns, resumes where it stopped, stops on NaN, and never looks at the test fold."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from audio_residual.layout import RunLayout
from audio_residual.training import TrainConfig, TrainingDiverged, train_residual_fold
from audio_residual.training.checkpoint import load_checkpoint, save_checkpoint
from audio_residual.training.trainer import run_key
from audio_residual.workspace import Workspace


@pytest.fixture(scope="module")
def experiment(synthetic_esc50, tmp_path_factory):
    return Workspace.open(synthetic_esc50, model="tiny-random", cache_dir=tmp_path_factory.mktemp("cache"), device="cpu")


def test_training_accuracy_rises_clearly_above_the_zero_shot_start(experiment):
    split = experiment.splits(val_fraction=0.2)[0]
    config = TrainConfig(granularity="head", epochs=8, lr=0.3, batch_size=12, schedule="constant")
    result = train_residual_fold(experiment, split, config)
    assert result.train_accuracy >= result.start_train_accuracy + 0.25
    full_rank = sum(h * d for h, d in [(2, 8), (2, 8), (2, 16), (4, 16), (4, 16), (4, 32)])  # Σ heads·d_head
    # Directions below float32's resolution (d_head · eps₃₂ · λ_max; a few per head on these tones) get no λ.
    assert 0.85 * full_rank <= result.trainable_params <= full_rank
    assert 1 <= result.best_epoch <= 8 and len(result.history) == 8
    assert result.test_logits.shape == (len(split.test), 4)


def test_interrupted_run_resumes_from_its_checkpoint(experiment, tmp_path, monkeypatch):
    split = experiment.splits(val_fraction=0.2)[1]
    config = TrainConfig(granularity="layer", epochs=3, lr=0.05, batch_size=16)
    full = train_residual_fold(experiment, split, config)

    import audio_residual.training.loop as loop

    real_save, calls = loop.save_checkpoint, []

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_residual_fold(experiment, split, config, out=tmp_path)
    files = RunLayout(tmp_path).fold(run_key(experiment, config), split.fold)
    _, info = load_checkpoint(files.checkpoint)
    assert info["epoch"] == 2
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = train_residual_fold(experiment, split, config, out=tmp_path)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    np.testing.assert_allclose(resumed.test_logits, full.test_logits, rtol=1e-4, atol=1e-4)
    assert json.loads(files.result.read_text())["fold"] == split.fold
    assert files.lambdas.exists()


def test_without_validation_the_last_epoch_is_kept_and_no_validation_accuracy_is_recorded(experiment, tmp_path):
    split = experiment.splits()[0]
    config = TrainConfig(granularity="layer", epochs=2, lr=0.05, batch_size=16, val_fraction=0.0)
    result = train_residual_fold(experiment, split, config, out=tmp_path)
    assert result.best_epoch == 2 and math.isnan(result.val_accuracy)
    _, info = load_checkpoint(RunLayout(tmp_path).fold(run_key(experiment, config), split.fold).checkpoint)
    assert info["best_epoch"] == 2 and info["best_val"] is None  # not an epoch number posing as an accuracy


def test_checkpoint_for_another_config_is_not_reused(experiment, tmp_path):
    split = experiment.splits(val_fraction=0.2)[2]
    train_residual_fold(experiment, split, TrainConfig(granularity="layer", epochs=1, batch_size=16), out=tmp_path)
    other = train_residual_fold(
        experiment, split, TrainConfig(granularity="layer", epochs=2, lr=0.02, batch_size=16), out=tmp_path
    )
    assert [h["epoch"] for h in other.history] == [1, 2]


def test_nan_loss_stops_with_a_clear_message(experiment):
    split = experiment.splits(val_fraction=0.2)[0]
    config = TrainConfig(granularity="layer", epochs=2, lr=1e30, batch_size=16, optimizer="adam", schedule="constant")
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train_residual_fold(experiment, split, config)


def test_test_fold_is_never_used_for_choices(experiment, monkeypatch):
    """Statistics see only training clips and model selection only validation clips."""
    split = experiment.splits(val_fraction=0.2)[3]
    import audio_residual.training.trainer as trainer

    seen_stats, seen_logits = [], []
    real_fit, real_logits = trainer.ResidualStatistics.fit, trainer.residual_logits
    monkeypatch.setattr(trainer.ResidualStatistics, "fit", lambda *a, **k: seen_stats.append(np.asarray(a[2])) or real_fit(*a, **k))
    monkeypatch.setattr(trainer, "residual_logits", lambda e, r, idx, b=32, p=None: seen_logits.append(np.asarray(idx)) or real_logits(e, r, idx, b, p))
    train_residual_fold(experiment, split, TrainConfig(granularity="layer", epochs=2, batch_size=16))
    assert set(seen_stats[0]) == set(split.train)
    test = set(split.test)
    assert sum(bool(set(idx) & test) for idx in seen_logits) == 1  # the final report only
    assert set(seen_logits[-1]) == test


def test_schedulefree_optimizer_trains(experiment):
    split = experiment.splits(val_fraction=0.2)[0]
    result = train_residual_fold(
        experiment, split, TrainConfig(granularity="layer", epochs=2, lr=0.05, batch_size=16, optimizer="schedulefree")
    )
    assert np.isfinite(result.history[-1]["train_loss"])


@pytest.mark.parametrize(
    "values, message",
    [({"optimizer": "sgd9"}, "optimizer"), ({"lr": 0}, "lr"), ({"granularity": "x"}, "granularity"), ({"lrr": 1}, "unknown")],
)
def test_bad_training_config_names_the_problem(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)


def test_checkpoint_round_trip_without_pickle(tmp_path):
    param = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "c.safetensors", {"opt": optimizer.state_dict()}, {"epoch": 3})
    states, info = load_checkpoint(path)
    fresh = torch.optim.AdamW([torch.nn.Parameter(param.detach().clone())], lr=0.1)
    fresh.load_state_dict(states["opt"])
    assert info == {"epoch": 3}
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
