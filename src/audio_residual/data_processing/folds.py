"""Official cross-validation splits, with an optional validation set carved from training folds only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from audio_residual.data_processing.datasets import ClipTable


@dataclass(frozen=True, eq=False)
class Split:
    """Row indices into a `ClipTable` for one held-out fold; `val` is empty without a validation set."""

    fold: int
    train: np.ndarray
    test: np.ndarray
    val: np.ndarray


def carve_validation(
    train_idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split `train_idx` into (train, val), taking about `fraction` of each class for validation.

    `labels` holds the labels of the whole table, indexed by the values in `train_idx`. Every class
    keeps at least one training clip, so a tiny class is never moved wholly into validation.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    train_idx = np.asarray(train_idx, dtype=np.int64)
    if fraction == 0.0:
        return np.sort(train_idx), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train_labels = np.asarray(labels)[train_idx]
    val_parts = []
    for label in np.unique(train_labels):
        members = rng.permutation(train_idx[train_labels == label])
        n_val = min(int(round(fraction * members.size)), members.size - 1)
        val_parts.append(members[:n_val])
    val = np.sort(np.concatenate(val_parts))
    return np.setdiff1d(train_idx, val), val


def official_splits(table: ClipTable, val_fraction: float = 0.0, seed: int = 0) -> list[Split]:
    """One split per fold id: test on that fold, train (and validate) on the others."""
    all_idx = np.arange(len(table), dtype=np.int64)
    splits = []
    for fold in table.fold_ids:
        in_fold = table.folds == fold
        train, val = carve_validation(all_idx[~in_fold], table.labels, val_fraction, seed + fold)
        splits.append(Split(fold=fold, train=train, test=all_idx[in_fold], val=val))
    return splits
