"""Classification metrics computed from logits or predictions, shared by every method."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support


def topk_accuracy(logits: torch.Tensor | np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Share of rows whose label is among the k largest logits (k is capped at the class count)."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(np.asarray(labels))
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean())


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts; rows are true classes, columns predicted classes (all zero for no clips)."""
    if len(labels) == 0:  # scikit-learn refuses empty input
        return np.zeros((n_classes, n_classes), dtype=np.int64)
    return sklearn_confusion_matrix(labels, predictions, labels=np.arange(n_classes))


def fold_metrics(logits, labels, n_classes: int) -> dict:
    """Accuracy, top-5, macro precision/recall/F1, the confusion matrix and per-class accuracy of one fold.

    Macro averages run over the classes that occur in the labels or the predictions (scikit-learn's
    default), so a class absent from a fold does not count as a zero; a class that is present but never
    predicted has precision 0 (zero division → 0). Per-class accuracy (= recall) is NaN for classes
    absent from the labels, so that averaging across folds can skip them.
    """
    logits = torch.as_tensor(logits).detach().float().cpu()
    labels = np.asarray(labels, dtype=np.int64)
    predictions = logits.argmax(1).numpy()
    confusion = confusion_matrix(predictions, labels, n_classes)
    support = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class_accuracy = np.where(support > 0, np.diag(confusion) / support, np.nan)
    seen = np.union1d(labels, predictions)
    if len(seen):
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predictions, labels=seen, average="macro", zero_division=0
        )
    else:
        precision = recall = f1 = float("nan")
    return {
        "accuracy": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
        "confusion": confusion,
        "per_class_accuracy": per_class_accuracy,
    }
