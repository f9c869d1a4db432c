"""Resumable ESC-50 download and path-safe extraction."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm.auto import tqdm

from audio_residual.data_processing.datasets import DatasetError, check_esc50_complete

ESC50_URL = "https://github.com/karolpiczak/ESC-50/archive/master.zip"
ESC50_DIRNAME = "ESC-50-master"
_CHUNK_BYTES = 1 << 20


def download_file(url: str, dest: Path | str, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` via `dest.part`, resuming a previous partial download when possible.

    A server answering 206 to our Range request continues the partial file; one answering 200
    ignores Range, so the partial file is restarted. `dest` appears only once the body is complete.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:  # 416: the partial file is unusable, start over
            raise
        part.unlink()
        return download_file(url, dest, timeout)
    with response:
        resuming = offset > 0 and response.status == 206
        if not resuming:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            part.open("ab" if resuming else "wb") as out,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name) as progress,
        ):
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                progress.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise OSError(f"download of {url} stopped at {size} of {total} bytes; rerun to resume from {part}")
    os.replace(part, dest)
    return dest


def _is_symlink(member: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(member.external_attr >> 16)


def safe_extract(zip_path: Path | str, target: Path | str) -> Path:
    """Extract `zip_path` into `target`, refusing the whole archive if any member could escape it."""
    target = Path(target)
    root = target.resolve()
    with zipfile.ZipFile(zip_path) as archive:
        for member in archive.infolist():
            name = member.filename
            if (
                PurePosixPath(name).is_absolute()
                or PureWindowsPath(name).is_absolute()
                or name.startswith("\\")
            ):
                raise ValueError(f"{zip_path}: refusing absolute member path {name!r}")
            if _is_symlink(member):
                raise ValueError(f"{zip_path}: refusing symlink member {name!r}")
            if not (root / name).resolve().is_relative_to(root):
                raise ValueError(f"{zip_path}: refusing member {name!r} that escapes {target}")
        target.mkdir(parents=True, exist_ok=True)
        archive.extractall(target)
    return target


def _is_complete_esc50(root: Path) -> bool:
    try:
        check_esc50_complete(root)
    except DatasetError:
        return False
    return True


def ensure_esc50(root: Path | None = None, cache_dir: Path = Path("data")) -> Path:
    """Path of a complete ESC-50 copy: `root` if given, else `cache_dir/ESC-50-master`, downloading it.

    An explicitly given but incomplete `root` is an error rather than a silent 600 MB download.
    """
    if root is not None:
        check_esc50_complete(root)
        return Path(root)
    cache_dir = Path(cache_dir)
    extracted = cache_dir / ESC50_DIRNAME
    if _is_complete_esc50(extracted):
        return extracted
    zip_path = cache_dir / f"{ESC50_DIRNAME}.zip"
    if not zip_path.exists():
        download_file(ESC50_URL, zip_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".esc50-extract-", dir=cache_dir))
    try:
        try:
            safe_extract(zip_path, staging)
        except zipfile.BadZipFile as err:
            raise DatasetError(f"{zip_path} is not a valid zip archive; delete it and rerun") from err
        unpacked = staging / ESC50_DIRNAME
        if not unpacked.is_dir():
            raise DatasetError(f"{zip_path} has no top-level {ESC50_DIRNAME}/ folder; delete it and rerun")
        if extracted.exists():
            shutil.rmtree(extracted)
        os.replace(unpacked, extracted)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    check_esc50_complete(extracted)
    return extracted
