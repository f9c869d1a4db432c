"""Evaluation: metrics, zero-shot by fold, the results store and comparison, plots, and the baseline runner."""

from audio_residual.evaluation.compare import (
    RESULT_COLUMNS,
    ResultsStore,
    confusion_matrix,
    fold_metrics,
    markdown_table,
    paired_tests,
    per_class_accuracy,
    per_class_deltas,
    summary_table,
    summed_confusion,
)
from audio_residual.evaluation.metrics import topk_accuracy
from audio_residual.evaluation.run import run_baselines, write_report

__all__ = [
    "RESULT_COLUMNS",
    "ResultsStore",
    "confusion_matrix",
    "fold_metrics",
    "markdown_table",
    "paired_tests",
    "per_class_accuracy",
    "per_class_deltas",
    "run_baselines",
    "summary_table",
    "summed_confusion",
    "topk_accuracy",
    "write_report",
]
