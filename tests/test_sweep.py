"""Sweeps: the local grid fills the same table a W&B sweep would; selection uses validation only."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from audio_residual.clap.loading import ModelSource
from audio_residual.cli import main
from audio_residual.experiments import sweep as sweep_module
from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.protocol import FULL_DATA, Protocol
from audio_residual.experiments.study import Study
from audio_residual.experiments.sweep import (
    choose_per_fold,
    mean_ranking,
    run_sweep,
    wandb_sweep_config,
)
from audio_residual.layout import RunLayout
from audio_residual.training.grid import few_shot_grid, grid_points
from audio_residual.workspace import Workspace

GRID = {"granularity": ["layer"], "lr": [0.05, 0.3], "epochs": [2], "fold": [1, 2]}
BASE = {"batch_size": 16, "val_fraction": 0.2}


@pytest.fixture(scope="module")
def experiment(synthetic_esc50, tmp_path_factory):
    return Workspace.open(synthetic_esc50, ModelSource("tiny-random", device="cpu"), cache_dir=tmp_path_factory.mktemp("cache"))


def test_grid_and_wandb_config_agree():
    points = grid_points(GRID)
    assert len(points) == 4 and points[0] == {"granularity": "layer", "lr": 0.05, "epochs": 2, "fold": 1}
    config = wandb_sweep_config(GRID)
    assert config["method"] == "grid" and config["metric"] == {"name": "val_accuracy", "goal": "maximize"}
    assert {k: v["values"] for k, v in config["parameters"].items()} == GRID


def test_local_sweep_fills_the_table_and_resumes(experiment, tmp_path, monkeypatch):
    frame = run_sweep(experiment, tmp_path, StudyConfig(grid=GRID, base=BASE), use_wandb=False)
    assert len(frame) == 4 and set(frame["fold"]) == {1, 2}
    assert frame["val_accuracy"].between(0, 1).all() and frame["test_accuracy"].between(0, 1).all()
    on_disk = pd.read_csv(tmp_path / "sweep.csv")
    assert len(on_disk) == 4
    calls = []
    monkeypatch.setattr(sweep_module, "train_point", lambda *a, **k: calls.append(a) or {})
    again = run_sweep(experiment, tmp_path, StudyConfig(grid=GRID, base=BASE), use_wandb=False)
    assert calls == [] and len(again) == 4  # finished points are not trained twice


def test_auto_mode_without_account_runs_locally(experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    grid = {**GRID, "lr": [0.05], "fold": [1]}
    frame = run_sweep(experiment, tmp_path, StudyConfig(grid=grid, base=BASE), use_wandb="auto")
    assert len(frame) == 1


def test_choice_is_per_fold_and_ignores_test_accuracy():
    rows = [
        {"point": json.dumps({"lr": 0.1, "fold": 1}), "lr": 0.1, "fold": 1, "val_accuracy": 0.9, "test_accuracy": 0.1},
        {"point": json.dumps({"lr": 0.1, "fold": 2}), "lr": 0.1, "fold": 2, "val_accuracy": 0.5, "test_accuracy": 0.1},
        {"point": json.dumps({"lr": 0.3, "fold": 1}), "lr": 0.3, "fold": 1, "val_accuracy": 0.6, "test_accuracy": 1.0},
        {"point": json.dumps({"lr": 0.3, "fold": 2}), "lr": 0.3, "fold": 2, "val_accuracy": 0.7, "test_accuracy": 1.0},
    ]
    frame = pd.DataFrame(rows)
    assert choose_per_fold(frame) == {1: {"lr": 0.1}, 2: {"lr": 0.3}}  # each fold by its own validation
    ranking = mean_ranking(frame)  # a summary only: fold 2's clips would vote on fold 1's choice here
    assert ranking["lr"].tolist() == [0.1, 0.3] and ranking["val_accuracy"].tolist() == pytest.approx([0.7, 0.65])
    with pytest.raises(ValueError, match="fold 1: 2 configurations but no validation accuracy"):
        choose_per_fold(frame.assign(val_accuracy=float("nan")))
    single = frame[frame["lr"] == 0.3].assign(val_accuracy=float("nan"))  # nothing to choose between
    assert choose_per_fold(single) == {1: {"lr": 0.3}, 2: {"lr": 0.3}}


def test_list_options_survive_the_csv_round_trip(experiment, tmp_path):
    grid = {"granularity": ["layer"], "stages": [[2, 3]], "epochs": [1], "fold": [1]}
    run_sweep(experiment, tmp_path, StudyConfig(grid=grid, base=BASE), use_wandb=False)
    frame = pd.read_csv(tmp_path / "sweep.csv")
    assert choose_per_fold(frame)[1]["stages"] == [2, 3]


def test_sweep_rows_are_keyed_by_base_options(experiment, tmp_path, monkeypatch):
    grid = {**GRID, "lr": [0.05], "fold": [1]}
    first = run_sweep(experiment, tmp_path, StudyConfig(grid=grid, base=BASE), use_wandb=False)
    calls = []
    real = sweep_module.train_point
    monkeypatch.setattr(sweep_module, "train_point", lambda *a, **k: calls.append(a) or real(*a, **k))
    other = run_sweep(experiment, tmp_path, StudyConfig(grid=grid, base={**BASE, "batch_size": 8}), use_wandb=False)
    assert len(calls) == 1 and len(other) == 1  # other base options: the old row is not this run's
    assert len(pd.read_csv(tmp_path / "sweep.csv")) == 2 and first["key"].iloc[0] != other["key"].iloc[0]


def test_sweep_and_train_residual_commands(synthetic_esc50, tmp_path, capsys):
    common = ["--data", str(synthetic_esc50), "--model", "tiny-random", "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"granularity": ["layer", "head"], "lr": [0.3], "epochs": [2], "fold": [1]}))
    assert main(["sweep", *common, "--out", str(tmp_path / "sweep"), "--grid", str(grid), "--wandb", "disabled"]) == 0
    assert "fold 1: chosen on its own validation split" in capsys.readouterr().out
    out = tmp_path / "residual"
    args = ["train-residual", *common, "--out", str(out), "--granularity", "layer", "--stages", "0,3",
            "--epochs", "2", "--lr", "0.1", "--folds", "1,2"]
    assert main(args) == 0
    results = pd.read_csv(out / "results.csv")
    results = results[results["method"] != "zeroshot"]  # the baseline, beside it in the report
    assert results["method"].tolist() == ["residual", "residual"] and results["fold"].tolist() == [1, 2]
    # At most one λ per channel of stages 0 and 3 (16 + 128); directions without variance get none.
    assert (results["trainable_params"] <= 16 + 128).all() and (results["trainable_params"] > 16).all()
    lambdas = list(out.glob("runs/*/fold1/lambdas.csv"))
    assert len(lambdas) == 1 and len(pd.read_csv(lambdas[0])) == results["trainable_params"].iloc[0]
    assert list(out.glob("runs/*/fold1/lambda_heatmap.png"))
    assert (out / "table.md").read_text().count("residual") >= 1


def test_reading_an_unfinished_sweep_names_what_to_run_and_trains_nothing(experiment, tmp_path):
    from audio_residual.experiments.sweep import SweepNotRun, finished_sweep

    grid = {"lr": [0.1], "epochs": [1], "fold": [1]}
    with pytest.raises(SweepNotRun, match="1 of 1 grid points .* notebook 2's cell .*audio-residual sweep"):
        finished_sweep(experiment, tmp_path, StudyConfig(grid=grid, base={"batch_size": 16}))
    assert not (tmp_path / "runs").exists()


def test_keys_hash_the_grid_and_base_as_given_and_tell_variants_and_protocols_apart(experiment, tmp_path):
    """A resumed run finds its rows: the sweep table's key and the ResiDual rows' keys hash the study's grid and
    base exactly as given (their JSON), the split and the protocol; each variant's rows have their own key."""
    base = {"batch_size": 16, "val_fraction": 0.2, "schedule": "constant", "optimizer": "adamw", "stages": [0, 3]}
    grid = {"preset": ["default", "paper"], "lr": [0.05, 0.3], "stages": [[0], [0, 3]], "fold": [1, 2]}
    config = StudyConfig(grid=grid, base=base)
    layout = RunLayout.of(tmp_path)
    sweep_keys = set()
    for protocol in (FULL_DATA, Protocol(2, 1)):
        expected = experiment.key({"sweep_base": base, "seed": 0, **protocol.procedure()})
        assert sweep_module._table(experiment, layout, config, protocol).key == expected
        sweep_keys.add(expected)
    assert len(sweep_keys) == 2
    assert json.dumps(config.few_shot().grid) == json.dumps(few_shot_grid(grid))

    study = Study(experiment, tmp_path, config)
    split = {"val_fraction": 0.2, "seed": 0}
    keys = {}
    for name in ("residual", "residual-paper", "residual_coarse"):
        options = config.method_options(name)
        assert json.dumps(options) == json.dumps({"grid": grid, "base": base})  # the dicts as given, in order
        procedure = {"method": name, "options": {"grid": grid, "base": base}}  # the label is the variant's name
        for protocol in (FULL_DATA, Protocol(2, 1)):
            keys[(name, protocol)] = study.key(name, protocol)
            assert keys[(name, protocol)] == experiment.key({**procedure, "split": split, **protocol.procedure()})
    assert len(set(keys.values())) == 6
    other = Study(experiment, tmp_path, StudyConfig(grid=grid, base={**base, "batch_size": 8}))
    assert other.key("residual", FULL_DATA) != keys[("residual", FULL_DATA)]


