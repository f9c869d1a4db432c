"""Zero-shot retention: does an encoder adapted on dataset A still classify dataset B's classes zero-shot?

A linear probe is tied to A's classes; ResiDual and the contrastive adapter keep CLAP's text side, so
they can be scored on any label set. The adapted encoder is applied to B's audio (ResiDual's λ attached
to the model, or the adapter's map applied to the audio embeddings) and compared against B's class
prompts, next to the plain model on the same clips. Every usable clip of B is scored: nothing of B was
used to adapt the encoder, so all of it is unseen (pairs with A = B are left out for that reason).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from audio_residual.baselines.linear import ContrastiveAdapter
from audio_residual.data_processing import ClipTable, FeatureCache
from audio_residual.evaluation.metrics import topk_accuracy
from audio_residual.residual.units import ResiDual
from audio_residual.training.trainer import residual_logits
from audio_residual.workspace import DEFAULT_CACHE, Workspace

Adapted = ResiDual | ContrastiveAdapter | None
TRANSFER_COLUMNS = ("source", "method", "target", "encoders", "accuracy", "accuracy_std", "zeroshot", "retention")
PLAIN_ROW = "plain zero-shot"


def target_workspace(
    source: Workspace,
    table: ClipTable,
    cache_dir: str | Path = DEFAULT_CACHE,
    on_bad_file: str = "error",
    int16_roundtrip: bool = True,
) -> Workspace:
    """Dataset B on the model of `source`: adapted encoders were fitted to that model, so B must use it too.

    (The offline tiny model learns its tokenizer from class names: load it with A's and B's names.)
    """
    bundle = source.bundle
    cache = FeatureCache(cache_dir, bundle.feature_extractor, int16_roundtrip=int16_roundtrip)
    return Workspace(table, bundle, cache.compute(table, on_bad_file=on_bad_file), source.templates)


@torch.no_grad()
def transfer_logits(
    target: Workspace, adapted: Adapted = None, rows: np.ndarray | None = None, batch_size: int = 32
) -> torch.Tensor:
    """Zero-shot logits over the target's classes, (len(rows), C_B), on the CPU; rows default to all of B."""
    rows = target.valid_indices() if rows is None else np.asarray(rows)
    if isinstance(adapted, ContrastiveAdapter):
        classifier = target.classifier
        emb = adapted.adapt(target.embed(rows, batch_size=batch_size, desc="transfer embeddings"))
        return classifier.logit_scale * emb @ classifier.class_embeddings.cpu().T
    if adapted is not None and not isinstance(adapted, ResiDual):
        raise TypeError(f"cannot transfer a {type(adapted).__name__}: only ResiDual or ContrastiveAdapter keep text classes")
    return residual_logits(target, adapted, rows, batch_size)


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
