"""Class-label classification (ESC-50 and kin): one class per clip, class prompts, cross-entropy, accuracy.

Scores are CLAP's zero-shot logits, scale · cos(audio, class prompt) with the prompt templates ensembled;
metrics are accuracy, top-5 and macro precision/recall/F1, with the confusion matrix and per-class
accuracy stored beside each row.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support

from audio_residual.clap.zeroshot import class_prompts
from audio_residual.tasks.base import Task, TrainBatch


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


class Classification(Task):
    name = "classification"
    metrics = ("accuracy", "top5", "macro_precision", "macro_recall", "macro_f1")
    selection_metric = "accuracy"
    report_columns = (("top-5", "top5"), ("macro-F1", "macro_f1"))

    def targets(self, ws, rows: np.ndarray) -> np.ndarray:
        return ws.table.labels[np.asarray(rows, dtype=np.int64)]

    def texts(self, ws, rows: np.ndarray | None = None) -> list[str]:
        """Every class prompt of every template (LAION's recipe, `class_prompts`), whatever the rows."""
        return [prompt for template in ws.templates for prompt in class_prompts(ws.table.class_names, template)]

    def batches(self, ws, rows: np.ndarray, batch_size: int):
        """`rows` in an order drawn from the epoch's generator, in chunks, with their labels."""
        rows = np.asarray(rows)

        def draw(generator: torch.Generator) -> list[TrainBatch]:
            order = rows[torch.randperm(len(rows), generator=generator).numpy()]
            chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
            return [TrainBatch(chunk, self.targets(ws, chunk)) for chunk in chunks]

        return draw

    def text_side(self, ws, rows: np.ndarray | None = None) -> torch.Tensor:
        """The class embeddings (templates ensembled), whatever the rows."""
        return ws.classifier.class_embeddings

    def loss(self, audio: torch.Tensor, batch: TrainBatch, text: torch.Tensor, scale) -> torch.Tensor:
        logits = scale * audio.float() @ text.to(audio.device).T
        return F.cross_entropy(logits, torch.as_tensor(batch.targets, device=audio.device))

    def scores(self, ws, audio: torch.Tensor, rows: np.ndarray, texts: torch.Tensor | None = None) -> torch.Tensor:
        """Zero-shot logits (len(rows), C) on the CPU: CLAP's logit scale · cos(audio, class)."""
        text = ws.classifier.class_embeddings if texts is None else texts
        return ws.classifier.logit_scale * audio.float().cpu() @ text.float().cpu().T

    def evaluate(self, scores, targets):
        """Accuracy, top-5 and macro scores; the confusion matrix, per-class accuracy and whether each clip was
        classified right (in the rows' order: two methods compared clip by clip, as a paired test needs) as arrays."""
        scores = torch.as_tensor(scores)
        metrics = fold_metrics(scores, targets, scores.shape[1])
        arrays = {"confusion": metrics.pop("confusion"), "per_class_accuracy": metrics.pop("per_class_accuracy"),
                  "correct": scores.argmax(1).numpy() == np.asarray(targets)}
        return metrics, arrays

    def informative(self, metric: str, n_classes: int | None) -> bool:
        """Top-5 of five classes or fewer is always 1."""
        return not (metric == "top5" and n_classes is not None and n_classes <= 5)


CLASSIFICATION = Classification()
