"""Resumable ESC-50 download and path-safe extraction."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm.auto import tqdm

from audio_residual.data_processing.datasets import DatasetError, check_esc50_complete
from audio_residual.io import write_text

ESC50_URL = "https://github.com/karolpiczak/ESC-50/archive/master.zip"
ESC50_DIRNAME = "ESC-50-master"
_CHUNK_BYTES = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(OSError):
    """A download failed or arrived incomplete; the message says what failed and what to do next."""


def sha256_of(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _resume_point(url: str, part: Path, meta_path: Path) -> tuple[dict | None, int]:
    """The recorded metadata and the offset to resume from: 0 unless the partial file is known as `url`'s."""
    meta = _read_meta(meta_path)
    offset = part.stat().st_size if part.exists() else 0
    if offset and (meta is None or meta.get("url") != url):  # of unknown origin: never append to it
        offset = 0
    return meta, offset


def _open(url: str, offset: int, meta: dict | None, timeout: float) -> http.client.HTTPResponse | None:
    """The server's response, asking for the rest from `offset` only if the file is unchanged (`If-Range`).

    None when the server refuses the range (416): the partial file is unusable and the caller starts over.
    """
    headers = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the partial file is unusable, start over
            return None
        raise DownloadError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot download {url}: {reason}") from err


def _body_range(response, url: str, offset: int, meta: dict | None) -> tuple[int, int | None] | None:
    """Where the body starts in the file and the file's total length (None if unknown), from the headers.

    A 206 must carry `Content-Range` starting at `offset` with the recorded total, else it is another
    range or another file than the one we hold and the answer is None (restart); a 200 is the whole file.
    """
    total = None
    length = response.headers.get("Content-Length")
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range") or "")
        start = int(match.group(1)) if match else -1
        total = int(match.group(3)) if match and match.group(3) != "*" else None
        if start != offset or (offset and meta.get("total") not in (None, total)):
            if not offset:
                raise DownloadError(f"{url}: the server answered a plain request with a partial body")
            return None
    else:
        offset = 0
        total = int(length) if length is not None else None
    if total is None and length is not None:
        total = offset + int(length)
    return offset, total


def _stream(response, url: str, part: Path, offset: int, total: int | None, desc: str) -> int:
    """Append the body to `part` (written afresh when `offset` is 0); the size of `part` after.

    A connection lost mid-body raises `DownloadError` and leaves `part` in place, so a rerun resumes.
    """
    size = offset
    with (
        part.open("ab" if offset else "wb") as out,
        tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=desc) as progress,
    ):
        while True:
            try:
                chunk = response.read(_CHUNK_BYTES)
            except (http.client.HTTPException, OSError) as err:  # a cut chunked body, a reset, a timeout
                of_total = f" of {total}" if total is not None else ""
                raise DownloadError(
                    f"download of {url} stopped at {size}{of_total} bytes; rerun to resume from {part} "
                    f"(connection lost: {type(err).__name__})"
                ) from err
            if not chunk:
                break
            out.write(chunk)
            size += len(chunk)
            progress.update(len(chunk))
    return size


def _check_whole(
    url: str, part: Path, meta_path: Path, size: int, total: int | None, sha256: str | None
) -> None:
    """Refuse a body short of, or beyond, its declared length, or with the wrong sha256.

    A short body keeps `part` for a resume; a long one or a wrong digest cannot be resumed and is deleted.
    """
    if total is not None and size < total:
        raise DownloadError(f"download of {url} stopped at {size} of {total} bytes; rerun to resume from {part}")
    if total is not None and size > total:
        _discard(part, meta_path)
        raise DownloadError(f"download of {url} gave {size} bytes, more than the {total} declared; rerun")
    if sha256 is not None and (seen := sha256_of(part)) != sha256:
        _discard(part, meta_path)
        raise DownloadError(
            f"download of {url} has sha256 {seen}, expected {sha256}; the partial file was deleted, rerun"
        )


