"""Official cross-validation splits (full or k-shot), with validation drawn from training folds only."""

from __future__ import annotations

from collections.abc import Sequence
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


def few_shot_splits(
    table: ClipTable,
    shots: int,
    seed: int,
    val_per_class: int | None = None,
    valid: np.ndarray | None = None,
) -> list[Split]:
    """k-shot splits: per official fold, `shots` training clips per class drawn from the other folds.

    Validation takes `val_per_class` further clips per class (None: as many as `shots`, so model choice
    sees no more labels than training; 0: no validation) from the remaining training-fold clips only,
    and the test set is the whole official fold. The draw depends only on
    (seed, fold): one permutation per class, so the k-shot training set of a seed is nested in its
    2k-shot one, which keeps few-shot curves from mixing sampling noise with the effect of k.
    `valid` (a boolean mask over the table, e.g. `CachedFeatures.valid`) keeps skipped files out of
    every set. A class with too few clips is refused rather than silently given fewer shots.
    """
    if shots < 1:
        raise ValueError(f"shots must be ≥ 1, got {shots}")
    n_val = shots if val_per_class is None else val_per_class
    if n_val < 0:
        raise ValueError(f"val_per_class must be ≥ 0, got {val_per_class}")
    usable = np.ones(len(table), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if usable.shape != (len(table),):
        raise ValueError(f"valid mask has shape {usable.shape}, the table has {len(table)} rows")
    all_idx = np.arange(len(table), dtype=np.int64)
    splits = []
    for fold in table.fold_ids:
        rng = np.random.default_rng([seed, fold])
        in_fold = table.folds == fold
        pool = all_idx[~in_fold & usable]
        train_parts, val_parts = [], []
        for label, name in enumerate(table.class_names):
            members = rng.permutation(pool[table.labels[pool] == label])
            if members.size < shots + n_val:
                raise ValueError(
                    f"class {name!r} has {members.size} clip(s) outside test fold {fold}; "
                    f"{shots}-shot with {n_val} validation clip(s) per class needs {shots + n_val}"
                )
            train_parts.append(members[:shots])
            val_parts.append(members[shots : shots + n_val])
        splits.append(
            Split(
                fold=fold,
                train=np.sort(np.concatenate(train_parts)),
                test=all_idx[in_fold & usable],
                val=np.sort(np.concatenate(val_parts)),
            )
        )
    return splits


def check_classes_trainable(table: ClipTable, valid: np.ndarray | None = None, folds: Sequence[int] | None = None) -> None:
    """Refuse, before any computing, a class without a training example on some test fold: its usable clips
    all lie in that fold, or it has none at all (every file skipped). The message names the dataset, the
    class and the fold."""
    valid = np.ones(len(table), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    for fold in table.fold_ids if folds is None else folds:
        trained = set(np.unique(table.labels[valid & (table.folds != fold)]).tolist())
        missing = [c for c in range(len(table.class_names)) if c not in trained]
        if not missing:
            continue
        c = missing[0]
        where = (f"has clips only in fold {fold}" if np.any(valid & (table.labels == c))
                 else "has no usable clip (every file skipped or none listed)")
        raise ValueError(
            f"{table.name!r}: class {table.class_names[c]!r} {where}: with fold {fold} as the test fold it has "
            f"no training example ({len(missing)} class(es) like it); move some of its clips to other folds or drop it"
        )