def test_study_config_checks_grid_and_base_on_construction():
    with pytest.raises(ValueError, match="unknown option 'lrr'"):
        StudyConfig(grid={"lrr": [0.1]})
    with pytest.raises(ValueError, match="'lr' must map to a non-empty list"):
        StudyConfig(grid={"lr": 0.1})
    with pytest.raises(ValueError, match="unknown preset 'papr'"):
        StudyConfig(grid={"preset": ["papr"], "fold": [1]})
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['bogus'\]"):
        StudyConfig(grid=GRID, base={"bogus": 1})
    config = StudyConfig(grid=GRID, base=BASE, shots=[1, 2], seeds=2)
    assert config.folds == [1, 2] and [(p.shots, p.seed) for p in config.protocols()] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    with pytest.raises(AttributeError):
        config.base = {}  # frozen


def test_a_grid_without_fold_sweeps_every_fold(small_data, tmp_path, monkeypatch):
    """(From test_faults_round2.py.) A grid that names no fold is run on every fold, and reads back as finished."""
    from audio_residual.clap.loading import ModelSource as Source
    from audio_residual.experiments import sweep as sweeps
    from audio_residual.experiments.config import StudyConfig as Config
    from audio_residual.workspace import Workspace as Space

    ws = Space.open(small_data, Source("tiny-random", device="cpu"), cache_dir=tmp_path / "cache")
    trained = []
    monkeypatch.setattr(sweeps, "train_point",
                        lambda ws, point, *a, **k: trained.append(point["fold"]) or {"val_accuracy": 0.5})
    config = Config(grid={"lr": [0.1]}, base={})
    frame = sweeps.run_sweep(ws, tmp_path / "out", config, use_wandb=False)
    assert sorted(trained) == [1, 2, 3, 4, 5] and sorted(frame["fold"]) == [1, 2, 3, 4, 5]
    assert len(sweeps.finished_sweep(ws, tmp_path / "out", config)) == 5  # and reads back as finished
