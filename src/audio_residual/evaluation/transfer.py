"""Zero-shot retention: does an encoder adapted on dataset A still classify dataset B's classes zero-shot?

A linear probe is tied to A's classes; methods that keep CLAP's text side (`Method.transferable`: ResiDual, the
contrastive adapter, LoRA, the retrieval methods) can be scored on any label set. The adapted encoder is applied
to B's audio and compared against B's class prompts, next to the plain model on the same clips. Every usable
clip of B is scored: nothing of B was used to adapt the encoder, so all of it is unseen (pairs with A = B are
left out for that reason). B is opened on A's model and audio configuration (`Workspace.on`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from audio_residual.tasks import CLASSIFICATION
from audio_residual.tasks.classification import topk_accuracy
from audio_residual.workspace import Workspace

TRANSFER_COLUMNS = ("source", "method", "target", "encoders", "accuracy", "accuracy_std", "zeroshot", "retention")
PLAIN_ROW = "plain zero-shot"
Adapted = tuple[Any, Any]  # (a registered method, one of its fitted models)


def transfer_accuracy(target: Workspace, adapted: Adapted | None = None) -> float:
    """Zero-shot accuracy on every usable clip of `target`: of the plain model, or of (method, fitted model)."""
    rows = target.valid_indices()
    if adapted is None:
        logits = CLASSIFICATION.scores(target, target.embeddings(rows), rows)
    else:
        method, model = adapted
        logits = method.transfer_scores(model, target, rows)
    return topk_accuracy(logits, target.table.labels[rows], 1)


def transfer_table(targets: Mapping[str, Workspace], encoders: Mapping[tuple[str, str], Sequence[Adapted]]
                   ) -> pd.DataFrame:
    """One row per (source A, method, target B ≠ A): B's accuracy with A's adapted encoder(s) and without.

    `encoders[(A, method label)]` holds (method, fitted model) pairs, e.g. one per fold of A: `accuracy` is
    their mean and `accuracy_std` their sample standard deviation (0 for one). `zeroshot` is the plain model on
    the same clips, and `retention` = accuracy − zeroshot (negative: CLAP's ability was lost).
    """
    plain = {name: transfer_accuracy(ws) for name, ws in targets.items()}
    records = []
    for (source, label), group in encoders.items():
        for name, ws in targets.items():
            if name == source:
                continue
            scores = np.array([transfer_accuracy(ws, adapted) for adapted in group])
            records.append({
                "source": source, "method": label, "target": name, "encoders": len(scores),
                "accuracy": float(scores.mean()), "accuracy_std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
                "zeroshot": plain[name], "retention": float(scores.mean()) - plain[name],
            })
    return pd.DataFrame.from_records(records, columns=TRANSFER_COLUMNS)


def transfer_matrix(table: pd.DataFrame, method: str, value: str = "accuracy") -> pd.DataFrame:
    """Sources × targets (in order of appearance) of one method's `value`; pairs A = A are NaN. For
    `value="accuracy"` a first row holds the plain model's zero-shot accuracy on each target."""
    rows = table[table["method"] == method]
    if rows.empty:
        raise ValueError(f"no transfer rows for method {method!r}; methods: {sorted(table['method'].unique())}")
    sources, targets = list(dict.fromkeys(rows["source"])), list(dict.fromkeys(rows["target"]))
    matrix = rows.pivot(index="source", columns="target", values=value).reindex(index=sources, columns=targets)
    if value == "accuracy":
        plain = rows.groupby("target")["zeroshot"].first().reindex(targets)
        matrix = pd.concat([pd.DataFrame([plain.to_numpy()], index=[PLAIN_ROW], columns=targets), matrix])
    matrix.index.name, matrix.columns.name = "source", "target"
    return matrix