def download_file(url: str, dest: Path | str, timeout: float = 60.0, sha256: str | None = None) -> Path:
    """Download `url` to `dest` via `dest.part`, resuming a previous partial download when it is safe.

    `dest.part.json` records the URL, the server's validator (ETag or Last-Modified) and the total
    length; a partial file without it, or from another URL, is restarted. A resume sends `If-Range`, so
    a server whose file changed answers 200 (restart), and a 206 must carry `Content-Range` starting
    at our offset with the recorded total, or the partial file is restarted. The body must reach the
    declared length; `sha256`, when given, is checked before `dest` appears (a mismatch deletes the
    partial file). Failures raise `DownloadError` saying whether a rerun resumes.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    meta_path = part.with_name(part.name + ".json")
    meta, offset = _resume_point(url, part, meta_path)
    response = _open(url, offset, meta, timeout)
    if response is None:  # the server refused the range: the partial file is unusable, start over
        _discard(part, meta_path)
        return download_file(url, dest, timeout, sha256)
    with response:
        body = _body_range(response, url, offset, meta)
        if body is None:
            _discard(part, meta_path)  # another range or another file than the one we hold
            return download_file(url, dest, timeout, sha256)
        offset, total = body
        if not offset:
            dest.parent.mkdir(parents=True, exist_ok=True)
            validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
            meta_path.write_text(json.dumps({"url": url, "validator": validator, "total": total}))
        size = _stream(response, url, part, offset, total, dest.name)
    _check_whole(url, part, meta_path, size, total, sha256)
    os.replace(part, dest)
    _discard(meta_path)
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


def _zip_problem(zip_path: Path) -> str | None:
    """Why `zip_path` is not a whole zip archive (unreadable directory, a member failing its CRC), or None."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return str(err)
    return f"member {bad!r} fails its CRC check" if bad else None


def verify_archive(zip_path: Path) -> None:
    """Check `zip_path` against the checksum recorded beside it, or record one for a whole archive.

    ESC-50 publishes no official checksum, so the first whole archive seen is trusted and its SHA-256
    kept in `<zip>.sha256`; later downloads and re-extractions are checked against it.
    """
    checksum_path = zip_path.with_name(zip_path.name + ".sha256")
    digest = sha256_of(zip_path)
    if checksum_path.is_file():
        expected = checksum_path.read_text().split()[0]
        if digest != expected:
            raise DatasetError(
                f"{zip_path} has sha256 {digest}, not the {expected} recorded at its first download in "
                f"{checksum_path}: delete {zip_path} and rerun (delete {checksum_path.name} as well if the "
                "upstream archive really changed)"
            )
        return
    problem = _zip_problem(zip_path)
    if problem:
        raise DatasetError(
            f"{zip_path} is incomplete or corrupt ({problem}): delete it and rerun to download it again"
        )
    write_text(checksum_path, f"{digest}  {zip_path.name}\n")
    tqdm.write(
        f"ESC-50 publishes no official checksum: recorded sha256 {digest} of this archive in {checksum_path}; "
        "later downloads are checked against it",
        file=sys.stderr,
    )


def ensure_esc50(root: Path | None = None, cache_dir: Path = Path("data")) -> Path:
    """Path of a complete ESC-50 copy: `root` if given, else `cache_dir/ESC-50-master`, downloading it.

    An explicitly given but incomplete `root` is an error rather than a silent 600 MB download. An
    archive that is corrupt, differs from its recorded checksum or lacks clips is reported with the
    advice to delete it, rather than extracted again on every run.
    """
    if root is not None:
        check_esc50_complete(root)
        return Path(root)
    cache_dir = Path(cache_dir)
    extracted = cache_dir / ESC50_DIRNAME
    if _is_complete_esc50(extracted):
        return extracted
    zip_path = cache_dir / f"{ESC50_DIRNAME}.zip"
    checksum_path = zip_path.with_name(zip_path.name + ".sha256")
    if not zip_path.exists():
        recorded = checksum_path.read_text().split()[0] if checksum_path.is_file() else None
        try:
            download_file(ESC50_URL, zip_path, sha256=recorded)
        except DownloadError as err:
            raise DownloadError(
                f"{err}. To use a local copy instead, get ESC-50 (github.com/karolpiczak/ESC-50), unpack it "
                f"and pass --data /path/to/{ESC50_DIRNAME}"
            ) from err
    verify_archive(zip_path)
    staging = Path(tempfile.mkdtemp(prefix=".esc50-extract-", dir=cache_dir))
    try:
        safe_extract(zip_path, staging)
        unpacked = staging / ESC50_DIRNAME
        if not unpacked.is_dir():
            raise DatasetError(f"{zip_path} has no top-level {ESC50_DIRNAME}/ folder; delete it and rerun")
        if extracted.exists():
            shutil.rmtree(extracted)
        os.replace(unpacked, extracted)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        check_esc50_complete(extracted)
    except DatasetError as err:
        raise DatasetError(f"{err}; the archive {zip_path} lacks them: delete it and rerun") from err
    return extracted
