"""Both protocols through the study's code: every method on k-shot splits, ResiDual presets with nested
choice on a draw's own validation clips, zero-shot transfer of each fold's adapted encoders, CLI flags."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from audio_residual.clap.loading import ModelSource
from audio_residual.cli import main
from audio_residual.data_processing import load_dataset, make_synthetic_esc50
from audio_residual.evaluation.report import write_report
from audio_residual.evaluation.store import ResultsStore, summary_table
from audio_residual.evaluation.transfer import transfer_accuracy
from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.protocol import FULL_DATA, Protocol, few_shot_protocols
from audio_residual.experiments.study import Study
from audio_residual.experiments.sweep import choose_per_fold
from audio_residual.layout import RunLayout
from audio_residual.methods.contrastive_adapter import ContrastiveAdapter
from audio_residual.training.grid import few_shot_grid, grid_points
from audio_residual.workspace import Workspace

BASELINES = ("zeroshot", "linear_probe", "contrastive_adapter", "tip_adapter", "tip_adapter_f", "coop", "lora")
RESIDUALS = ("residual", "residual-paper", "residual_coarse")
PEER_OPTIONS = {"lora": {"epochs": 1, "ranks": (2,)}, "tip_adapter_f": {"epochs": 2}, "coop": {"epochs": 2},
                "finetune": {"epochs": 1}}
BASE = {"batch_size": 16, "val_fraction": 0.2, "schedule": "constant"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, single_thread):
    """A (3 classes) and B (2 other classes, generated further along the sound list) on one tiny model."""
    tmp = tmp_path_factory.mktemp("protocols")
    a = make_synthetic_esc50(tmp / "a", n_classes=3, clips_per_class=10, seconds=1.0, sample_rate=16000)
    b = make_synthetic_esc50(tmp / "b", n_classes=2, clips_per_class=5, seconds=1.0, sample_rate=16000,
                             first_class=3)  # fmt: skip
    table_b = load_dataset(b)
    ws = Workspace.open(a, ModelSource("tiny-random", device="cpu"), cache_dir=tmp / "cache",
                        other_class_names=table_b.class_names)
    assert set(ws.table.class_names).isdisjoint(table_b.class_names)
    return ws, ws.on(b), tmp


def test_every_method_runs_under_k_shot_and_rows_keep_their_protocol(pair, tmp_path):
    ws, _, _ = pair
    protocols = few_shot_protocols([1, 2], seeds=1)
    grid = {"preset": ["default", "paper"], "granularity": ["layer"], "lr": [0.1], "epochs": [2], "fold": [1]}
    methods = (*BASELINES, "finetune", *RESIDUALS)

    def study() -> Study:
        return Study(ws, tmp_path, StudyConfig(methods=methods, grid=grid, base=BASE, options=PEER_OPTIONS))

    first = study()
    for protocol in protocols:  # each draw's ResiDual sweep, in the draw's own layout (what `Study.run` does)
        first.sweep(protocol)
    store = first.methods([FULL_DATA, *protocols], folds=[1])
    every = store.all_regimes
    for k in (1, 2):
        rows = every[every["shots"] == k]
        assert set(rows["method"]) == set(methods) and (rows["seed"] == 0).all() and (rows["fold"] == 1).all()
        assert len(rows) == len(methods)
        # Tip-Adapter-F fine-tunes one key per training clip: k clips per class, nothing else
        tip = rows[rows["method"] == "tip_adapter_f"].iloc[0]
        assert tip["trainable_params"] == k * 3 * ws.classifier.class_embeddings.shape[1]
    # full-data rows are the comparison; k-shot rows never enter it, and keys differ per protocol
    assert set(store.frame["method"]) == set(methods) and store.frame["shots"].isna().all()
    assert len(set(every.loc[every["method"] == "linear_probe", "key"])) == 3
    assert set(summary_table(store)["n_folds"]) == {1}
    # a draw's ResiDual sweep chose on that draw's validation clips, in the draw's own layout
    draw = RunLayout.of(tmp_path).few_shot(1, 0)
    sweep = pd.read_csv(draw.sweep)
    assert len(sweep) == 2 and sweep["val_accuracy"].notna().all()
    chosen = every[(every["method"] == "residual") & (every["shots"] == 1)]["chosen"].map(json.loads).tolist()
    assert chosen == [choose_per_fold(sweep)[1]]  # the nested choice read the draw's sweep
    # a fresh session reuses every row: nothing is recomputed, k-shot and full-data selections come back
    again = study().methods([FULL_DATA, *protocols], folds=[1])
    assert len(again.all_rows) == len(store.all_rows)
    columns = ["method", "shots", "key", "seconds"]
    assert sorted(map(tuple, again.all_regimes[columns].fillna(-1).to_numpy().tolist())) == sorted(
        map(tuple, every[columns].fillna(-1).to_numpy().tolist()))  # fmt: skip
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
    config = StudyConfig(methods=("zeroshot", "residual", "contrastive_adapter"), grid=grid, base=BASE)
    study = Study(ws, tmp_path, config, name="A")
    study.sweep()
    store = study.methods(folds=[1, 2])
    table = study.transfer({"B": target})
    assert list(zip(table["source"], table["method"], table["target"], strict=True)) == [
        ("A", "residual", "B"), ("A", "contrastive_adapter", "B")]  # fmt: skip
    assert (table["encoders"] == 2).all()
    assert table["zeroshot"].tolist() == [transfer_accuracy(target)] * 2
    for row in table.itertuples():
        scores = [transfer_accuracy(target, study.fitted[(row.method, fold)]) for fold in (1, 2)]
        assert row.accuracy == pytest.approx(np.mean(scores)) and row.retention == pytest.approx(row.accuracy - row.zeroshot)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "transfer.csv"), table, check_dtype=False)
    # the saved adapter is the one that was scored: reloaded, it reproduces each fold's test accuracy exactly
    key = study.key("contrastive_adapter", FULL_DATA)
    stored = store.frame[store.frame["method"] == "contrastive_adapter"].sort_values("fold")
    assert (stored["key"] == key).all() and len(stored) == 2
    for _, row in stored.iterrows():
        adapter = ContrastiveAdapter.load(RunLayout.of(tmp_path).adapter("contrastive_adapter", key, int(row["fold"])))
        test = ws.split(int(row["fold"]), 0.1).test
        accuracy = float((adapter.logits(ws.embed(test)).argmax(1).numpy() == ws.table.labels[test]).mean())
        assert accuracy == pytest.approx(row["accuracy"], abs=1e-9)
    # a fresh session transfers the saved encoders without refitting them
    again = Study(ws, tmp_path, config, name="A")
    again.methods(folds=[1, 2])
    assert again.fitted == {}
    pd.testing.assert_frame_equal(again.transfer({"B": target}), table)
    write_report(store, tmp_path, ws.table.class_names, transfer=table)
    assert "A → B" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "figures" / "transfer_residual.png").is_file()


def test_residual_runs_on_the_folds_its_grid_names_the_others_on_every_fold(pair, tmp_path):
    ws, _, _ = pair
    grid = {"granularity": ["layer"], "lr": [0.3], "epochs": [1], "fold": [2]}
    store = Study(ws, tmp_path, StudyConfig(methods=("zeroshot", "residual"), grid=grid, base=BASE)).methods()
    folds = store.frame.groupby("method")["fold"].apply(sorted).to_dict()
    assert folds == {"residual": [2], "zeroshot": [1, 2, 3, 4, 5]}


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
    grid.write_text(json.dumps({"granularity": ["layer"], "lr": [0.3], "epochs": [1], "fold": [1]}))
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
    assert main([*common, "--out", str(out), "--methods", "linear_probe,probe"]) == 2
    assert "unknown classification method 'probe'" in capsys.readouterr().err and not (out / "results.csv").exists()

    methods = "zeroshot,contrastive_adapter,residual,residual_coarse"
    assert main([*common, "--out", str(out), "--methods", methods, "--shots", "1",
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
