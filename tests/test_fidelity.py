"""What a reported number may depend on: nested selection, keyed results, content-checked features."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from safetensors.torch import load_file

from audio_residual.clap.loading import ModelSource
from audio_residual.cli import main
from audio_residual.data_processing import make_synthetic_esc50
from audio_residual.data_processing.audio_config import AudioConfig
from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.study import run_study
from audio_residual.workspace import Workspace

GRID = {"granularity": ["layer"], "lr": [0.02, 0.4], "epochs": [2], "fold": [1, 2, 3]}
BASE = {"batch_size": 16, "val_fraction": 0.3, "schedule": "constant"}
NOT_TEST = ["best_epoch", "start_train_accuracy", "train_accuracy", "val_accuracy", "trainable_params"]
METHODS = ("zeroshot", "linear_probe", "contrastive_adapter", "residual", "residual_coarse")


def _study(data, out, cache):
    ws = Workspace.open(data, ModelSource("tiny-random", device="cpu"), cache_dir=cache)
    outcome = run_study(ws, out, StudyConfig(methods=METHODS, grid=GRID, base=BASE),
                        analysis_options={"pattern_cap": 16, "ablation_max_clips": 4})
    return ws, outcome


def _chosen(outcome, fold: int) -> dict:
    """The grid options ResiDual chose for `fold` on that fold's own validation split."""
    frame = outcome.store.frame
    return json.loads(frame[(frame["method"] == "residual") & (frame["fold"] == fold)]["chosen"].item())


def _overwrite_with_noise(data, fold: int) -> None:
    meta = pd.read_csv(data / "meta" / "esc50.csv")
    rng = np.random.default_rng(7)
    for name in meta.loc[meta["fold"] == fold, "filename"]:
        path = data / "audio" / name
        audio, rate = sf.read(path)
        sf.write(path, (0.3 * rng.standard_normal(audio.shape)).astype(np.float32), rate, subtype="FLOAT")


@pytest.mark.usefixtures("single_thread")
@pytest.mark.slow  # the whole study, twice
def test_nothing_of_fold_k_chooses_what_is_reported_on_fold_k(tmp_path):
    """Fold 1's test audio replaced by noise: fold 1's configuration, λ and non-test numbers do not move."""
    data = make_synthetic_esc50(tmp_path / "data", n_classes=3, clips_per_class=10, seed=3)
    exp_a, first = _study(data, tmp_path / "a", tmp_path / "cache")
    sweep_a = pd.read_csv(tmp_path / "a" / "sweep.csv")
    _overwrite_with_noise(data, fold=1)
    exp_b, second = _study(data, tmp_path / "b", tmp_path / "cache")
    sweep_b = pd.read_csv(tmp_path / "b" / "sweep.csv")

    assert _chosen(first, 1) == _chosen(second, 1)
    fold1 = (sweep_a["fold"] == 1).to_numpy()
    pd.testing.assert_frame_equal(sweep_a.loc[fold1, NOT_TEST], sweep_b.loc[fold1, NOT_TEST])
    # The other folds' validation sets hold fold 1's clips: their numbers are allowed to move, and do.
    assert not sweep_a.loc[~fold1, "val_accuracy"].equals(sweep_b.loc[~fold1, "val_accuracy"]) or not (
        sweep_a.loc[~fold1, "train_accuracy"].equals(sweep_b.loc[~fold1, "train_accuracy"])
    )

    from audio_residual.layout import RunLayout
    from audio_residual.training.trainer import TrainConfig, run_key

    config = TrainConfig.from_dict({**BASE, **_chosen(first, 1)})
    lam_a = load_file(RunLayout(tmp_path / "a").fold(run_key(exp_a, config), 1).lambdas)
    lam_b = load_file(RunLayout(tmp_path / "b").fold(run_key(exp_b, config), 1).lambdas)
    assert lam_a.keys() == lam_b.keys() and all(lam_a[k].equal(lam_b[k]) for k in lam_a)

    every = pd.read_csv(tmp_path / "a" / "results.csv")
    assert sorted(every.loc[every["method"] == "residual", "fold"]) == [1, 2, 3]  # the grid's folds only
    assert sorted(every.loc[every["method"] == "zeroshot", "fold"]) == [1, 2, 3, 4, 5]
    rows_a = every.query("method == 'residual' and fold == 1")
    rows_b = pd.read_csv(tmp_path / "b" / "results.csv").query("method == 'residual' and fold == 1")
    assert rows_a["val_score"].item() == rows_b["val_score"].item()
    assert rows_a["best_epoch"].item() == rows_b["best_epoch"].item()


@pytest.mark.usefixtures("single_thread")
def test_a_rerun_with_other_options_never_reports_the_old_rows(synthetic_esc50, tmp_path):
    common = ["--data", str(synthetic_esc50), "--model", "tiny-random", "--cache", str(tmp_path / "cache"),
              "--device", "cpu", "--out", str(tmp_path / "out"), "--granularity", "layer", "--stages", "3",
              "--epochs", "1", "--folds", "1"]  # fmt: skip
    assert main(["train-residual", *common, "--lr", "0.001"]) == 0
    assert main(["train-residual", *common, "--lr", "0.5"]) == 0
    rows = pd.read_csv(tmp_path / "out" / "results.csv")
    assert (rows["method"] == "zeroshot").sum() == 1  # the baseline both runs add: the same key, stored once
    rows = rows[rows["method"] != "zeroshot"]
    assert len(rows) == 2 and rows["key"].nunique() == 2  # the second run computed its own row
    table = (tmp_path / "out" / "table.md").read_text()
    second = rows.iloc[1]
    assert table.count("| residual |") == 1 and f"| residual | {second['accuracy']:.4f}" in table
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 2
    assert main(["train-residual", *common, "--lr", "0.001"]) == 0  # back to the first options: reused
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 3


def test_cached_features_follow_content_not_mtime(tmp_path):
    data = make_synthetic_esc50(tmp_path / "data", n_classes=2, clips_per_class=5, seed=1)

    def open_(check: str) -> Workspace:
        return Workspace.open(data, ModelSource("tiny-random", device="cpu"), AudioConfig(cache_check=check),
                              cache_dir=tmp_path / check)

    ws = open_("content")
    before = np.array(ws.features.input_features[0])
    np.testing.assert_array_equal(open_("mtime").features.input_features[0], before)
    path = ws.table.paths()[0]
    info = path.stat()
    audio, rate = sf.read(path, dtype="float32")
    sf.write(path, np.roll(audio, 4000), rate, subtype=sf.info(path).subtype)  # same size, new content
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # ... and the old mtime (cp -p, touch -r)
    assert path.stat().st_size == info.st_size

    np.testing.assert_array_equal(open_("mtime").features.input_features[0], before)  # the documented trade-off
    checked = open_("content")
    assert not np.array_equal(checked.features.input_features[0], before)
    assert checked.key({"m": 1}) != ws.key({"m": 1})  # results are keyed by the new audio
    shutil.rmtree(tmp_path / "content")
    np.testing.assert_array_equal(open_("content").features.input_features[0], checked.features.input_features[0])
