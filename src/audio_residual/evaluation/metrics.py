"""Classification metrics computed from logits or predictions, shared by every method."""

from __future__ import annotations

import numpy as np
import torch


def topk_accuracy(logits: torch.Tensor | np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Share of rows whose label is among the k largest logits (k is capped at the class count)."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(np.asarray(labels))
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean())
