"""Atomic writes: a crash never leaves a half-written result behind (temp file + os.replace).

Temporary files are created private (mode 0600); `umask_mode` gives the final file the mode a plain
`open()` would have had, so results stay readable by whoever the user's umask allows.

Keyed stores shared by concurrent writers (several W&B agents or `experiment` runs on one `--out`) go
through `update_csv` / `update_json`: under an exclusive lock on the store's folder, the store is
re-read and merged by key before the atomic replace, so no writer's rows are lost.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def umask_mode(path: str | Path) -> None:
    """Set `path` to 0666 minus the process umask, as if `open()` had created it."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(err: BaseException, path: str | Path) -> OSError | None:
    """`err` as an OSError naming `path` when it says the disk (or quota, or file-size limit) is full, else None.

    Libraries report it their own way (safetensors: "I/O error: No space left on device (os error 28)"),
    and Python's own OSError from a write() names no file.
    """
    code = getattr(err, "errno", None)
    if code is None and ("No space left on device" in str(err) or "(os error 28)" in str(err)):
        code = errno.ENOSPC
    if code not in DISK_FULL:
        return None
    return OSError(code, f"{os.strerror(code)} while writing it; free space there and rerun", str(path))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path`, on error it is deleted.

    A full disk becomes an OSError naming `path` (`disk_full`), whichever library was writing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        umask_mode(tmp)
        os.replace(tmp, path)
    except Exception as err:
        full = disk_full(err, path)
        if full is None:
            raise
        raise full from err
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_npz(path: str | Path, arrays: dict, compressed: bool = False) -> Path:
    """Arrays in one .npz (no pickle), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        (np.savez_compressed if compressed else np.savez)(handle, **arrays)
    return Path(path)


def read_keyed_npz(path: str | Path, key: str) -> dict[str, np.ndarray] | None:
    """A stored .npz's arrays if its `key` array matches (None if missing, stale or unreadable: recompute it)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            return {name: stored[name] for name in stored.files}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def write_csv(path: str | Path, frame: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


LOCK_FILE = ".audio-residual.lock"  # used only where a folder itself cannot be locked (NFS)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on the folder holding `path` while the block runs.

    Every writer of a shared store takes it around read-merge-replace, so concurrent processes take
    turns. The folder itself is locked, which leaves no file behind; where the file system refuses that
    (NFS emulates flock with write locks, which need a writable file) a hidden lock file in the folder is
    locked instead. Not re-entrant: do not nest two `locked` blocks on one folder in one process. Without
    `fcntl` (Windows) there is no lock.
    """
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _key_text(value) -> str:
    """One cell of a key as text, equal for 3 and 3.0 and for NaN, None and "" (a CSV round trip's variants)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _keys(frame: pd.DataFrame, key_columns: Sequence[str]) -> list[tuple[str, ...]]:
    columns = [frame[c] if c in frame else pd.Series([None] * len(frame), index=frame.index) for c in key_columns]
    return [tuple(_key_text(v) for v in values) for values in zip(*columns, strict=True)] if columns else []


def update_csv(
    path: str | Path, rows: pd.DataFrame, key_columns: Sequence[str], dtype: dict | None = None
) -> pd.DataFrame:
    """Insert or replace `rows` in the CSV store at `path`, keyed by `key_columns`, safe under concurrent writers.

    Under `locked(path)`, the file is re-read, rows with a key in `rows` are dropped, `rows` appended and
    the result written atomically; returns the table now on disk (other writers' rows included).
    """
    path = Path(path)
    with locked(path):
        stored = pd.read_csv(path, dtype=dtype) if path.is_file() and path.stat().st_size else pd.DataFrame()
        if stored.empty:
            merged = rows.reset_index(drop=True)
        else:
            new_keys = set(_keys(rows, key_columns))
            keep = [key not in new_keys for key in _keys(stored, key_columns)]
            merged = pd.concat([stored[keep], rows], ignore_index=True) if any(keep) else rows.reset_index(drop=True)
        write_csv(path, merged)
    return merged


def update_json(path: str | Path, update: Callable[[dict | None], dict], write: Callable | None = None) -> dict:
    """Read-modify-write of a JSON store under `locked(path)`: `update(what is on disk, or None)` → new content.

    `write(path, data)` defaults to `write_json`; unreadable content counts as None (an interrupted store).
    """
    path = Path(path)
    with locked(path):
        current = None
        if path.is_file():
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                current = json.loads(path.read_text(encoding="utf-8"))
        data = update(current)
        (write or write_json)(path, data)
    return data


def preallocate(path: str | Path, size: int) -> None:
    """Reserve `size` bytes for `path` now (posix_fallocate), so a full disk is an OSError naming the file
    here, not a SIGBUS ("Bus error") when a memory-mapped page is first written."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: the first write to a page may still fail
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return  # the file system cannot preallocate (some network mounts): nothing to reserve
        raise OSError(err.errno, f"cannot reserve {size / 2**20:.1f} MiB ({os.strerror(err.errno)})", str(path)) from None
    finally:
        os.close(fd)


def digest(value) -> str:
    """A short stable hash of a JSON-able value: how stored results, statistics and sweep rows are keyed."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_figure(fig, path: str | Path, dpi: int = 150) -> Path:
    """A matplotlib figure as PNG, written atomically (a crash never leaves a truncated image)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)
