"""Dataset tables: loaders on valid layouts, and a clear DatasetError for each kind of broken CSV."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from audio_residual.data_processing import (
    ClipTable,
    DatasetError,
    check_esc50_complete,
    load_csv_dataset,
    load_dataset,
    load_esc50,
    load_gtzan,
    load_urbansound8k,
    make_synthetic_esc50,
)

ESC50_HEADER = "filename,fold,target,category,esc10,src_file,take\n"


def write_esc50(root: Path, rows: list[str], header: str = ESC50_HEADER) -> Path:
    (root / "meta").mkdir(parents=True)
    (root / "audio").mkdir()
    (root / "meta" / "esc50.csv").write_text(header + "".join(row + "\n" for row in rows))
    return root


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_esc50(
        tmp_path_factory.mktemp("syn") / "esc", n_classes=3, clips_per_class=5, seconds=1.0, sample_rate=8000
    )


def test_load_esc50_synthetic(synthetic_root):
    table = load_esc50(synthetic_root)
    assert table.name == "esc50"
    assert len(table) == 15
    assert table.fold_ids == (1, 2, 3, 4, 5)
    assert table.class_names == ("tone_220hz", "noise_band_300hz", "clicks_4_per_s")
    assert table.labels.dtype == np.int64 and table.folds.dtype == np.int64
    assert all(path.is_file() for path in table.paths())
    assert load_dataset(synthetic_root).filenames == table.filenames


def test_class_names_ordered_by_target_not_by_row(tmp_path):
    root = write_esc50(tmp_path, ["b.wav,1,1,dog,False,2,A", "a.wav,2,0,rain,False,1,A"])
    table = load_esc50(root)
    assert table.class_names == ("rain", "dog")
    assert table.labels.tolist() == [1, 0]


def test_subset_keeps_class_names_and_order(synthetic_root):
    table = load_esc50(synthetic_root)
    sub = table.subset([4, 0])
    assert sub.filenames == (table.filenames[4], table.filenames[0])
    assert sub.labels.tolist() == [table.labels[4], table.labels[0]]
    assert sub.class_names == table.class_names


def test_table_is_immutable_and_does_not_freeze_caller_arrays(tmp_path):
    labels = np.array([0, 1])
    table = ClipTable("csv", tmp_path, ("a.wav", "b.wav"), labels, np.array([1, 2]), ("x", "y"))
    labels[0] = 1  # the caller's array stays writable and the table is unaffected
    assert table.labels.tolist() == [0, 1]
    with pytest.raises(ValueError):
        table.labels[0] = 1


def test_missing_column_names_it_and_lists_present(tmp_path):
    root = write_esc50(tmp_path, ["a.wav,1,rain"], header="filename,fold,category\n")
    with pytest.raises(DatasetError, match=r"esc50\.csv.*missing column.*'target'.*present.*'category'"):
        load_esc50(root)


@pytest.mark.parametrize("fold", [0, 6])
def test_unknown_fold_names_line_and_value(tmp_path, fold):
    root = write_esc50(tmp_path, ["a.wav,1,0,rain,False,1,A", f"b.wav,{fold},0,rain,False,2,A"])
    with pytest.raises(
        DatasetError, match=rf"line 3, column 'fold': unknown fold {fold}; folds must be 1\.\.5"
    ):
        load_esc50(root)


def test_target_outside_class_list(tmp_path):
    root = write_esc50(tmp_path, ["a.wav,1,0,rain,False,1,A", "b.wav,1,7,dog,False,2,A"])
    with pytest.raises(DatasetError, match=r"line 3, column 'target': 7 is outside the class list 0\.\.1"):
        load_esc50(root)


def test_inconsistent_target_category(tmp_path):
    root = write_esc50(tmp_path, ["a.wav,1,0,rain,False,1,A", "b.wav,1,0,dog,False,2,A"])
    with pytest.raises(DatasetError, match=r"line 3: target=0 with category='dog' contradicts"):
        load_esc50(root)


def test_duplicate_filename(tmp_path):
    root = write_esc50(tmp_path, ["a.wav,1,0,rain,False,1,A", "a.wav,2,0,rain,False,2,A"])
    with pytest.raises(DatasetError, match=r"line 3.*duplicate filename 'a\.wav' \(first on line 2\)"):
        load_esc50(root)


def test_non_integer_fold(tmp_path):
    root = write_esc50(tmp_path, ["a.wav,one,0,rain,False,1,A"])
    with pytest.raises(DatasetError, match=r"line 2, column 'fold': 'one' is not an integer"):
        load_esc50(root)


@pytest.mark.parametrize("content", ["", ESC50_HEADER])
def test_empty_csv(tmp_path, content):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text(content)
    with pytest.raises(DatasetError, match=r"esc50\.csv.*(empty|no rows)"):
        load_esc50(tmp_path)


def test_check_complete_reports_missing_wavs_and_row_count(synthetic_root):
    assert len(check_esc50_complete(synthetic_root, expected_rows=15)) == 15
    with pytest.raises(DatasetError, match=r"has 15 rows, expected 2000"):
        check_esc50_complete(synthetic_root)


def test_check_complete_names_missing_files(tmp_path):
    root = write_esc50(tmp_path, ["a.wav,1,0,rain,False,1,A", "b.wav,1,0,rain,False,2,A"])
    (root / "audio" / "a.wav").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"1 of 2 audio files missing .*\(first: b\.wav\)"):
        check_esc50_complete(root, expected_rows=2)


def test_urbansound8k_layout(tmp_path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "UrbanSound8K.csv").write_text(
        "slice_file_name,fsID,start,end,salience,fold,classID,class\n"
        "1-0-0.wav,1,0,1,1,3,1,car_horn\n"
        "2-0-0.wav,2,0,1,1,10,0,air_conditioner\n"
    )
    table = load_dataset(tmp_path)
    assert table.name == "urbansound8k"
    assert table.filenames == ("fold3/1-0-0.wav", "fold10/2-0-0.wav")
    assert table.paths()[0] == tmp_path / "audio" / "fold3" / "1-0-0.wav"
    assert table.class_names == ("air_conditioner", "car_horn")
    assert table.fold_ids == (3, 10)
    (tmp_path / "metadata" / "UrbanSound8K.csv").write_text(
        "slice_file_name,fold,classID,class\n1-0-0.wav,11,0,air_conditioner\n"
    )
    with pytest.raises(DatasetError, match=r"unknown fold 11; folds must be 1\.\.10"):
        load_urbansound8k(tmp_path)


def test_csv_dataset_sorted_and_given_class_names(tmp_path):
    csv_path = tmp_path / "clips.csv"
    csv_path.write_text("filename,label,fold\nx.wav,dog,1\ny.wav,cat,2\n")
    table = load_csv_dataset(tmp_path, csv_path)
    assert table.class_names == ("cat", "dog")
    assert table.labels.tolist() == [1, 0]
    fixed = load_csv_dataset(tmp_path, csv_path, class_names=["dog", "cat", "bird"])
    assert fixed.labels.tolist() == [0, 1]
    assert fixed.class_names == ("dog", "cat", "bird")


def test_csv_label_outside_given_classes(tmp_path):
    csv_path = tmp_path / "clips.csv"
    csv_path.write_text("name,cls,split\nx.wav,dog,1\ny.wav,cow,2\n")
    with pytest.raises(
        DatasetError, match=r"clips\.csv: line 3, column 'cls': label 'cow' is not in the class list"
    ):
        load_csv_dataset(tmp_path, csv_path, "name", "cls", "split", class_names=["dog", "cat"])


def test_unrecognised_layout_explains_accepted_ones(tmp_path):
    with pytest.raises(
        DatasetError, match=r"ESC-50 \(meta/esc50\.csv.*UrbanSound8K \(metadata/UrbanSound8K\.csv"
    ):
        load_dataset(tmp_path)


def write_gtzan(root: Path, genres=("rock", "blues", "jazz"), per_genre: int = 20, folder: str = "genres") -> Path:
    for genre in genres:
        (root / folder / genre).mkdir(parents=True)
        for i in range(per_genre):
            (root / folder / genre / f"{genre}.{i:05d}.wav").touch()
    (root / folder / "blues" / ".DS_Store").touch()  # not audio: ignored
    return root


def test_gtzan_stratified_seeded_folds_and_recognised(tmp_path):
    root = write_gtzan(tmp_path)
    table = load_dataset(root)
    assert table.name == "gtzan" and table.class_names == ("blues", "jazz", "rock")
    assert len(table) == 60 and all(path.is_file() for path in table.paths())
    assert table.filenames[0] == "genres/blues/blues.00000.wav"
    assert np.array_equal(table.labels, np.repeat([0, 1, 2], 20))
    assert table.fold_ids == tuple(range(1, 11))
    for fold in table.fold_ids:  # 2 clips per genre in every fold
        assert np.bincount(table.labels[table.folds == fold], minlength=3).tolist() == [2, 2, 2]
    assert np.array_equal(load_gtzan(root, seed=0).folds, table.folds)
    assert not np.array_equal(load_gtzan(root, seed=1).folds, table.folds)


def test_gtzan_kaggle_folder_and_empty_genre(tmp_path):
    assert load_dataset(write_gtzan(tmp_path / "kaggle", folder="genres_original")).filenames[0].startswith(
        "genres_original/blues/"
    )
    root = write_gtzan(tmp_path / "broken")
    (root / "genres" / "metal").mkdir()
    with pytest.raises(DatasetError, match=r"genres/metal: genre folder holds no \.wav/\.au files"):
        load_gtzan(root)


def test_csv_and_esc50_empty_labels_are_refused(tmp_path, small_data):
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label,fold\na.wav,dog,1\nb.wav,,2\n")
    with pytest.raises(DatasetError, match=r"line 3, column 'label': empty label"):
        load_csv_dataset(tmp_path, csv)
    data = tmp_path / "esc"
    shutil.copytree(small_data, data)
    meta = pd.read_csv(data / "meta" / "esc50.csv")
    meta.loc[meta["target"] == 0, "category"] = ""
    meta.to_csv(data / "meta" / "esc50.csv", index=False)
    with pytest.raises(DatasetError, match="column 'category': empty label"):
        load_esc50(data)


def _au_gtzan(root: Path, per_genre: int = 10, genres=("blues", "jazz")) -> Path:
    """A GTZAN folder of real .au clips (1.2 s tones at 22.05 kHz)."""
    t = np.arange(int(1.2 * 22050)) / 22050
    for genre in genres:
        (root / "genres" / genre).mkdir(parents=True)
        for i in range(per_genre):
            audio = ((0.1 + 0.01 * i) * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
            sf.write(root / "genres" / genre / f"{genre}.{i:05d}.au", audio, 22050, format="AU", subtype="PCM_16")
    return root


def test_gtzan_ignores_hidden_folders_and_files(tmp_path):
    root = _au_gtzan(tmp_path / "g")
    (root / "genres" / ".ipynb_checkpoints").mkdir()
    shutil.copy(next((root / "genres" / "jazz").iterdir()), root / "genres" / ".ipynb_checkpoints" / "x.au")
    (root / "genres" / "jazz" / "._jazz.00000.au").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    table = load_gtzan(root)
    assert table.class_names == ("blues", "jazz") and len(table) == 20
    assert not any("/." in name for name in table.filenames)


def test_gtzan_with_too_few_clips_names_the_genre_and_the_rule(tmp_path, cli):
    root = _au_gtzan(tmp_path / "g", per_genre=10)
    for i in range(6, 10):
        (root / "genres" / "jazz" / f"jazz.{i:05d}.au").unlink()
    run = cli("zeroshot", "--data", root, "--model", "tiny-random", "--out", tmp_path / "o", "--cache", tmp_path / "c",
              "--device", "cpu")
    assert run.code == 2 and "GTZAN" in run.errors and "class 'jazz' has 6 clip(s)" in run.errors
    assert "10 stratified folds need at least 10 clips per class" in run.errors and "n_splits" not in run.errors
