"""Clip tables for ESC-50, UrbanSound8K, GTZAN and generic CSV datasets.

Every loader validates its metadata up front and raises `DatasetError` naming the file, line and
column at fault, so a broken download or a hand-edited CSV fails before any audio is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

ESC50_CSV = Path("meta") / "esc50.csv"
ESC50_FOLDS = (1, 2, 3, 4, 5)
URBANSOUND8K_CSV = Path("metadata") / "UrbanSound8K.csv"
URBANSOUND8K_FOLDS = tuple(range(1, 11))
GTZAN_DIRS = ("genres", "genres_original")  # the Marsyas archive's folder, and Kaggle's copy's
GTZAN_SUFFIXES = (".wav", ".au")
GTZAN_FOLDS = 10


class DatasetError(ValueError):
    """Dataset metadata is missing, malformed or inconsistent with the audio folder."""


@dataclass(frozen=True, eq=False)
class ClipTable:
    """One row per clip: where the audio lives, its class index and its cross-validation fold.

    `eq=False` because element-wise array comparison has no single truth value; compare fields instead.
    """

    name: str
    audio_dir: Path
    filenames: tuple[str, ...]
    labels: np.ndarray
    folds: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64)  # private read-only copies: the table is immutable
        folds = np.array(self.folds, dtype=np.int64)
        n = len(self.filenames)
        if labels.shape != (n,) or folds.shape != (n,):
            raise ValueError(
                f"ClipTable {self.name!r}: {n} filenames but labels {labels.shape}, folds {folds.shape}"
            )
        if n and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"ClipTable {self.name!r}: labels outside 0..{len(self.class_names) - 1}")
        labels.flags.writeable = False
        folds.flags.writeable = False
        object.__setattr__(self, "audio_dir", Path(self.audio_dir))
        object.__setattr__(self, "filenames", tuple(self.filenames))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "folds", folds)

    def __len__(self) -> int:
        return len(self.filenames)

    def paths(self) -> list[Path]:
        return [self.audio_dir / filename for filename in self.filenames]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ClipTable:
        """Rows `indices` in the given order; class names are kept so label indices stay comparable."""
        idx = np.asarray(indices, dtype=np.int64)
        return ClipTable(
            name=self.name,
            audio_dir=self.audio_dir,
            filenames=tuple(self.filenames[i] for i in idx),
            labels=self.labels[idx],
            folds=self.folds[idx],
            class_names=self.class_names,
        )

    @property
    def fold_ids(self) -> tuple[int, ...]:
        return tuple(int(f) for f in np.unique(self.folds))


def _line(row: int) -> int:
    """CSV line number of data row `row` (line 1 is the header), as an editor shows it."""
    return row + 2


def _read_csv(csv_path: Path, required_columns: Sequence[str]) -> pd.DataFrame:
    if not csv_path.is_file():
        raise DatasetError(f"metadata file not found: {csv_path}")
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except pd.errors.ParserError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatasetError(_separator_hint(csv_path) or f"{csv_path}: not a readable CSV ({first})") from err
    except pd.errors.EmptyDataError as err:
        raise DatasetError(f"{csv_path}: the CSV is empty (no header, no rows)") from err
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{csv_path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "save it as UTF-8"
        ) from err
    missing = [column for column in required_columns if column not in frame.columns]
    if missing:
        raise DatasetError(_separator_hint(csv_path)
                           or f"{csv_path}: missing column(s) {missing}; columns present: {list(frame.columns)}")
    if frame.empty:
        raise DatasetError(f"{csv_path}: the CSV has a header but no rows")
    return frame


def _separator_hint(csv_path: Path) -> str | None:
    """A message naming the separator when the header is split by ';', tab or '|' rather than commas."""
    with csv_path.open(encoding="utf-8", errors="replace") as handle:
        header = handle.readline()
    found = [sep for sep in (";", "\t", "|") if header.count(sep) > header.count(",")]
    if not found:
        return None
    name = {"\t": "tabs"}.get(found[0], repr(found[0]))
    return f"{csv_path}: columns are separated by {name}, not commas; save it comma-separated"


def _int_column(frame: pd.DataFrame, column: str, csv_path: Path) -> np.ndarray:
    values = np.empty(len(frame), dtype=np.int64)
    for row, text in enumerate(frame[column]):
        try:
            values[row] = int(text)
        except ValueError as err:
            raise DatasetError(
                f"{csv_path}: line {_line(row)}, column {column!r}: {text!r} is not an integer"
            ) from err
    return values


def _check_folds(folds: np.ndarray, allowed: Sequence[int], csv_path: Path, column: str) -> None:
    bad_rows = np.flatnonzero(~np.isin(folds, allowed))
    if bad_rows.size:
        row = int(bad_rows[0])
        raise DatasetError(
            f"{csv_path}: line {_line(row)}, column {column!r}: unknown fold {folds[row]}; "
            f"folds must be {min(allowed)}..{max(allowed)} ({bad_rows.size} bad row(s))"
        )


def _escapes(filename: str) -> bool:
    """Whether a CSV filename could point outside the audio folder (absolute, drive-rooted, or `..`)."""
    posix, windows = PurePosixPath(filename), PureWindowsPath(filename)
    return (
        posix.is_absolute()
        or bool(windows.drive or windows.root)
        or ".." in posix.parts
        or ".." in windows.parts
    )


def _check_inside(filenames: Sequence[str], csv_path: Path, column: str) -> None:
    """Refuse, before any audio is read, a filename that would read a file outside the audio folder."""
    for row, filename in enumerate(filenames):
        if _escapes(filename):
            raise DatasetError(
                f"{csv_path}: line {_line(row)}, column {column!r}: filename {filename!r} points outside "
                "the audio folder (absolute or '..'); give paths relative to it"
            )


def _check_named(labels: Sequence[str], csv_path: Path, column: str) -> None:
    """A blank label would become a class of its own (prompt "This is a sound of ."): refuse it."""
    for row, label in enumerate(labels):
        if not label.strip():
            raise DatasetError(f"{csv_path}: line {_line(row)}, column {column!r}: empty label; every clip needs a class")


def _check_unique(filenames: Sequence[str], csv_path: Path, column: str) -> None:
    _check_inside(filenames, csv_path, column)
    first_row: dict[str, int] = {}
    for row, filename in enumerate(filenames):
        if not filename:
            raise DatasetError(f"{csv_path}: line {_line(row)}, column {column!r}: empty filename")
        if filename in first_row:
            raise DatasetError(
                f"{csv_path}: line {_line(row)}, column {column!r}: duplicate filename {filename!r} "
                f"(first on line {_line(first_row[filename])})"
            )
        first_row[filename] = row


def _class_names_from_ids(
    ids: np.ndarray, names: Sequence[str], csv_path: Path, id_column: str, name_column: str
) -> tuple[str, ...]:
    """Class names ordered by id, requiring ids 0..K-1 and a one-to-one id <-> name mapping."""
    id_to_name: dict[int, str] = {}
    name_to_id: dict[str, int] = {}
    for row, (class_id, name) in enumerate(zip(ids.tolist(), names, strict=True)):
        if id_to_name.setdefault(class_id, name) != name or name_to_id.setdefault(name, class_id) != class_id:
            raise DatasetError(
                f"{csv_path}: line {_line(row)}: {id_column}={class_id} with {name_column}={name!r} "
                f"contradicts earlier rows ({id_column}={class_id} -> {id_to_name[class_id]!r}, "
                f"{name!r} -> {id_column}={name_to_id.get(name)})"
            )
    n_classes = len(id_to_name)
    bad_rows = np.flatnonzero((ids < 0) | (ids >= n_classes))
    if bad_rows.size:
        row = int(bad_rows[0])
        raise DatasetError(
            f"{csv_path}: line {_line(row)}, column {id_column!r}: {ids[row]} is outside the class list "
            f"0..{n_classes - 1} ({n_classes} distinct {name_column} values)"
        )
    return tuple(id_to_name[class_id] for class_id in range(n_classes))


def load_esc50(root: Path | str) -> ClipTable:
    """ESC-50 layout: `meta/esc50.csv` and `audio/`. Works for partial or generated copies of any size."""
    root = Path(root)
    csv_path = root / ESC50_CSV
    frame = _read_csv(csv_path, ["filename", "fold", "target", "category"])
    filenames = tuple(frame["filename"])
    _check_unique(filenames, csv_path, "filename")
    folds = _int_column(frame, "fold", csv_path)
    _check_folds(folds, ESC50_FOLDS, csv_path, "fold")
    targets = _int_column(frame, "target", csv_path)
    _check_named(list(frame["category"]), csv_path, "category")
    class_names = _class_names_from_ids(targets, list(frame["category"]), csv_path, "target", "category")
    return ClipTable("esc50", root / "audio", filenames, targets, folds, class_names)


def check_esc50_complete(root: Path | str, expected_rows: int = 2000) -> ClipTable:
    """Raise `DatasetError` unless the CSV has `expected_rows` rows and every listed wav exists."""
    root = Path(root)
    table = load_esc50(root)
    missing = [path.name for path in table.paths() if not path.is_file()]
    problems = []
    if len(table) != expected_rows:
        problems.append(f"{root / ESC50_CSV} has {len(table)} rows, expected {expected_rows}")
    if missing:
        problems.append(
            f"{len(missing)} of {len(table)} audio files missing from {table.audio_dir} "
            f"(first: {', '.join(missing[:5])})"
        )
    if problems:
        raise DatasetError(f"ESC-50 at {root} is incomplete: " + "; ".join(problems))
    return table


def load_urbansound8k(root: Path | str) -> ClipTable:
    """UrbanSound8K layout: `metadata/UrbanSound8K.csv` and `audio/fold{k}/`."""
    root = Path(root)
    csv_path = root / URBANSOUND8K_CSV
    frame = _read_csv(csv_path, ["slice_file_name", "fold", "classID", "class"])
    folds = _int_column(frame, "fold", csv_path)
    _check_folds(folds, URBANSOUND8K_FOLDS, csv_path, "fold")
    _check_inside(tuple(frame["slice_file_name"]), csv_path, "slice_file_name")
    filenames = tuple(
        f"fold{fold}/{name}" for fold, name in zip(folds.tolist(), frame["slice_file_name"], strict=True)
    )
    _check_unique(filenames, csv_path, "slice_file_name")
    class_ids = _int_column(frame, "classID", csv_path)
    _check_named(list(frame["class"]), csv_path, "class")
    class_names = _class_names_from_ids(class_ids, list(frame["class"]), csv_path, "classID", "class")
    return ClipTable("urbansound8k", root / "audio", filenames, class_ids, folds, class_names)


def load_csv_dataset(
    audio_dir: Path | str,
    csv_path: Path | str,
    filename_col: str = "filename",
    label_col: str = "label",
    fold_col: str = "fold",
    class_names: Sequence[str] | None = None,
) -> ClipTable:
    """Any dataset described by a CSV of (filename, string label, integer fold).

    Labels map to sorted class names unless `class_names` fixes the order (e.g. to match prompts).
    """
    csv_path = Path(csv_path)
    frame = _read_csv(csv_path, [filename_col, label_col, fold_col])
    filenames = tuple(frame[filename_col])
    _check_unique(filenames, csv_path, filename_col)
    folds = _int_column(frame, fold_col, csv_path)
    label_texts = list(frame[label_col])
    _check_named(label_texts, csv_path, label_col)
    names = tuple(sorted(set(label_texts))) if class_names is None else tuple(class_names)
    if len(set(names)) != len(names):
        raise DatasetError(f"class_names for {csv_path} contain duplicates: {list(names)}")
    index_of = {name: i for i, name in enumerate(names)}
    labels = np.empty(len(frame), dtype=np.int64)
    for row, text in enumerate(label_texts):
        if text not in index_of:
            raise DatasetError(
                f"{csv_path}: line {_line(row)}, column {label_col!r}: label {text!r} is not in the "
                f"class list ({len(names)} classes: {list(names)[:10]}{' ...' if len(names) > 10 else ''})"
            )
        labels[row] = index_of[text]
    return ClipTable("csv", Path(audio_dir), filenames, labels, folds, names)


def stratified_folds(
    labels: np.ndarray, n_folds: int, seed: int, class_names: Sequence[str] = (), dataset: str = "dataset"
) -> np.ndarray:
    """Fold ids 1..n_folds per row for datasets without official folds: class-balanced and seeded.

    Every class needs at least `n_folds` clips (one per test fold); a smaller one is a `DatasetError`
    naming the dataset, the class and the rule.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    small = [c for c in range(len(counts)) if 0 < counts[c] < n_folds] or ([] if len(labels) >= n_folds else [0])
    if small:
        c = small[0]
        name = class_names[c] if c < len(class_names) else str(c)
        raise DatasetError(
            f"{dataset}: class {name!r} has {int(counts[c]) if len(counts) else 0} clip(s), but its {n_folds} "
            f"stratified folds need at least {n_folds} clips per class ({len(small)} class(es) too small)"
        )
    folds = np.zeros(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels), start=1):
        folds[test] = fold
    return folds


