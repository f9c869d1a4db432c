"""The offline demo, end to end: every step runs and the report says what was measured."""

from __future__ import annotations

import pandas as pd

from audio_residual.demo import run_demo

METHODS = {"zeroshot", "linear_probe", "contrastive_adapter", "finetune", "residual", "residual_coarse"}


def test_demo_writes_report_results_heads_and_figures(tmp_path):
    report = run_demo(tmp_path, n_classes=3, clips_per_class=5)
    results = pd.read_csv(tmp_path / "results.csv")
    assert set(results["method"]) == METHODS
    assert all(sorted(folds) == [1, 2, 3, 4, 5] for _, folds in results.groupby("method")["fold"])
    assert (results.loc[results["method"] == "zeroshot", "trainable_params"] == 0).all()
    residual = results[results["method"] == "residual"]
    coarse = results[results["method"] == "residual_coarse"]
    assert coarse["trainable_params"].max() < residual["trainable_params"].min()
    heads = pd.read_csv(tmp_path / "heads.csv")
    assert {"contribution", "pattern"} <= set(heads["view"]) and not heads.duplicated(["unit", "view"]).any()
    text = report.read_text()
    for method in METHODS:
        assert f"| {method} |" in text
    assert "chosen by that fold's validation split" in text  # nested: one configuration line per test fold
    assert all(f"- fold {fold}: `{{" in text for fold in range(1, 6))
    figures = [line for line in text.splitlines() if line.startswith("- ![")]
    assert figures and all((tmp_path / line.split("](")[1].rstrip(")")).exists() for line in figures)
