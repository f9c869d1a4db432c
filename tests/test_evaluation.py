"""Metrics, the resumable results store, summary statistics, plots and the end-to-end baseline runner."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from audio_residual.evaluation import plots
from audio_residual.evaluation.store import (
    RESULT_COLUMNS,
    ResultsStore,
    markdown_table,
    paired_tests,
    per_class_deltas,
    summary_table,
    summed_confusion,
)
from audio_residual.io import save_figure
from audio_residual.tasks.classification import fold_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


def one_hot_logits(predictions, n_classes):
    return torch.nn.functional.one_hot(torch.tensor(predictions), n_classes).float()


def test_fold_metrics_match_hand_computation_with_a_never_predicted_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = [0, 1, 1, 1, 0, 0]  # class 2 is never predicted
    m = fold_metrics(one_hot_logits(predictions, 3), labels, 3)
    # precision: c0 1/3, c1 2/3, c2 0 (0/0 → 0); recall: c0 1/2, c1 1, c2 0
    # F1: c0 2·(1/3·1/2)/(5/6) = 0.4, c1 2·(2/3)/(5/3) = 0.8, c2 0
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["macro_precision"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((0.4 + 0.8 + 0) / 3)
    np.testing.assert_array_equal(m["confusion"], [[1, 1, 0], [0, 2, 0], [2, 0, 0]])
    np.testing.assert_allclose(m["per_class_accuracy"], [0.5, 1.0, 0.0])


def test_fold_metrics_top5_and_absent_classes():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0, -1], [0.0, 1, 2, 3, 4, 5, 6]])
    m = fold_metrics(logits, np.array([4, 0]), 7)
    assert m["accuracy"] == 0.0 and m["top5"] == 0.5  # class 4 is 5th in row 0; class 0 is last in row 1
    # Classes absent from labels and predictions (1, 2, 3, 5) do not enter the macro average.
    assert m["macro_recall"] == 0.0 and np.isnan(m["per_class_accuracy"][1])


def test_fold_metrics_of_no_clips_are_zero_counts_and_nan_averages():
    m = fold_metrics(torch.zeros(0, 3), np.zeros(0, dtype=np.int64), 3)
    np.testing.assert_array_equal(m["confusion"], np.zeros((3, 3)))
    assert np.isnan(m["macro_f1"]) and np.isnan(m["per_class_accuracy"]).all()


def _row(method, fold, accuracy, params=0, key="k1"):
    return {"method": method, "fold": fold, "key": key, "accuracy": accuracy, "top5": 1.0, "macro_precision": accuracy,
            "macro_recall": accuracy, "macro_f1": accuracy, "trainable_params": params, "seconds": 1.0}  # fmt: skip


def test_store_persists_replaces_and_keeps_arrays(tmp_path):
    store = ResultsStore(tmp_path / "results.csv")
    store.add(_row("zeroshot", 1, 0.5), {"confusion": np.eye(3, dtype=np.int64)})
    store.add(_row("zeroshot", 2, 0.6))
    store.add(_row("zeroshot", 1, 0.7))  # replaces fold 1
    reread = ResultsStore(tmp_path / "results.csv")
    assert len(reread) == 0  # nothing is this session's until asked for under its key
    assert reread.reuse("zeroshot", 1, "k1") and not reread.reuse("zeroshot", 3, "k1")
    assert not reread.reuse("zeroshot", 1, "other options")
    reread.select("zeroshot", "k1")
    assert list(reread.frame.columns[: len(RESULT_COLUMNS)]) == list(RESULT_COLUMNS)
    assert len(reread) == 2
    assert reread.frame.set_index("fold").loc[1, "accuracy"] == 0.7
    np.testing.assert_array_equal(reread.arrays("zeroshot", 1)["confusion"], np.eye(3))
    assert reread.arrays("zeroshot", 2) == {}
    with pytest.raises(ValueError, match="accuracy"):
        store.add({"method": "x", "fold": 1})


def test_store_write_failure_never_replaces_results(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    store = ResultsStore(path)
    store.add(_row("zeroshot", 1, 0.5))
    before = path.read_bytes()

    def crash_half_way(self, target, **kwargs):
        with open(target, "w") as handle:
            handle.write("method,fold\nbroken")  # a truncated temp file...
        raise OSError("disk full")  # ...and the process dies

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash_half_way)
    with pytest.raises(OSError):
        store.add(_row("linear_probe", 1, 0.9))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temp file left behind
    assert len(ResultsStore(path).all_rows) == 1


def test_summary_uses_sample_std_and_scipy_paired_tests():
    base = [0.80, 0.85, 0.90, 0.88, 0.87]
    better = [0.83, 0.86, 0.93, 0.90, 0.92]
    frame = pd.DataFrame(
        [_row("zeroshot", f, a) for f, a in zip(range(1, 6), base, strict=True)]
        + [_row("probe", f, a, params=650) for f, a in zip(range(1, 6), better, strict=True)]
    )
    summary = summary_table(frame).set_index("method")
    assert summary.loc["probe", "accuracy_std"] == pytest.approx(np.std(better, ddof=1))
    assert summary.loc["probe", "accuracy_mean"] == pytest.approx(np.mean(better))
    assert summary.loc["probe", "ttest_p"] == pytest.approx(stats.ttest_rel(better, base).pvalue)
    assert summary.loc["probe", "wilcoxon_p"] == pytest.approx(0.0625)  # all 5 differences positive
    assert summary.loc["probe", "seconds_total"] == 5.0 and summary.loc["probe", "trainable_params"] == 650
    table = markdown_table(summary.reset_index())
    assert "| probe | 0.8880 ± 0.0421 |" in table and "| 650 |" in table


def test_paired_tests_degenerate_cases_give_nan_with_a_note():
    same = paired_tests([0.8, 0.9, 0.85], [0.8, 0.9, 0.85])
    assert np.isnan(same["ttest_p"]) and np.isnan(same["wilcoxon_p"]) and same["note"]
    constant = paired_tests([0.81, 0.91, 0.86], [0.8, 0.9, 0.85])
    assert np.isnan(constant["ttest_p"]) and "constant" in constant["note"]
    assert constant["wilcoxon_p"] == pytest.approx(stats.wilcoxon([0.01] * 3).pvalue)
    single = paired_tests([0.9], [0.8])
    assert np.isnan(single["ttest_p"]) and single["note"]


def test_per_class_deltas_confusion_sums_and_plots(tmp_path):
    store = ResultsStore(tmp_path / "results.csv")
    labels = np.array([0, 0, 1, 1])
    for fold in (1, 2):
        store.add_evaluation("zeroshot", fold, "k", one_hot_logits([0, 1, 0, 0], 2), labels, 0, 0.1)
        store.add_evaluation("probe", fold, "k", one_hot_logits([0, 0, 1, 1], 2), labels, 6, 0.2)
    deltas = per_class_deltas(store, ["a", "b"]).set_index("class_name")
    assert deltas.loc["a", "delta"] == pytest.approx(0.5) and deltas.loc["b", "delta"] == pytest.approx(1.0)
    np.testing.assert_array_equal(summed_confusion(store, "zeroshot"), [[2, 2], [4, 0]])
    path = save_figure(plots.class_deltas(per_class_deltas(store, ["a", "b"]), "probe"), tmp_path / "d.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_figure(plots.confusion_heatmap(summed_confusion(store, "probe"), ["a", "b"]), tmp_path / "c.png")
    save_figure(plots.fold_accuracy(store.frame), tmp_path / "f.png")
    assert {p.name for p in tmp_path.glob("*.png")} == {"d.png", "c.png", "f.png"}


@pytest.fixture(scope="module")
def tiny_experiment(synthetic_esc50, tmp_path_factory):
    from audio_residual.clap.loading import ModelSource
    from audio_residual.workspace import Workspace

    return Workspace.open(synthetic_esc50, ModelSource("tiny-random", device="cpu"),
                          cache_dir=tmp_path_factory.mktemp("cache"))


def _methods(ws, out, methods, base=None, **run):
    """Study.methods of the given methods (the study's own store and split)."""
    from audio_residual.experiments.config import StudyConfig
    from audio_residual.experiments.study import Study

    return Study(ws, out, StudyConfig(methods=methods, base=base or {})).methods(**run)


def _fresh_session(ws, calls):
    """The workspace as a new session opens it: no embedding computed yet; `calls` records each embedding pass."""
    import dataclasses

    fresh = dataclasses.replace(ws, _embeddings=None)
    embed = fresh.embed
    fresh.embed = lambda rows, **kw: calls.append(len(rows)) or embed(rows, **kw)
    return fresh


def test_study_methods_end_to_end_and_resume(tiny_experiment, tmp_path):
    from audio_residual.evaluation.report import write_report

    calls = []
    ws = _fresh_session(tiny_experiment, calls)
    methods = ("zeroshot", "linear_probe", "contrastive_adapter")
    store = _methods(ws, tmp_path, methods)
    assert calls == [len(ws.valid_indices())]  # one embedding pass shared by every fold and method
    frame = pd.read_csv(tmp_path / "results.csv")
    assert sorted(zip(frame["method"], frame["fold"], strict=True)) == sorted(
        (m, f) for m in methods for f in range(1, 6)
    )
    params = frame.groupby("method")["trainable_params"].first()
    dim, n_classes = ws.classifier.class_embeddings.shape[1], len(ws.table.class_names)
    assert params.to_dict() == {"zeroshot": 0, "linear_probe": dim * n_classes + n_classes,
                                "contrastive_adapter": dim * dim + dim}  # fmt: skip

    # zero-shot rows equal the classifier applied to the test fold
    split = ws.splits(0.1, 0)[0]
    logits = ws.classifier.logits(tiny_experiment.embed(split.test))
    expected = fold_metrics(logits, ws.table.labels[split.test], n_classes)["accuracy"]
    assert frame.query("method == 'zeroshot' and fold == 1")["accuracy"].item() == pytest.approx(expected)

    markdown = write_report(store, tmp_path, ws.table.class_names)
    assert (tmp_path / "table.md").read_text() == markdown
    assert all(f"| {m} |" in markdown for m in methods)
    assert len(pd.read_csv(tmp_path / "summary.csv")) == 3
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"fold_accuracy.png", "confusion_zeroshot.png", "class_deltas_linear_probe.png"} <= figures

    calls.clear()
    ws = _fresh_session(tiny_experiment, calls)
    rerun = _methods(ws, tmp_path, methods)  # everything done: nothing is embedded or recomputed
    assert calls == [] and rerun.frame.equals(store.frame)
    forced = _methods(ws, tmp_path, ("zeroshot",), folds=(2,), force=True)
    assert calls == [len(ws.valid_indices())] and len(forced.all_rows) == 15 and forced.methods() == ["zeroshot"]
    before = store.frame.query("method == 'zeroshot'").reset_index(drop=True)
    assert not forced.frame.equals(before)  # fold 2's zero-shot row was rewritten (new seconds)
    other = _methods(ws, tmp_path, ("zeroshot",), base={"val_fraction": 0.2})  # other options: new rows
    assert len(other.all_rows) == 20 and len(other) == 5 and other.frame["key"].nunique() == 1


def test_study_finetune_fold(tiny_experiment, tmp_path):
    from audio_residual.experiments.config import StudyConfig
    from audio_residual.experiments.study import Study

    config = StudyConfig(methods=("zeroshot", "finetune"), options={"finetune": {"epochs": 1}})
    store = Study(tiny_experiment, tmp_path, config).methods(folds=(1,))
    assert store.methods() == ["zeroshot", "finetune"] and len(store) == 2
    model = tiny_experiment.bundle.model
    n_classes = len(tiny_experiment.table.class_names)
    expected = sum(p.numel() for p in [*model.audio_model.parameters(), *model.audio_projection.parameters()])
    expected += (model.audio_projection.linear2.out_features + 1) * n_classes
    assert store.frame.set_index("method").loc["finetune", "trainable_params"] == expected
    assert store.arrays("finetune", 1)["confusion"].sum() == len(tiny_experiment.splits()[0].test)
