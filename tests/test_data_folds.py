"""Official splits: every clip tested once, no overlap, validation stratified and outside the test fold; a class
no training split can learn is refused before any work."""

import shutil

import numpy as np
import pandas as pd
import pytest

from audio_residual.data_processing import ClipTable, carve_validation, few_shot_splits, official_splits


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


def balanced_table(tmp_path, per_class_per_fold: int = 6) -> ClipTable:
    labels = np.tile(np.repeat(np.arange(3), per_class_per_fold), 5)
    folds = np.repeat([1, 2, 3, 4, 5], 3 * per_class_per_fold)
    order = np.random.default_rng(1).permutation(labels.size)  # rows not grouped by class or fold
    return ClipTable("csv", tmp_path, [f"{i}.wav" for i in range(labels.size)], labels[order], folds[order],
                     ("a", "b", "c"))  # fmt: skip


@pytest.mark.parametrize("shots", [1, 4])
def test_few_shot_balanced_disjoint_and_tests_the_official_fold(tmp_path, shots):
    table = balanced_table(tmp_path)
    splits = few_shot_splits(table, shots, seed=0, val_per_class=2)
    assert [s.fold for s in splits] == [1, 2, 3, 4, 5]
    for split in splits:
        assert np.bincount(table.labels[split.train], minlength=3).tolist() == [shots] * 3
        assert np.bincount(table.labels[split.val], minlength=3).tolist() == [2] * 3
        assert np.array_equal(split.test, np.flatnonzero(table.folds == split.fold))
        assert not np.any(table.folds[np.concatenate([split.train, split.val])] == split.fold)
        assert np.intersect1d(split.train, split.val).size == 0


def test_few_shot_default_validation_matches_shots_and_zero_gives_none(tmp_path):
    table = balanced_table(tmp_path)
    assert all(s.val.size == 3 * 2 for s in few_shot_splits(table, 2, seed=0))
    assert all(s.val.size == 0 for s in few_shot_splits(table, 2, seed=0, val_per_class=0))


def test_few_shot_deterministic_per_seed_nested_in_k_and_seeds_differ(tmp_path):
    table = balanced_table(tmp_path)
    first, again = few_shot_splits(table, 2, seed=3), few_shot_splits(table, 2, seed=3)
    pairs = zip(first, again, strict=True)
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val) for a, b in pairs)
    other = few_shot_splits(table, 2, seed=4)
    assert not all(np.array_equal(a.train, b.train) for a, b in zip(first, other, strict=True))
    larger = few_shot_splits(table, 4, seed=3, val_per_class=0)
    assert all(np.isin(a.train, b.train).all() for a, b in zip(first, larger, strict=True))


def test_few_shot_refuses_a_class_too_small_naming_it_and_the_fold(tmp_path):
    table = balanced_table(tmp_path, per_class_per_fold=2)  # 8 clips per class outside any fold
    few_shot_splits(table, 4, seed=0, val_per_class=4)
    with pytest.raises(ValueError, match=r"class 'a' has 8 clip\(s\) outside test fold 1; 8-shot .* needs 9"):
        few_shot_splits(table, 8, seed=0, val_per_class=1)


def test_few_shot_never_draws_skipped_files(tmp_path):
    table = balanced_table(tmp_path)
    valid = np.ones(len(table), dtype=bool)
    valid[::3] = False
    for split in few_shot_splits(table, 3, seed=0, val_per_class=3, valid=valid):
        assert valid[np.concatenate([split.train, split.val, split.test])].all()
        assert np.array_equal(split.test, np.flatnonzero((table.folds == split.fold) & valid))


def test_a_class_only_in_one_test_fold_is_named_before_any_work(small_data, tmp_path, cli):
    data = tmp_path / "esc"
    shutil.copytree(small_data, data)
    meta = pd.read_csv(data / "meta" / "esc50.csv")
    name = meta.loc[meta["target"] == 2, "category"].iloc[0]
    meta.loc[meta["target"] == 2, "fold"] = 3
    meta.to_csv(data / "meta" / "esc50.csv", index=False)
    run = cli("experiment", "--data", data, "--model", "tiny-random", "--device", "cpu", "--out", tmp_path / "out",
              "--cache", tmp_path / "cache", "--wandb", "disabled")
    assert run.code == 2 and f"'esc50': class {name!r} has clips only in fold 3" in run.errors
    assert "fold 3 as the test fold" in run.errors
    assert not (tmp_path / "out" / "analysis").exists() and not (tmp_path / "out" / "sweep.csv").exists()
