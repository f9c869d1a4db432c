"""Both protocols through the study's code: every method on k-shot splits, ResiDual presets with nested
choice on a draw's own validation clips, zero-shot transfer of each fold's adapted encoders, CLI flags."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from audio_residual.baselines.contrastive_adapter import ContrastiveAdapter
from audio_residual.cli import main
from audio_residual.data_processing import load_dataset, make_synthetic_esc50
from audio_residual.evaluation.report import write_report
from audio_residual.evaluation.store import ResultsStore, summary_table
from audio_residual.evaluation.transfer import target_workspace
from audio_residual.experiments.baselines import ALL_METHODS, run_baselines, saved_encoders
from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.protocol import FULL_DATA, Protocol, few_shot_protocols
from audio_residual.experiments.residual import train_chosen_per_fold
from audio_residual.experiments.study import adapted_encoders, few_shot_residual, run_transfer
from audio_residual.experiments.sweep import choose_per_fold, few_shot_grid, grid_points, run_sweep
from audio_residual.experiments.transfer import transfer_accuracy
from audio_residual.layout import RunLayout
from audio_residual.workspace import Workspace

PEER_OPTIONS = {"lora": {"epochs": 1, "ranks": (2,)}, "tip_adapter_f": {"epochs": 2}, "coop": {"epochs": 2}}
BASE = {"batch_size": 16, "val_fraction": 0.2, "schedule": "constant"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, single_thread):
    """A (3 classes) and B (2 other classes, generated further along the sound list) on one tiny model."""
    tmp = tmp_path_factory.mktemp("protocols")
    a = make_synthetic_esc50(tmp / "a", n_classes=3, clips_per_class=10, seconds=1.0, sample_rate=16000)
    b = make_synthetic_esc50(tmp / "b", n_classes=2, clips_per_class=5, seconds=1.0, sample_rate=16000,
                             first_class=3)  # fmt: skip
    table_b = load_dataset(b)
    ws = Workspace.open(a, model="tiny-random", cache_dir=tmp / "cache", device="cpu", other_class_names=table_b.class_names)
    assert set(ws.table.class_names).isdisjoint(table_b.class_names)
    return ws, target_workspace(ws, table_b, cache_dir=tmp / "cache"), tmp


def test_every_method_runs_under_k_shot_and_rows_keep_their_protocol(pair, tmp_path):
    ws, _, _ = pair
    protocols = few_shot_protocols([1, 2], seeds=1)
    store = run_baselines(ws, tmp_path, methods=ALL_METHODS, folds=[1], finetune_epochs=1, peer_options=PEER_OPTIONS,
                          protocols=[FULL_DATA, *protocols])  # fmt: skip
    grid = {"preset": ["default", "paper"], "granularity": ["layer"], "lr": [0.1], "epochs": [2], "fold": [1]}
    few_shot_residual(ws, tmp_path, StudyConfig(grid, BASE), store, protocols)
    every = store.all_regimes
    methods = {*ALL_METHODS, "finetune", "residual", "residual-paper", "residual_coarse"}
    for k in (1, 2):
        rows = every[every["shots"] == k]
        assert set(rows["method"]) == methods and (rows["seed"] == 0).all() and (rows["fold"] == 1).all()
        assert len(rows) == len(methods)
        # Tip-Adapter-F fine-tunes one key per training clip: k clips per class, nothing else
        tip = rows[rows["method"] == "tip_adapter_f"].iloc[0]
        assert tip["trainable_params"] == k * 3 * ws.classifier.class_embeddings.shape[1]
    # full-data rows are the comparison; k-shot rows never enter it, and keys differ per protocol
    assert set(store.frame["method"]) == set(ALL_METHODS) | {"finetune"} and store.frame["shots"].isna().all()
    assert len(set(every.loc[every["method"] == "linear_probe", "key"])) == 3
    assert set(summary_table(store)["n_folds"]) == {1}
    # a draw's ResiDual sweep chose on that draw's validation clips, in the draw's own layout
    draw = RunLayout.of(tmp_path).few_shot(1, 0)
    sweep = pd.read_csv(draw.sweep)
    assert len(sweep) == 2 and sweep["val_accuracy"].notna().all()
    # a fresh session reuses every row: nothing is recomputed, k-shot and full-data selections come back
    again = run_baselines(ws, tmp_path, methods=ALL_METHODS, folds=[1], finetune_epochs=1,
                          peer_options=PEER_OPTIONS, protocols=[FULL_DATA, *protocols])  # fmt: skip
    assert len(again.all_rows) == len(store.all_rows)
    baselines = every[~every["method"].str.startswith("residual")]
    columns = ["method", "shots", "key", "seconds"]
    assert sorted(map(tuple, again.all_regimes[columns].fillna(-1).to_numpy().tolist())) == sorted(
        map(tuple, baselines[columns].fillna(-1).to_numpy().tolist()))  # fmt: skip
    write_report(store, tmp_path, ws.table.class_names)
    report = (tmp_path / "report.md").read_text()
    assert "## Few-shot: k training clips per class" in report and "| residual-paper |" in report
    assert (tmp_path / "figures" / "few_shot_curves.png").is_file()
    assert (tmp_path / "figures" / "accuracy_vs_parameters.png").is_file()
    few = pd.read_csv(tmp_path / "few_shot.csv")
    assert set(few["shots"]) == {1, 2} and (few["runs"] == 1).all()


def test_presets_are_swept_on_their_own_keys_and_chosen_apart():
    grid = {"preset": ["default", "paper"], "lr": [0.01, 0.1], "granularity": ["layer", "head"], "fold": [1, 2]}
    points = grid_points(grid)
    paper = [p for p in points if p["preset"] == "paper"]
    assert len(points) == 8 + 4 and all("lr" not in p for p in paper)  # the paper's lr is its own
    assert few_shot_grid({**grid, "granularity": ["head", "layer"], "epochs": [10, 30]}) == {
        "preset": ["default", "paper"], "lr": [0.01, 0.1], "granularity": ["head"], "fold": [1, 2], "epochs": [10]}
    frame = pd.DataFrame([
        {"point": json.dumps({"preset": "default", "lr": 0.1, "epochs": 10, "fold": 1}), "key": "k", "preset": "default", "lr": 0.1, "epochs": 10.0, "fold": 1, "val_accuracy": 0.5},
        {"point": json.dumps({"preset": "default", "lr": 0.01, "epochs": 10, "fold": 1}), "key": "k", "preset": "default", "lr": 0.01, "epochs": 10.0, "fold": 1, "val_accuracy": 0.7},
        {"point": json.dumps({"preset": "paper", "fold": 1}), "key": "k", "preset": "paper", "lr": np.nan, "epochs": np.nan, "fold": 1, "val_accuracy": 0.9},
    ])  # fmt: skip
    assert choose_per_fold(frame) == {1: {"lr": 0.01, "epochs": 10}}  # the better paper point plays no part
    assert isinstance(choose_per_fold(frame)[1]["epochs"], int)
    assert choose_per_fold(frame, "paper") == {1: {}}
    with pytest.raises(ValueError, match="unknown preset 'papr'"):
        grid_points({"preset": ["papr"], "fold": [1]})


def test_transfer_of_each_folds_adapted_encoders(pair, tmp_path):
    ws, target, _ = pair
    grid = {"granularity": ["layer"], "lr": [0.3], "epochs": [2], "fold": [1, 2]}
    config = StudyConfig(grid, BASE)
    sweep = run_sweep(ws, tmp_path, config, use_wandb=False)
    store = run_baselines(ws, tmp_path, methods=("zeroshot", "contrastive_adapter"), folds=[1, 2])
    train_chosen_per_fold(ws, sweep, config, tmp_path, store, coarse=False)
    table = run_transfer(ws, tmp_path, sweep, config, store, {"B": target}, "A")
    assert list(zip(table["source"], table["method"], table["target"], strict=True)) == [
        ("A", "residual", "B"), ("A", "contrastive_adapter", "B")]  # fmt: skip
    assert (table["encoders"] == 2).all()
    assert table["zeroshot"].tolist() == [transfer_accuracy(target)] * 2
    encoders = adapted_encoders(ws, sweep, config, tmp_path, store, "A")
    for row in table.itertuples():
        scores = [transfer_accuracy(target, e) for e in encoders[("A", row.method)]]
        assert row.accuracy == pytest.approx(np.mean(scores)) and row.retention == pytest.approx(row.accuracy - row.zeroshot)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "transfer.csv"), table, check_dtype=False)
    # the saved adapter is the one that was scored: reloaded, it reproduces each fold's test accuracy exactly
    adapters = saved_encoders(store, tmp_path, "contrastive_adapter")
    stored = store.frame[store.frame["method"] == "contrastive_adapter"].sort_values("fold")
    for adapter, (_, row) in zip(adapters, stored.iterrows(), strict=True):
        assert isinstance(adapter, ContrastiveAdapter)
        test = ws.split(int(row["fold"]), 0.1).test
        accuracy = float((adapter.logits(ws.embed(test)).argmax(1).numpy() == ws.table.labels[test]).mean())
        assert accuracy == pytest.approx(row["accuracy"], abs=1e-9)
    write_report(store, tmp_path, ws.table.class_names, transfer=table)
    assert "A → B" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "figures" / "transfer_residual.png").is_file()


def test_store_selects_one_key_per_method_and_protocol(tmp_path):
    store = ResultsStore(tmp_path / "results.csv")
    store.add({"method": "m", "fold": 1, "key": "full", "accuracy": 0.5})
    store.add({"method": "m", "fold": 1, "key": "k1s0", "accuracy": 0.2, "shots": 1, "seed": 0})
    store.add({"method": "m", "fold": 1, "key": "k1s1", "accuracy": 0.4, "shots": 1, "seed": 1})
    assert store.frame["accuracy"].tolist() == [0.5]
    assert sorted(store.all_regimes["accuracy"]) == [0.2, 0.4, 0.5]
    fresh = ResultsStore(tmp_path / "results.csv")
    assert fresh.reuse("m", 1, "k1s1", shots=1, seed=1) and not fresh.reuse("m", 2, "k1s1", shots=1, seed=1)
    assert fresh.frame.empty and Protocol(1, 1).rows(fresh.all_regimes)["accuracy"].tolist() == [0.4]
    assert fresh.reuse("m", 1, "full") and fresh.frame["accuracy"].tolist() == [0.5]
    assert sorted(fresh.all_regimes["accuracy"]) == [0.4, 0.5]  # the seed-0 draw was not selected


def test_cli_experiment_flags(pair, tmp_path, capsys):
    ws, _, tmp = pair
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"granularity": ["layer"], "lr": [0.3], "epochs": [1], "fold": [1, 2, 3, 4, 5]}))
    common = ["experiment", "--data", str(tmp / "a"), "--model", "tiny-random", "--cache", str(tmp / "cache"),
              "--device", "cpu", "--grid", str(grid), "--wandb", "disabled", "--val-fraction", "0.2"]  # fmt: skip
    out = tmp_path / "out"
    # bad input stops before any computing, with one line naming the culprit
    assert main([*common, "--out", str(out), "--shots", "2,5"]) == 2  # 8 clips per class outside a test fold
    assert "--shots 5: class" in capsys.readouterr().err and not (out / "results.csv").exists()
    assert main([*common, "--out", str(out), "--transfer", str(tmp / "a")]) == 2
    assert "that is the --data dataset" in capsys.readouterr().err
    bad_grid = tmp_path / "bad.json"
    bad_grid.write_text(json.dumps({"preset": ["default", "papr"], "fold": [1]}))
    assert main([*common, "--out", str(out), "--grid", str(bad_grid)]) == 2
    assert "unknown preset 'papr'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--out", str(out), "--methods", "linear_probe,probe"])
    assert "unknown method 'probe'" in capsys.readouterr().err

    assert main([*common, "--out", str(out), "--methods", "zeroshot,contrastive_adapter", "--shots", "1",
                 "--seeds", "2", "--transfer", str(tmp / "b"), "--ablation-max-clips", "2",
                 "--saliency-clips", "1"]) == 0  # fmt: skip
    results = pd.read_csv(out / "results.csv")
    few = results.dropna(subset=["shots"])
    assert set(few["seed"]) == {0, 1} and set(few["shots"]) == {1}
    assert set(few["method"]) == {"zeroshot", "contrastive_adapter", "residual", "residual_coarse"}
    transfer = pd.read_csv(out / "transfer.csv")
    assert set(transfer["source"]) == {"a"} and set(transfer["target"]) == {"b"}
    report = (out / "report.md").read_text()
    assert "## Zero-shot retention" in report and "## Few-shot" in report
    # asked for, the study explains one analysis-fold test clip and its report says how faithful each map is
    faithfulness = pd.read_csv(out / "saliency" / "faithfulness.csv")
    assert "## Saliency (fold 1 test clips)" in report
    assert all(method in report for method in faithfulness["method"])
