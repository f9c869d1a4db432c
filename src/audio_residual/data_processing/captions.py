"""Captioned audio: clips with one or more captions each and an official split, no class labels.

Readers: Clotho v2.1 (`load_clotho`), AudioCaps (`load_audiocaps`: clips whose YouTube video vanished are
counted and listed in `CaptionTable.missing`, then skipped), any folder with a CSV `filename,caption,split`
(`load_caption_csv`) and Hugging Face datasets (`load_hf_captions`); `load_captions` picks one from the
layout. Metadata is validated up front with the same one-line `DatasetError`s as the labelled datasets.
A `CaptionTable` has the `name`, `audio_dir`, `filenames` and `paths()` the feature cache keys clips by,
so the same files in the same order share cached features with a labelled `ClipTable` (a clip is a clip).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audio_residual.data_processing.datasets import DatasetError, _check_inside, _line, _read_csv

SPLITS = ("train", "validation", "test")
# Split names as datasets spell them; Clotho's development / evaluation are its train / test.
SPLIT_ALIASES = {
    "train": "train", "training": "train", "development": "train", "dev": "train",
    "validation": "validation", "valid": "validation", "val": "validation",
    "test": "test", "evaluation": "test", "eval": "test",
}  # fmt: skip
CAPTIONS_CSV = "captions.csv"
CLOTHO_SPLITS = {"development": "train", "validation": "validation", "evaluation": "test"}
AUDIOCAPS_SPLITS = {"train": "train", "val": "validation", "test": "test"}
AUDIOCAPS_COLUMNS = ["audiocap_id", "youtube_id", "start_time", "caption"]
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
# AudioSet's segment file names, common in AudioCaps mirrors: `Y<youtube id>_<start>_<end>` (seconds, e.g. 30.000).
AUDIOSET_STEM = re.compile(r"(?P<id>.+)_(?P<start>\d+(?:\.\d+)?)_(?P<end>\d+(?:\.\d+)?)")


@dataclass(frozen=True, eq=False)
class CaptionTable:
    """One row per clip: its audio file, its captions (one or more) and its official split.

    `missing` lists (split, clip id, reason) of clips the metadata names but the folder lacks (skipped).
    """

    name: str
    audio_dir: Path
    filenames: tuple[str, ...]
    captions: tuple[tuple[str, ...], ...]
    splits: tuple[str, ...]
    missing: tuple[tuple[str, str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "audio_dir", Path(self.audio_dir))
        object.__setattr__(self, "filenames", tuple(self.filenames))
        object.__setattr__(self, "captions", tuple(tuple(c) for c in self.captions))
        object.__setattr__(self, "splits", tuple(self.splits))
        object.__setattr__(self, "missing", tuple(tuple(m) for m in self.missing))
        n = len(self.filenames)
        if len(self.captions) != n or len(self.splits) != n:
            raise ValueError(
                f"CaptionTable {self.name!r}: {n} filenames but {len(self.captions)} caption lists, "
                f"{len(self.splits)} splits"
            )
        bad = [s for s in self.splits if s not in SPLITS]
        if bad:
            raise ValueError(f"CaptionTable {self.name!r}: unknown split {bad[0]!r}; splits are {SPLITS}")
        empty = [i for i, c in enumerate(self.captions) if not c or not all(text.strip() for text in c)]
        if empty:
            raise ValueError(f"CaptionTable {self.name!r}: clip {self.filenames[empty[0]]!r} has an empty caption")

    def __len__(self) -> int:
        return len(self.filenames)

    def paths(self) -> list[Path]:
        return [self.audio_dir / filename for filename in self.filenames]

    def subset(self, indices: Sequence[int] | np.ndarray) -> CaptionTable:
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64)]
        return CaptionTable(
            self.name, self.audio_dir, [self.filenames[i] for i in idx], [self.captions[i] for i in idx],
            [self.splits[i] for i in idx], self.missing,
        )  # fmt: skip

    def rows(self, split: str) -> np.ndarray:
        """Row indices of the clips of `split` (train, validation or test)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def caption_pairs(self, rows: Sequence[int] | np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
        """Every caption of the given rows (default all) and, per caption, its clip's position in `rows`."""
        rows = range(len(self)) if rows is None else [int(r) for r in rows]
        texts, owner = [], []
        for position, row in enumerate(rows):
            texts += self.captions[row]
            owner += [position] * len(self.captions[row])
        return texts, np.array(owner, dtype=np.int64)

    def counts(self) -> dict[str, int]:
        """Clips per split, for messages and provenance."""
        return {split: self.splits.count(split) for split in SPLITS}


def _split_name(text: str, where: str) -> str:
    split = SPLIT_ALIASES.get(str(text).strip().lower())
    if split is None:
        raise DatasetError(f"{where}: unknown split {text!r}; use train, validation or test")
    return split


def _caption(text: str, where: str) -> str:
    text = str(text).strip()
    if not text:
        raise DatasetError(f"{where}: empty caption")
    return text


def load_caption_csv(
    audio_dir: Path | str,
    csv_path: Path | str | None = None,
    filename_col: str = "filename",
    caption_col: str = "caption",
    split_col: str = "split",
) -> CaptionTable:
    """A folder with a CSV of `filename,caption,split`; several rows of one file are its several captions."""
    audio_dir = Path(audio_dir)
    csv_path = audio_dir / CAPTIONS_CSV if csv_path is None else Path(csv_path)
    frame = _read_csv(csv_path, [filename_col, caption_col, split_col])
    _check_inside(tuple(frame[filename_col]), csv_path, filename_col)
    captions: dict[str, list[str]] = {}
    split_of: dict[str, tuple[str, int]] = {}
    for row, (filename, caption, split_text) in enumerate(
        zip(frame[filename_col], frame[caption_col], frame[split_col], strict=True)
    ):
        where = f"{csv_path}: line {_line(row)}"
        if not filename:
            raise DatasetError(f"{where}, column {filename_col!r}: empty filename")
        split = _split_name(split_text, f"{where}, column {split_col!r}")
        first = split_of.setdefault(filename, (split, row))
        if first[0] != split:
            raise DatasetError(
                f"{where}: {filename!r} is in split {split!r} here but {first[0]!r} on line {_line(first[1])}"
            )
        captions.setdefault(filename, []).append(_caption(caption, f"{where}, column {caption_col!r}"))
    names = list(captions)
    return CaptionTable("captions", audio_dir, names, [captions[n] for n in names], [split_of[n][0] for n in names])


def load_clotho(root: Path | str) -> CaptionTable:
    """Clotho v2.1: `clotho_audio_{development,validation,evaluation}/` + `clotho_captions_<split>.csv`
    (`file_name, caption_1..caption_5`); development is train, evaluation is test."""
    root = Path(root)
    present = [part for part in CLOTHO_SPLITS if (root / f"clotho_captions_{part}.csv").is_file()]
    if not present:
        raise DatasetError(f"{root}: no clotho_captions_{{development,validation,evaluation}}.csv found")
    filenames, captions, splits = [], [], []
    for part in present:
        csv_path = root / f"clotho_captions_{part}.csv"
        frame = _read_csv(csv_path, ["file_name", "caption_1"])
        caption_cols = [c for c in frame.columns if c.startswith("caption_")]
        _check_inside(tuple(frame["file_name"]), csv_path, "file_name")
        seen: dict[str, int] = {}
        for row, record in enumerate(frame.itertuples(index=False)):
            values = record._asdict()
            name = values["file_name"]
            if not name:
                raise DatasetError(f"{csv_path}: line {_line(row)}, column 'file_name': empty filename")
            if name in seen:
                raise DatasetError(
                    f"{csv_path}: line {_line(row)}: duplicate file_name {name!r} (first on line {_line(seen[name])})"
                )
            seen[name] = row
            texts = [_caption(values[c], f"{csv_path}: line {_line(row)}, column {c!r}") for c in caption_cols]
            filenames.append(f"clotho_audio_{part}/{name}")
            captions.append(texts)
            splits.append(CLOTHO_SPLITS[part])
    return CaptionTable("clotho", root, filenames, captions, splits)


def _audio_index(audio_dir: Path) -> dict[str | tuple[str, float], str]:
    """Stem → path relative to `audio_dir` of every audio file below it (first one wins); an AudioSet-style
    stem (`Y<id>_30.000_40.000`, `<id>_30.000_40.000`) is also indexed as (`Y<id>` or `<id>`, 30.0)."""
    index: dict[str | tuple[str, float], str] = {}
    for path in sorted(audio_dir.rglob("*")):
        if path.suffix.lower() in AUDIO_SUFFIXES and path.is_file():
            relative = path.relative_to(audio_dir).as_posix()
            index.setdefault(path.stem, relative)
            if match := AUDIOSET_STEM.fullmatch(path.stem):
                index.setdefault((match["id"], float(match["start"])), relative)
    return index


def _audiocaps_file(index: dict, audiocap_id: str, youtube_id: str, start: str) -> str | None:
    """The clip under the names AudioCaps downloaders use, the most specific first: AudioSet's
    `Y<id>_<start>_<end>` or `<id>_<start>_<end>` (start matched as a number), `<id>_<start>`, `Y<id>`, `<id>`,
    `<audiocap_id>`."""
    start_int = start.split(".")[0]
    try:
        seconds = float(start)
    except ValueError:
        seconds = None
    timed = [(f"Y{youtube_id}", seconds), (youtube_id, seconds)] if seconds is not None else []
    for key in (*timed, f"{youtube_id}_{start}", f"{youtube_id}_{start_int}", f"Y{youtube_id}", youtube_id,
                audiocap_id):  # fmt: skip
        if key in index:
            return index[key]
    return None


def load_audiocaps(root: Path | str, audio_subdir: str = "audio") -> CaptionTable:
    """AudioCaps: `train.csv`, `val.csv`, `test.csv` (`audiocap_id, youtube_id, start_time, caption`) and an
    audio folder. A clip is (youtube_id, start_time); its rows are its captions. Clips without a file
    (vanished YouTube videos) are counted in `missing` and skipped."""
    root = Path(root)
    audio_dir = root / audio_subdir
    if not audio_dir.is_dir():
        raise DatasetError(f"{root}: no audio folder {audio_subdir}/ for AudioCaps")
    present = [part for part in AUDIOCAPS_SPLITS if (root / f"{part}.csv").is_file()]
    if not present:
        raise DatasetError(f"{root}: no AudioCaps train.csv / val.csv / test.csv found")
    index = _audio_index(audio_dir)
    clips: dict[tuple[str, str], dict] = {}
    missing = []
    for part in present:
        csv_path = root / f"{part}.csv"
        frame = _read_csv(csv_path, AUDIOCAPS_COLUMNS)
        for row, (cap_id, yt, start, caption) in enumerate(frame[AUDIOCAPS_COLUMNS].itertuples(index=False)):
            where = f"{csv_path}: line {_line(row)}"
            if not yt:
                raise DatasetError(f"{where}, column 'youtube_id': empty")
            key, split = (yt, start), AUDIOCAPS_SPLITS[part]
            clip = clips.setdefault(key, {"split": split, "captions": [], "file": None, "row": row, "part": part})
            if clip["split"] != split:
                raise DatasetError(f"{where}: clip {yt}@{start} is also in {clip['part']}.csv")
            clip["captions"].append(_caption(caption, f"{where}, column 'caption'"))
            clip["file"] = clip["file"] or _audiocaps_file(index, cap_id, yt, start)
    kept = [clip for clip in clips.values() if clip["file"] is not None]
    missing = [(c["split"], f"{yt}_{start}", "no audio file") for (yt, start), c in clips.items() if c["file"] is None]
    return CaptionTable(
        "audiocaps", audio_dir, [c["file"] for c in kept], [c["captions"] for c in kept],
        [c["split"] for c in kept], missing,
    )  # fmt: skip


def is_clotho(path: Path) -> bool:
    return any((path / f"clotho_captions_{part}.csv").is_file() for part in CLOTHO_SPLITS)


def is_audiocaps(path: Path) -> bool:
    return any((path / f"{part}.csv").is_file() for part in AUDIOCAPS_SPLITS) and (path / "audio").is_dir()


def load_captions(data: str | Path, export_root: str | Path | None = None, caption_column: str | None = None) -> CaptionTable:
    """Pick the reader from the source: `hf:...` or a save_to_disk folder, Clotho, AudioCaps, or `captions.csv`."""
    from audio_residual.data_processing.hf import is_hf_source

    if is_hf_source(data):
        export_root = Path(export_root) if export_root is not None else Path("runs") / "hf_audio"
        return load_hf_captions(data, export_root, caption_column)
    path = Path(data)
    if is_clotho(path):
        return load_clotho(path)
    if is_audiocaps(path):
        return load_audiocaps(path)
    if (path / CAPTIONS_CSV).is_file():
        return load_caption_csv(path)
    raise DatasetError(
        f"cannot recognise captioned audio at {path}: expected Clotho (clotho_captions_*.csv + "
        "clotho_audio_*/), AudioCaps (train/val/test.csv + audio/), a folder with captions.csv "
        "(filename,caption,split) or hf:OWNER/NAME"
    )


CAPTION_COLUMN_NAMES = ("caption", "captions", "text", "sentence", "description")


def _caption_column(dataset, named: str | None) -> str:
    """The named caption column, or the one column with a caption-like name holding strings (or lists)."""
    if named is not None:
        if named not in dataset.features:
            raise DatasetError(f"no caption column {named!r}; columns: {list(dataset.features)}")
        return named
    found = [c for c in dataset.features if c.lower() in CAPTION_COLUMN_NAMES or c.lower().startswith("caption")]
    if len(found) != 1:
        raise DatasetError(
            f"cannot tell the caption column (candidates: {found or 'none'}); columns: {list(dataset.features)}; "
            "name it (--caption-column)"
        )
    return found[0]


def _split_parts(opened) -> list[tuple[str, object]]:
    """(official split, dataset) per part: DatasetDict split names, or a single dataset's `split` column."""
    import datasets

    if isinstance(opened, datasets.DatasetDict):
        return [(_split_name(name, f"dataset split {name!r}"), opened[name]) for name in opened]
    if "split" not in opened.features:
        raise DatasetError("a single dataset needs a 'split' column (train/validation/test) for captioned audio")
    return [(_split_name(s, "column 'split'"), opened.filter(lambda r, s=s: r["split"] == s))
            for s in sorted(set(opened["split"]))]  # fmt: skip


def load_hf_captions(source: str | Path, export_root: str | Path, caption_column: str | None = None) -> CaptionTable:
    """`hf:OWNER/NAME[:config]` or a save_to_disk folder; audio exported once as files (as `hf.py` does).

    A caption cell may be one string or a list of strings (several captions per clip).
    """
    import datasets

    from audio_residual.data_processing.hf import _column_of_type, _export_audio, _open

    _, name, key = _open(source)
    if str(source).startswith("hf:"):
        from audio_residual.data_processing.hf import parse_hf_spec

        opened = datasets.load_dataset(*parse_hf_spec(str(source)))
    else:
        opened = datasets.load_from_disk(str(source))
    parts = _split_parts(opened)
    pooled = datasets.concatenate_datasets([part for _, part in parts]) if len(parts) > 1 else parts[0][1]
    audio_column = _column_of_type(pooled, datasets.Audio, "Audio", preferred="audio")
    column = _caption_column(pooled, caption_column)
    captions = []
    for row, cell in enumerate(pooled[column]):
        texts = [cell] if isinstance(cell, str) else list(cell or [])
        if not texts:
            raise DatasetError(f"row {row}, column {column!r}: no caption")
        captions.append([_caption(t, f"row {row}, column {column!r}") for t in texts])
    splits = [split for split, part in parts for _ in range(len(part))]
    out_dir = Path(export_root) / f"{name}-captions-{key}"
    filenames = _export_audio(pooled, audio_column, out_dir)
    return CaptionTable(name, out_dir / "audio", filenames, captions, splits)
