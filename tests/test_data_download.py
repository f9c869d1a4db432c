"""Download and extraction, against a loopback HTTP server only: resume, restart, path-safety, completeness."""

import http.server
import os
import re
import stat
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

import audio_residual.data_processing.download as download_module
from audio_residual.data_processing import (
    DatasetError,
    check_esc50_complete,
    download_file,
    ensure_esc50,
    safe_extract,
)
from audio_residual.data_processing.synthetic import make_synthetic_esc50

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB, larger than one read chunk


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from `files`; honours `Range: bytes=N-` unless `supports_range` is False."""

    files: dict[str, bytes] = {}
    supports_range = True
    requests: list[str | None] = []

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        requested = self.headers.get("Range")
        type(self).requests.append(requested)
        match = re.fullmatch(r"bytes=(\d+)-", requested or "")
        if match and self.supports_range:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("Handler", (RangeHandler,), {"files": {}, "requests": [], "supports_range": True})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fresh_download(server, tmp_path):
    handler, base = server
    handler.files["/a.zip"] = PAYLOAD
    dest = download_file(f"{base}/a.zip", tmp_path / "a.zip")
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "a.zip.part").exists()
    assert handler.requests == [None]


def test_resume_from_part_file(server, tmp_path):
    handler, base = server
    handler.files["/a.zip"] = PAYLOAD
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD[:300_000])
    dest = download_file(f"{base}/a.zip", tmp_path / "a.zip")
    assert dest.read_bytes() == PAYLOAD
    assert handler.requests == ["bytes=300000-"]


def test_restart_when_server_ignores_range(server, tmp_path):
    handler, base = server
    handler.files["/a.zip"] = PAYLOAD
    handler.supports_range = False
    (tmp_path / "a.zip.part").write_bytes(b"stale bytes that must not survive")
    dest = download_file(f"{base}/a.zip", tmp_path / "a.zip")
    assert dest.read_bytes() == PAYLOAD


def test_short_body_keeps_part_for_resume(server, tmp_path, monkeypatch):
    handler, base = server
    handler.files["/a.zip"] = PAYLOAD

    def lying_length(self):  # announce more bytes than sent, like a dropped connection
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(PAYLOAD[:1000])

    monkeypatch.setattr(handler, "do_GET", lying_length)
    with pytest.raises(OSError, match=r"stopped at 1000 of 1024000 bytes; rerun to resume"):
        download_file(f"{base}/a.zip", tmp_path / "a.zip")
    assert not (tmp_path / "a.zip").exists()
    assert (tmp_path / "a.zip.part").stat().st_size == 1000


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("evil", ["../evil.txt", "a/../../evil.txt", "/tmp/evil.txt"])
def test_safe_extract_refuses_escaping_members(tmp_path, evil):
    archive = make_zip(tmp_path / "x.zip", {"ok.txt": b"fine", evil: b"pwned"})
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="refusing"):
        safe_extract(archive, target)
    assert not target.exists() or not any(target.iterdir())  # nothing extracted, not even ok.txt
    assert not (tmp_path / "evil.txt").exists()


def test_safe_extract_refuses_symlinks(tmp_path):
    archive_path = tmp_path / "x.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        link = zipfile.ZipInfo("link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ValueError, match="symlink"):
        safe_extract(archive_path, tmp_path / "out")


def test_safe_extract_normal_archive(tmp_path):
    archive = make_zip(tmp_path / "x.zip", {"d/a.txt": b"a", "b.txt": b"b"})
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "d" / "a.txt").read_bytes() == b"a"


def test_ensure_esc50_downloads_extracts_and_checks(server, tmp_path, monkeypatch):
    """End to end with a tiny ESC-50-shaped archive; expected_rows shrunk to its size."""
    handler, base = server
    source = make_synthetic_esc50(
        tmp_path / "src" / "ESC-50-master", n_classes=2, clips_per_class=5, seconds=0.5
    )
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(source.rglob("*")):
            zf.write(file, file.relative_to(source.parent).as_posix())
    handler.files["/master.zip"] = archive.read_bytes()
    monkeypatch.setattr(download_module, "ESC50_URL", f"{base}/master.zip")
    monkeypatch.setattr(
        download_module, "check_esc50_complete", partial(check_esc50_complete, expected_rows=10)
    )
    root = ensure_esc50(cache_dir=tmp_path / "cache")
    assert root == tmp_path / "cache" / "ESC-50-master"
    assert len(list((root / "audio").glob("*.wav"))) == 10
    assert ensure_esc50(cache_dir=tmp_path / "cache") == root and handler.requests == [None]  # reused
    assert ensure_esc50(root=root) == root
    os.remove(next((root / "audio").glob("*.wav")))
    with pytest.raises(DatasetError, match=r"1 of 10 audio files missing"):
        ensure_esc50(root=root)
