"""Zero-shot accuracy of CLAP on every fold of a dataset."""

from __future__ import annotations

import numpy as np
import pandas as pd

from audio_residual.tasks.classification import topk_accuracy
from audio_residual.workspace import Workspace


def zero_shot_by_fold(ws: Workspace) -> pd.DataFrame:
    """One row per fold: fold, n, accuracy, top5 (each clip is embedded once, whatever the fold count)."""
    rows = ws.valid_indices()
    logits = ws.classifier.logits(ws.embed(rows, desc="zero-shot"))
    labels, folds = ws.table.labels[rows], ws.table.folds[rows]
    records = []
    for fold in ws.table.fold_ids:
        mask = folds == fold
        records.append(
            {
                "fold": int(fold),
                "n": int(mask.sum()),
                "accuracy": topk_accuracy(logits[mask], labels[mask], 1),
                "top5": topk_accuracy(logits[mask], labels[mask], 5),
            }
        )
    return pd.DataFrame.from_records(records, columns=["fold", "n", "accuracy", "top5"])


def summarize(frame: pd.DataFrame, column: str = "accuracy") -> str:
    values = frame[column].to_numpy(dtype=float)
    std = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{column} {values.mean():.4f} ± {std:.4f} over {len(values)} folds"
