"""Zero-shot retention: does an encoder adapted on dataset A still classify dataset B's classes zero-shot?

A linear probe is tied to A's classes; ResiDual and the transferable methods (`Method.transferable`: the
contrastive adapter) keep CLAP's text side, so they can be scored on any label set. The adapted encoder is
applied to B's audio and compared against B's class prompts, next to the plain model on the same clips.
Every usable clip of B is scored: nothing of B was used to adapt the encoder, so all of it is unseen
(pairs with A = B are left out for that reason).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from audio_residual.evaluation.metrics import topk_accuracy
from audio_residual.evaluation.transfer import TRANSFER_COLUMNS
from audio_residual.methods import REGISTRY
from audio_residual.residual.units import ResiDual
from audio_residual.training.trainer import residual_logits
from audio_residual.workspace import Workspace

Adapted = Any  # None (the plain model), a ResiDual, or a transferable method's fitted model


@torch.no_grad()
def transfer_logits(
    target: Workspace, adapted: Adapted = None, rows: np.ndarray | None = None, batch_size: int = 32
) -> torch.Tensor:
    """Zero-shot logits over the target's classes, (len(rows), C_B), on the CPU; rows default to all of B."""
    rows = target.valid_indices() if rows is None else np.asarray(rows)
    if adapted is None or isinstance(adapted, ResiDual):
        return residual_logits(target, adapted, rows, batch_size)
    for method in REGISTRY.values():
        if method.transferable and isinstance(adapted, method.model_type):
            return method.transfer_scores(adapted, target, rows)
    kinds = ["ResiDual", *(m.model_type.__name__ for m in REGISTRY.values() if m.transferable)]
    raise TypeError(f"cannot transfer a {type(adapted).__name__}: only {kinds} keep text classes")


def transfer_accuracy(target: Workspace, adapted: Adapted = None, rows: np.ndarray | None = None) -> float:
    rows = target.valid_indices() if rows is None else np.asarray(rows)
    return topk_accuracy(transfer_logits(target, adapted, rows), target.table.labels[rows], 1)


def transfer_table(
    targets: Mapping[str, Workspace], encoders: Mapping[tuple[str, str], Adapted | Sequence[Adapted]]
) -> pd.DataFrame:
    """One row per (source A, method, target B ≠ A): B's accuracy with A's adapted encoder(s) and without.

    `encoders[(A, method)]` is one encoder or several (e.g. one per fold of A): `accuracy` is their
    mean and `accuracy_std` their sample standard deviation (0 for one). `zeroshot` is the plain
    model on the same clips, and `retention` = accuracy − zeroshot (negative: CLAP's ability was lost).
    """
    plain = {name: transfer_accuracy(ws) for name, ws in targets.items()}
    records = []
    for (source, method), adapted in encoders.items():
        group = list(adapted) if isinstance(adapted, Sequence) else [adapted]
        for name, ws in targets.items():
            if name == source:
                continue
            scores = np.array([transfer_accuracy(ws, encoder) for encoder in group])
            records.append(
                {
                    "source": source,
                    "method": method,
                    "target": name,
                    "encoders": len(scores),
                    "accuracy": float(scores.mean()),
                    "accuracy_std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
                    "zeroshot": plain[name],
                    "retention": float(scores.mean()) - plain[name],
                }
            )
    return pd.DataFrame.from_records(records, columns=TRANSFER_COLUMNS)


