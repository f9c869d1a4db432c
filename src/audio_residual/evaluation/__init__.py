"""Evaluation: metrics, zero-shot by fold, the keyed results store, paired comparison, plots and the report."""

from audio_residual.evaluation.metrics import confusion_matrix, fold_metrics, topk_accuracy
from audio_residual.evaluation.report import write_report
from audio_residual.evaluation.store import (
    RESULT_COLUMNS,
    ResultsStore,
    markdown_table,
    paired_tests,
    per_class_accuracy,
    per_class_deltas,
    summary_table,
    summed_confusion,
)

__all__ = [
    "RESULT_COLUMNS",
    "ResultsStore",
    "confusion_matrix",
    "fold_metrics",
    "markdown_table",
    "paired_tests",
    "per_class_accuracy",
    "per_class_deltas",
    "summary_table",
    "summed_confusion",
    "topk_accuracy",
    "write_report",
]