def visible(folder: Path) -> list[Path]:
    """Entries of `folder` minus hidden ones (`.ipynb_checkpoints/`, macOS `._x.au` forks): never data."""
    return [entry for entry in folder.iterdir() if not entry.name.startswith(".")]


def _gtzan_genres_dir(root: Path) -> Path | None:
    return next((root / name for name in GTZAN_DIRS if (root / name).is_dir()), None)


def load_gtzan(root: Path | str, seed: int = 0) -> ClipTable:
    """GTZAN genres: `genres/<genre>/<genre>.000NN.wav` (or `.au`, or Kaggle's `genres_original/`).

    GTZAN has no official folds. This gives 10 stratified folds drawn with `seed` (10 clips per genre
    per fold on the full 10 × 100 set), not Sturm's fault-filtered artist split: clips of one artist
    can fall on both sides, so accuracies are optimistic and not comparable with fault-filtered figures.
    Classes are the genre folders in sorted order; 30 s clips are cropped by the feature cache as usual.
    """
    root = Path(root)
    genres_dir = _gtzan_genres_dir(root)
    if genres_dir is None:
        raise DatasetError(f"{root}: no GTZAN folder ({' or '.join(GTZAN_DIRS)}/<genre>/) found")
    genres = sorted(d.name for d in visible(genres_dir) if d.is_dir())
    filenames, labels = [], []
    for label, genre in enumerate(genres):
        clips = sorted(f for f in visible(genres_dir / genre) if f.suffix.lower() in GTZAN_SUFFIXES)
        if not clips:
            raise DatasetError(f"{genres_dir / genre}: genre folder holds no {'/'.join(GTZAN_SUFFIXES)} files")
        filenames += [f"{genres_dir.name}/{genre}/{clip.name}" for clip in clips]
        labels += [label] * len(clips)
    if len(genres) < 2:
        raise DatasetError(f"{genres_dir}: GTZAN needs at least 2 genre folders, found {genres}")
    labels = np.array(labels, dtype=np.int64)
    folds = stratified_folds(labels, GTZAN_FOLDS, seed, genres, f"GTZAN at {genres_dir}")
    return ClipTable("gtzan", root, filenames, labels, folds, genres)


def load_dataset(path: Path | str) -> ClipTable:
    """Pick the loader from the folder layout."""
    path = Path(path)
    if (path / ESC50_CSV).is_file():
        return load_esc50(path)
    if (path / URBANSOUND8K_CSV).is_file():
        return load_urbansound8k(path)
    if _gtzan_genres_dir(path) is not None:
        return load_gtzan(path)
    raise DatasetError(
        f"cannot recognise a dataset at {path}: expected ESC-50 ({ESC50_CSV} + audio/), "
        f"UrbanSound8K ({URBANSOUND8K_CSV} + audio/fold1..10/) or GTZAN (genres/<genre>/*.wav); for other "
        "data give a CSV of filename,label,fold (--csv FILE, filenames relative to the folder)"
    )
