"""Hugging Face datasets: a saved `datasets.Dataset` with an Audio column becomes files, labels and folds."""

import json

import numpy as np
import pytest
import soundfile as sf
from datasets import Audio, ClassLabel, Dataset, DatasetDict
from transformers import ClapFeatureExtractor

from audio_residual.data_processing import DatasetError, FeatureCache, load_audio
from audio_residual.data_processing.hf import EXPORT_INDEX, load_hf_dataset, parse_hf_spec
from audio_residual.workspace import resolve_dataset


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
