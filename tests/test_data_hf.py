"""Hugging Face datasets: a saved `datasets.Dataset` with an Audio column becomes files, labels and folds; a
saved folder or hub id it cannot use is a one-line error naming what is wrong."""

import json

import numpy as np
import pytest
import soundfile as sf
from datasets import Audio, ClassLabel, Dataset, DatasetDict
from transformers import ClapFeatureExtractor

from audio_residual.data_processing import DatasetError, FeatureCache, load_audio
from audio_residual.data_processing.hf import EXPORT_INDEX, load_hf_dataset, parse_hf_spec
from audio_residual.data_processing.sources import resolve_dataset


def write_clips(folder, n_per_class=5) -> tuple[list[bytes], list[int]]:
    """Encoded audio of 2 classes (different pitches), every third clip as FLAC, the rest as WAV."""
    folder.mkdir()
    encoded, labels = [], []
    for i in range(2 * n_per_class):
        label = i % 2
        t = np.arange(int(1.2 * 16000)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (300 + 500 * label + 7 * i) * t)
        path = folder / f"clip{i}.{'flac' if i % 3 == 0 else 'wav'}"
        sf.write(path, audio, 16000)
        encoded.append(path.read_bytes())
        labels.append(label)
    return encoded, labels


def audio_dataset(encoded, labels, **columns) -> Dataset:
    """FLAC rows carry no path, so the export must tell the format from the bytes."""
    rows = [{"bytes": b, "path": None if b.startswith(b"fLaC") else f"c{i}.wav"} for i, b in enumerate(encoded)]
    ds = Dataset.from_dict({"audio": rows, "label": labels, **columns})
    # ClassLabel order deliberately unsorted: the names must be kept as given
    return ds.cast_column("audio", Audio()).cast_column("label", ClassLabel(names=["rain", "dog"]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    encoded, labels = write_clips(root / "src")
    audio_dataset(encoded, labels).save_to_disk(str(root / "saved"))
    return root, encoded, labels


def test_saved_dataset_exports_files_labels_and_stratified_folds(saved, tmp_path):
    root, encoded, labels = saved
    table = resolve_dataset(root / "saved", download_dir=tmp_path)
    assert table.class_names == ("rain", "dog")
    assert table.labels.tolist() == labels
    assert table.name == "hf-saved" and table.audio_dir.parent.parent == tmp_path / "hf"
    assert [p.suffix for p in table.paths()] == [".flac" if b.startswith(b"fLaC") else ".wav" for b in encoded]
    assert [p.read_bytes() for p in table.paths()] == encoded  # the stored file bytes, untouched
    assert table.fold_ids == (1, 2, 3, 4, 5)
    for fold in table.fold_ids:  # 5 clips per class over 5 folds: one of each per fold
        assert np.bincount(table.labels[table.folds == fold], minlength=2).tolist() == [1, 1]
    original = load_audio(root / "src" / "clip3.flac")
    np.testing.assert_array_equal(load_audio(table.paths()[3]), original)  # decoded like any file

    index = table.audio_dir.parent / EXPORT_INDEX
    stamp = index.stat().st_mtime_ns
    again = load_hf_dataset(root / "saved", tmp_path / "hf")  # the export is reused, not rewritten
    assert again.filenames == table.filenames and index.stat().st_mtime_ns == stamp
    assert not np.array_equal(load_hf_dataset(root / "saved", tmp_path / "hf", seed=1).folds, table.folds)

    features = FeatureCache(tmp_path / "cache", ClapFeatureExtractor(max_length_s=2)).compute(table)
    assert features.valid.all() and features.input_features.shape[0] == len(table)


def test_dataset_dict_with_fold_column_and_string_labels(saved, tmp_path):
    root, encoded, labels = saved
    full = audio_dataset(encoded, labels, fold=[1 + i // 4 for i in range(10)], genre=["x", "y"] * 5)
    DatasetDict(train=full.select(range(6)), test=full.select(range(6, 10))).save_to_disk(str(root / "dd"))
    table = load_hf_dataset(root / "dd", tmp_path)
    assert table.folds.tolist() == [1 + i // 4 for i in range(10)]  # splits pooled in order, folds kept
    exported = json.loads((table.audio_dir.parent / EXPORT_INDEX).read_text())["filenames"]
    assert list(table.filenames) == exported and len(exported) == 10
    by_genre = load_hf_dataset(root / "dd", tmp_path, label_column="genre")
    assert by_genre.class_names == ("x", "y") and by_genre.labels.tolist() == [0, 1] * 5


def test_no_class_label_column_is_refused_naming_the_columns(saved, tmp_path):
    root, encoded, labels = saved
    rows = [{"bytes": b, "path": None} for b in encoded]
    Dataset.from_dict({"audio": rows, "target": labels}).cast_column("audio", Audio()).save_to_disk(
        str(root / "nolabel")
    )
    with pytest.raises(DatasetError, match=r"one ClassLabel column, found none; columns: \['audio', 'target'\]"):
        load_hf_dataset(root / "nolabel", tmp_path)


@pytest.mark.parametrize("spec", ["hf:name-without-owner", "hf:a/b:c:d", "laion/clap"])
def test_bad_spec_is_one_line_error(spec):
    with pytest.raises(ValueError, match="expected hf:OWNER/NAME or hf:OWNER/NAME:CONFIG"):
        parse_hf_spec(spec)


def test_spec_parts():
    assert parse_hf_spec("hf:ashraq/esc50") == ("ashraq/esc50", None)
    assert parse_hf_spec("hf:owner/name.v2:clean") == ("owner/name.v2", "clean")


# --- saved folders and ids that are refused ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_full(tmp_path_factory):
    """10 clips of 1.2 s, labels rain / dog alternating."""
    folder = tmp_path_factory.mktemp("hfsrc")
    rows, labels = [], []
    t = np.arange(int(1.2 * 16000)) / 16000
    for i in range(10):
        path = folder / f"c{i}.wav"
        sf.write(path, ((0.1 + 0.05 * (i % 2)) * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32), 16000)
        rows.append({"bytes": path.read_bytes(), "path": f"c{i}.wav"})
        labels.append(i % 2)
    ds = Dataset.from_dict({"audio": rows, "label": labels}).cast_column("audio", Audio())
    return ds.cast_column("label", ClassLabel(names=["rain", "dog"]))


def _hf_cases(full):
    from datasets import Value

    return {
        "one_empty_split": (DatasetDict(train=full, test=full.select([])), None),
        "all_splits_empty": (DatasetDict(train=full.select([]), test=full.select([])), "every split (train, test) is empty"),
        "empty_dataset": (full.select([]), "the saved dataset is empty"),
        "renamed_column": (DatasetDict(train=full, test=full.rename_column("label", "tag")),
                           "splits 'train' and 'test' differ in column(s) ['label', 'tag']"),
        "retyped_column": (DatasetDict(train=full, test=full.cast_column("label", Value("string"))),
                           "differ in column(s) ['label']"),
        "fractional_folds": (full.add_column("fold", [1.5 + i % 5 for i in range(10)]),
                             "column 'fold': 1.5 is not an integer fold"),
        "empty_string_label": (full.add_column("genre", ["x", ""] * 5), "empty label ''"),
    }


def test_hf_saved_folders_that_crashed_are_one_line_errors(hf_full, tmp_path, cli):
    for name, (dataset, expected) in _hf_cases(hf_full).items():
        dataset.save_to_disk(str(tmp_path / name))
        if expected is None:  # an empty split is left out; the others are used
            assert len(load_hf_dataset(tmp_path / name, tmp_path / "export")) == 10
            continue
        if name == "empty_string_label":
            with pytest.raises(DatasetError, match=expected):
                load_hf_dataset(tmp_path / name, tmp_path / "export", label_column="genre")
            continue
        run = cli("zeroshot", "--data", tmp_path / name, "--model", "tiny-random", "--device", "cpu",
                  "--out", tmp_path / "out", "--cache", tmp_path / "cache")
        assert run.code == 2 and expected in run.errors and len(run.errors.strip().splitlines()) == 1, (name, run.err)


@pytest.mark.parametrize("spec", ["hf:../..", "hf:./x", "hf:owner/..", "hf:../name:config"])
def test_hf_ids_naming_folders_are_refused(spec, cli, tmp_path):
    run = cli("zeroshot", "--data", spec, "--model", "tiny-random", "--out", tmp_path / "o", "--cache", tmp_path / "c")
    assert run.code == 2 and "may not start with '.'" in run.errors


def test_hf_integral_float_folds_are_kept(hf_full, tmp_path):
    hf_full.add_column("fold", [float(1 + i % 5) for i in range(10)]).save_to_disk(str(tmp_path / "f"))
    assert load_hf_dataset(tmp_path / "f", tmp_path / "e").folds.tolist() == [1 + i % 5 for i in range(10)]
