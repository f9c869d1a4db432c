"""Official splits: every clip tested once, no overlap, validation stratified and outside the test fold."""

import numpy as np
import pytest

from audio_residual.data_processing import ClipTable, carve_validation, official_splits


@pytest.fixture
def table(tmp_path) -> ClipTable:
    rng = np.random.default_rng(0)
    n = 200
    return ClipTable(
        name="csv",
        audio_dir=tmp_path,
        filenames=tuple(f"{i}.wav" for i in range(n)),
        labels=rng.integers(0, 4, n),
        folds=np.repeat([1, 2, 3, 4, 5], n // 5),
        class_names=("a", "b", "c", "d"),
    )


@pytest.mark.parametrize("val_fraction", [0.0, 0.2])
def test_splits_partition_the_table(table, val_fraction):
    splits = official_splits(table, val_fraction=val_fraction)
    assert [s.fold for s in splits] == [1, 2, 3, 4, 5]
    tested = np.concatenate([s.test for s in splits])
    assert np.array_equal(np.sort(tested), np.arange(len(table)))  # every clip tested exactly once
    for split in splits:
        parts = [split.train, split.val, split.test]
        assert sum(p.size for p in parts) == len(table)
        assert np.unique(np.concatenate(parts)).size == len(table)  # complete and pairwise disjoint
        assert np.all(table.folds[split.test] == split.fold)
        assert not np.any(table.folds[np.concatenate([split.train, split.val])] == split.fold)
        assert split.val.size == (0 if val_fraction == 0 else pytest.approx(0.2 * 160, abs=4))


def test_validation_is_stratified(table):
    split = official_splits(table, val_fraction=0.25, seed=1)[0]
    pool = np.concatenate([split.train, split.val])
    for label in range(4):
        in_pool = np.sum(table.labels[pool] == label)
        assert np.sum(table.labels[split.val] == label) == round(0.25 * in_pool)


def test_validation_deterministic_by_seed(table):
    first = official_splits(table, val_fraction=0.2, seed=5)
    again = official_splits(table, val_fraction=0.2, seed=5)
    other = official_splits(table, val_fraction=0.2, seed=6)
    assert all(np.array_equal(a.val, b.val) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a.val, b.val) for a, b in zip(first, other, strict=True))


def test_small_class_keeps_a_training_clip():
    labels = np.array([0, 0, 0, 0, 1])
    train, val = carve_validation(np.arange(5), labels, 0.5, seed=0)
    assert 4 in train and val.size == 2 and np.all(labels[val] == 0)


def test_bad_fraction_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        carve_validation(np.arange(4), np.zeros(4, dtype=int), 1.0, seed=0)
