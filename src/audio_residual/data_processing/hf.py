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
    if any(part.startswith(".") for part in match.group(1).split("/")):  # '.', '..' would name a folder
        raise ValueError(f"cannot parse {spec!r}: OWNER and NAME may not start with '.' (expected hf:OWNER/NAME)")
    return match.group(1), match.group(2)


def _saved_split_rows(folder: Path) -> int | None:
    """Rows of a `Dataset.save_to_disk` folder per its `state.json` (0 when it holds no data file), None if unknown."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return None if len(state.get("_data_files", [None])) else 0


def _load_saved(path: Path):
    """`datasets.load_from_disk`, refusing a dataset with no rows and leaving out empty splits (which
    `datasets` cannot even open); a DatasetDict stays one, of its non-empty splits."""
    import datasets

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        kept = [split for split in splits if _saved_split_rows(path / split) != 0]
        if not kept:
            raise DatasetError(f"{path}: every split ({', '.join(splits) or 'none'}) is empty: no clips")
        return datasets.DatasetDict({split: datasets.load_from_disk(str(path / split)) for split in kept})
    if _saved_split_rows(path) == 0:
        raise DatasetError(f"{path}: the saved dataset is empty: no clips")
    return datasets.load_from_disk(str(path))


def _pool(opened, source) -> tuple:
    """All splits of a DatasetDict in one dataset (they must share their columns), and their fingerprints."""
    import datasets

    if not isinstance(opened, datasets.DatasetDict):
        parts, fingerprints = [opened], [opened._fingerprint]
    else:
        parts = [opened[split] for split in opened if len(opened[split])]
        fingerprints = [f"{split}:{opened[split]._fingerprint}" for split in opened]
        first = next(iter(opened))
        for split in opened:
            if opened[split].features != opened[first].features:
                a, b = opened[first].features, opened[split].features
                differ = sorted(c for c in set(a) | set(b) if a.get(c) != b.get(c))
                raise DatasetError(
                    f"{source}: splits {first!r} and {split!r} differ in column(s) {differ}; they cannot be pooled"
                )
    if not parts or not sum(len(part) for part in parts):
        raise DatasetError(f"{source}: the dataset is empty: no clips")
    return (datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]), fingerprints


def _open(source: str | Path):
    """(dataset with all splits pooled, a name safe for file paths, a key of its content)."""
    import datasets

    if str(source).startswith(HF_PREFIX):
        repo, config = parse_hf_spec(str(source))
        opened = datasets.load_dataset(repo, config)
        name = "hf-" + repo.replace("/", "--") + (f"--{config}" if config else "")
    else:
        opened = _load_saved(Path(source))
        name = "hf-" + re.sub(r"[^\w.-]+", "-", Path(source).resolve().name)
    pooled, fingerprints = _pool(opened, source)
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
        _check_label_texts(values, label_column)
        names = tuple(sorted(set(map(str, values))))
        index_of = {name: i for i, name in enumerate(names)}
        labels = np.array([index_of[str(v)] for v in values], dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if bad.size:
        raise DatasetError(f"row {bad[0]}, column {label_column!r}: label {labels[bad[0]]} has no class name")
    return labels, names


def _check_label_texts(values, column: str) -> None:
    """A missing or blank label would become a class of its own ("This is a sound of ."): refuse it."""
    for row, value in enumerate(values):
        if value is None or not str(value).strip():
            raise DatasetError(f"row {row}, column {column!r}: empty label {value!r}; every clip needs a class")


def _folds(dataset, labels: np.ndarray, seed: int, class_names=(), source: str = "dataset") -> np.ndarray:
    if FOLD_COLUMN not in dataset.features:
        return stratified_folds(labels, DEFAULT_FOLDS, seed, class_names, str(source))
    return np.array([_integer_fold(row, value) for row, value in enumerate(dataset[FOLD_COLUMN])], dtype=np.int64)


def _integer_fold(row: int, value) -> int:
    """An integer fold from an int, an integral float (2.0) or a string of an integer; 1.5 is refused, not truncated."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise DatasetError(f"row {row}, column {FOLD_COLUMN!r}: {value!r} is not an integer fold")


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
    folds = _folds(dataset, labels, seed, class_names, source)
    out_dir = Path(export_root) / f"{name}-{key}"
    filenames = _export_audio(dataset, audio_column, out_dir)
    if len(filenames) != len(labels):
        raise DatasetError(f"{out_dir / EXPORT_INDEX} lists {len(filenames)} clips, the dataset has {len(labels)}")
    return ClipTable(name, out_dir / "audio", filenames, labels, folds, class_names)
