"""Inputs of the methods that train on cached audio embeddings: tensors on the CPU, the validation pair."""

from __future__ import annotations

import numpy as np
import torch


def as_float(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float().cpu()


def as_labels(y) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().cpu()


def validation_pair(val_emb, val_labels) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(embeddings, labels) of the validation split, None when there is none."""
    if val_emb is None or val_labels is None or len(val_labels) == 0:
        return None
    return as_float(val_emb), as_labels(val_labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Classification's selection metric: top-1 accuracy."""
    return float((logits.argmax(1) == labels).float().mean())
