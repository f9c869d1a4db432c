"""The offline demo, end to end: every step runs, the report says what was measured, and on the shift the tiny
CLAP was not pretrained on (held-out attribute combinations) a method beats zero-shot by more than its noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from audio_residual.data_processing.synthetic_captions import held_out_combination
from audio_residual.demo import DEMO_CLASSES, GAIN_COLUMNS, run_demo

pytestmark = pytest.mark.slow  # the whole offline demo: `make test-slow`

METHODS = {"zeroshot", "linear_probe", "contrastive_adapter", "tip_adapter", "tip_adapter_f", "coop", "lora", "finetune",
           "residual", "residual-paper", "residual_coarse"}  # fmt: skip


def test_demo_classes_are_held_out_of_pretraining():
    assert all(held_out_combination(c) is not None for c in DEMO_CLASSES)


def test_demo_writes_report_results_heads_and_figures(tmp_path):
    threads = torch.get_num_threads()
    report = run_demo(tmp_path, n_classes=4, clips_per_class=10)  # equal folds  # on one thread: toy-sized ops
    assert torch.get_num_threads() == threads  # ... and the caller's setting comes back
    every = pd.read_csv(tmp_path / "results.csv")
    results = every[every["shots"].isna()]
    assert set(results["method"]) == METHODS
    assert all(sorted(folds) == [1, 2, 3, 4, 5] for _, folds in results.groupby("method")["fold"])
    for k in (1, 2):  # every method under the k-shot protocol too, one draw, every fold
        few = every[every["shots"] == k]
        assert set(few["method"]) == METHODS and (few["seed"] == 0).all()
        assert all(sorted(folds) == [1, 2, 3, 4, 5] for _, folds in few.groupby("method")["fold"])
    transfer = pd.read_csv(tmp_path / "transfer.csv")  # every method that keeps CLAP's text side
    assert set(transfer["method"]) == {"residual", "residual-paper", "residual_coarse", "contrastive_adapter", "lora"}
    assert (transfer["encoders"] == 5).all() and transfer["source"].nunique() == transfer["target"].nunique() == 1
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
    for method in ("residual", "residual-paper", "residual_coarse", "lora"):  # each preset its own nested choice
        assert all(f"- {method}, fold {fold}: `" in text for fold in range(1, 6))
    assert "## Few-shot: k training clips per class" in text and "## Zero-shot retention" in text
    figures = [line for line in text.splitlines() if line.startswith("- ![")]
    assert figures and all((tmp_path / line.split("](")[1].rstrip(")")).exists() for line in figures)
    for figure in ("accuracy_vs_parameters", "few_shot_curves", "transfer_residual", "transfer_contrastive_adapter"):
        assert f"- ![{figure}](figures/{figure}.png)" in text
    # The retrieval section: every retrieval method's test row, both directions, random baseline beside.
    assert "## Retrieval (generated captioned audio, tiny CLAP)" in text and "| tap |" in text
    retrieval = pd.read_csv(tmp_path / "retrieval" / "retrieval.csv")
    assert set(retrieval["method"]) == {"zeroshot", "residual", "projection", "tap", "lora", "finetune"}
    assert len(retrieval) == 6 and retrieval[["t2a_random_r1", "a2t_random_r1"]].notna().all().all()
    assert set(pd.read_csv(tmp_path / "retrieval" / "transfer.csv")["method"]) == {
        "residual", "projection", "tap", "lora", "finetune"}  # retention of every adapted encoder
    # The comparison against the test split's noise: every adapted method of both tasks, and the claim it makes.
    gains = pd.read_csv(tmp_path / "gains.csv")
    assert list(gains.columns) == GAIN_COLUMNS and (gains["noise"] >= 0).all()
    assert set(gains.loc[gains["task"] == "classification", "method"]) == METHODS - {"zeroshot"}
    assert set(gains.loc[gains["task"] == "retrieval", "method"]) == {"residual", "projection", "tap", "lora", "finetune"}
    accuracy = results.groupby("method")["accuracy"].mean()  # equal folds: the mean over folds is over clips
    by_method = gains[gains["task"] == "classification"].set_index("method")
    assert np.allclose(by_method["gain"], accuracy[by_method.index] - accuracy["zeroshot"])
    assert (by_method["n_test"] == 4 * 10).all()
    assert "## Gain over zero-shot on test, against the test split's noise" in text
    best = by_method.loc[(by_method["gain"] - 2 * by_method["noise"]).idxmax()]
    assert best["gain"] > 2 * best["noise"]  # on held-out combinations the zero-shot prompts miss; adapting helps
    assert f"- classification: {best.name} beats zero-shot by {best['gain']:+.3f} accuracy" in text
    assert f"{best['noise']:.3f}, binomial SE): more than twice its noise." in text
