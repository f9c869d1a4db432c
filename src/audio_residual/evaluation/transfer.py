"""Zero-shot transfer's data side: dataset B on A's model (`target_workspace`) and the transfer table's shape.

Scoring adapted encoders on B (`transfer_table`) sits above the methods, in `experiments.transfer`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from audio_residual.data_processing import ClipTable, FeatureCache
from audio_residual.workspace import DEFAULT_CACHE, Workspace

TRANSFER_COLUMNS = ("source", "method", "target", "encoders", "accuracy", "accuracy_std", "zeroshot", "retention")
PLAIN_ROW = "plain zero-shot"


def target_workspace(
    source: Workspace,
    table: ClipTable,
    cache_dir: str | Path = DEFAULT_CACHE,
    on_bad_file: str = "error",
    int16_roundtrip: bool = True,
    min_seconds: float = 1.0,
    check: str = "content",
    workers: int = 1,
) -> Workspace:
    """Dataset B on the model of `source`: adapted encoders were fitted to that model, so B must use it too.

    B's audio is prepared like A's (`min_seconds`, the cache `check`, `workers`); its skipped files are in
    the returned workspace's `features.skipped`. (The offline tiny model learns its tokenizer from class
    names: load it with A's and B's names.)
    """
    bundle = source.bundle
    cache = FeatureCache(cache_dir, bundle.feature_extractor, int16_roundtrip=int16_roundtrip,
                         min_seconds=min_seconds, check=check)
    features = cache.compute(table, on_bad_file=on_bad_file, workers=workers)
    if not features.valid.any():
        raise ValueError(f"transfer dataset {table.name!r}: every one of its {len(table)} clips was skipped as a bad file")
    return Workspace(table, bundle, features, source.templates)


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
