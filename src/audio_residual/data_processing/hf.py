"""Hugging Face `datasets` audio-classification sets as clip tables: `hf:OWNER/NAME[:config]` or a saved folder.

The audio is exported once, as the stored file bytes (read with `Audio(decode=False)`, so neither
torchcodec nor any decoder of the `datasets` library is needed), into `export_root/<name>-<fingerprint>/`.
From there on the clips are ordinary files: `load_audio` decodes and resamples them like any other
dataset, and the feature cache keys them as usual. Labels and folds are read from the dataset each time:
labels from a ClassLabel column (its names kept, in its order), folds from a `fold` column if there is
one, else 5 seeded stratified folds. All splits of a DatasetDict are pooled before folds are assigned.
`datasets` (and pyarrow) is imported only when a dataset is opened, so other commands do not pay for it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from audio_residual.data_processing.datasets import ClipTable, DatasetError, stratified_folds
from audio_residual.io import atomic_path, write_json

HF_PREFIX = "hf:"
FOLD_COLUMN = "fold"
DEFAULT_FOLDS = 5
EXPORT_INDEX = "export.json"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".au", ".aiff", ".aif")
_MAGIC_SUFFIXES = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"))


def is_hf_source(data: str | Path) -> bool:
    """`hf:OWNER/NAME[:config]`, or a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    if str(data).startswith(HF_PREFIX):
        return True
    path = Path(data)
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """`hf:OWNER/NAME[:config]` → (OWNER/NAME, config or None); a one-line error for anything else."""
    body = spec.removeprefix(HF_PREFIX)
    match = re.fullmatch(r"([\w.-]+/[\w.-]+)(?::([\w.-]+))?", body)
    if not spec.startswith(HF_PREFIX) or match is None:
        raise ValueError(f"cannot parse {spec!r}: expected hf:OWNER/NAME or hf:OWNER/NAME:CONFIG")
    return match.group(1), match.group(2)


def _open(source: str | Path):
    """(dataset with all splits pooled, a name safe for file paths, a key of its content)."""
    import datasets

    if str(source).startswith(HF_PREFIX):
        repo, config = parse_hf_spec(str(source))
        opened = datasets.load_dataset(repo, config)
        name = "hf-" + repo.replace("/", "--") + (f"--{config}" if config else "")
    else:
        opened = datasets.load_from_disk(str(source))
        name = "hf-" + re.sub(r"[^\w.-]+", "-", Path(source).resolve().name)
    if isinstance(opened, datasets.DatasetDict):
        parts = [opened[split] for split in opened]
        pooled = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        fingerprints = [f"{split}:{opened[split]._fingerprint}" for split in opened]
    else:
        pooled, fingerprints = opened, [opened._fingerprint]
    key = hashlib.sha256("|".join(fingerprints).encode()).hexdigest()[:16]
    return pooled, name, key


def _column_of_type(dataset, feature_type, what: str, preferred: str | None = None) -> str:
    columns = [c for c, f in dataset.features.items() if isinstance(f, feature_type)]
    if preferred in columns or len(columns) == 1:
        return preferred if preferred in columns else columns[0]
    found = f"{len(columns)} ({columns})" if columns else "none"
    raise DatasetError(
        f"dataset needs exactly one {what} column, found {found}; columns: {list(dataset.features)}"
    )


def _labels(dataset, label_column: str | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Label indices and class names from a ClassLabel column, or from a string column given by name."""
    from datasets import ClassLabel

    if label_column is None:
        label_column = _column_of_type(dataset, ClassLabel, "ClassLabel", preferred="label")
    if label_column not in dataset.features:
        raise DatasetError(f"no label column {label_column!r}; columns: {list(dataset.features)}")
    feature, values = dataset.features[label_column], dataset[label_column]
    if isinstance(feature, ClassLabel):
        names, labels = tuple(feature.names), np.asarray(values, dtype=np.int64)
    else:
        names = tuple(sorted(set(map(str, values))))
        index_of = {name: i for i, name in enumerate(names)}
        labels = np.array([index_of[str(v)] for v in values], dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if bad.size:
        raise DatasetError(f"row {bad[0]}, column {label_column!r}: label {labels[bad[0]]} has no class name")
    return labels, names


def _folds(dataset, labels: np.ndarray, seed: int) -> np.ndarray:
    if FOLD_COLUMN not in dataset.features:
        return stratified_folds(labels, DEFAULT_FOLDS, seed)
    folds = []
    for row, value in enumerate(dataset[FOLD_COLUMN]):
        try:
            folds.append(int(value))
        except (TypeError, ValueError) as err:
            raise DatasetError(f"row {row}, column {FOLD_COLUMN!r}: {value!r} is not an integer fold") from err
    return np.array(folds, dtype=np.int64)


def _suffix(stored_path: str | None, data: bytes, row: int) -> str:
    suffix = Path(stored_path or "").suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        return suffix
    for magic, guess in _MAGIC_SUFFIXES:
        if data.startswith(magic):
            return guess
    raise DatasetError(f"row {row}: cannot tell the audio format (path {stored_path!r}, first bytes {data[:4]!r})")


def _export_audio(dataset, audio_column: str, out_dir: Path) -> list[str]:
    """Write every clip's stored bytes (or copy its local file) to `out_dir/audio/`; returns the file names.

    The index file is written last, atomically: a folder without it is an interrupted export, redone.
    """
    from datasets import Audio

    index_path = out_dir / EXPORT_INDEX
    if index_path.is_file():
        return json.loads(index_path.read_text())["filenames"]
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    raw = dataset.select_columns([audio_column]).cast_column(audio_column, Audio(decode=False))
    filenames = []
    for row, item in enumerate(tqdm(raw, desc=f"exporting audio to {out_dir.name}", unit="clip")):
        stored = item[audio_column]
        data = stored.get("bytes")
        if data is None:
            source = Path(stored.get("path") or "")
            if not source.is_file():
                raise DatasetError(f"row {row}: audio has no bytes and its path {str(source)!r} is not a file")
            data = source.read_bytes()
        filename = f"{row:06d}{_suffix(stored.get('path'), data, row)}"
        with atomic_path(audio_dir / filename) as tmp:
            tmp.write_bytes(data)
        filenames.append(filename)
    write_json(index_path, {"filenames": filenames, "audio_column": audio_column})
    return filenames


def load_hf_dataset(
    source: str | Path, export_root: str | Path, label_column: str | None = None, seed: int = 0
) -> ClipTable:
    """A clip table over the exported audio of `hf:OWNER/NAME[:config]` or a `save_to_disk` folder.

    `label_column` defaults to the ClassLabel column (the one named `label` if there are several); a
    string column may be named instead (its sorted values become the classes). `seed` draws the
    stratified folds when the dataset has no `fold` column.
    """
    from datasets import Audio

    dataset, name, key = _open(source)
    audio_column = _column_of_type(dataset, Audio, "Audio", preferred="audio")
    labels, class_names = _labels(dataset, label_column)
    folds = _folds(dataset, labels, seed)
    out_dir = Path(export_root) / f"{name}-{key}"
    filenames = _export_audio(dataset, audio_column, out_dir)
    if len(filenames) != len(labels):
        raise DatasetError(f"{out_dir / EXPORT_INDEX} lists {len(filenames)} clips, the dataset has {len(labels)}")
    return ClipTable(name, out_dir / "audio", filenames, labels, folds, class_names)
