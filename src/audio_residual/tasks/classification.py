"""Class-label classification (ESC-50 and kin): one class per clip, class prompts, cross-entropy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from audio_residual.clap.zeroshot import class_prompts
from audio_residual.evaluation.metrics import fold_metrics
from audio_residual.tasks.base import Task


class Classification(Task):
    name = "classification"
    metrics = ("accuracy", "top5", "macro_precision", "macro_recall", "macro_f1")
    selection_metric = "accuracy"
    report_columns = (("top-5", "top5"), ("macro-F1", "macro_f1"))

    def targets(self, ws, rows: np.ndarray) -> np.ndarray:
        return ws.table.labels[rows]

    def texts(self, ws) -> list[str]:
        """Every class prompt of every template (LAION's recipe, `class_prompts`)."""
        return [prompt for template in ws.templates for prompt in class_prompts(ws.table.class_names, template)]

    def loss(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scores, targets)

    def evaluate(self, scores, targets):
        """Accuracy, top-5 and macro scores; the confusion matrix and per-class accuracy as arrays."""
        scores = torch.as_tensor(scores)
        metrics = fold_metrics(scores, targets, scores.shape[1])
        arrays = {"confusion": metrics.pop("confusion"), "per_class_accuracy": metrics.pop("per_class_accuracy")}
        return metrics, arrays

    def informative(self, metric: str, n_classes: int | None) -> bool:
        """Top-5 of five classes or fewer is always 1."""
        return not (metric == "top5" and n_classes is not None and n_classes <= 5)


CLASSIFICATION = Classification()
