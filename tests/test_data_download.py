"""Download and extraction, against a loopback HTTP server only: resume, restart, path-safety, completeness."""

import hashlib
import http.server
import os
import re
import shutil
import socket
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
    """Serves files from `files` with an ETag; honours `Range: bytes=N-` (and `If-Range`) unless told not to."""

    files: dict[str, bytes] = {}
    supports_range = True
    etag = '"v1"'
    requests: list[str | None] = []
    if_ranges: list[str | None] = []

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        requested = self.headers.get("Range")
        type(self).requests.append(requested)
        type(self).if_ranges.append(self.headers.get("If-Range"))
        match = re.fullmatch(r"bytes=(\d+)-", requested or "")
        if_range = self.headers.get("If-Range")
        if match and self.supports_range and if_range in (None, self.etag):
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("ETag", self.etag)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("Handler", (RangeHandler,), {"files": {}, "requests": [], "if_ranges": [], "supports_range": True})
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


def _cut_once(handler, monkeypatch, sent: int = 300_000) -> None:
    """The next answer declares the whole length but the connection drops after `sent` bytes."""
    honest = handler.do_GET

    def cut(self):
        monkeypatch.setattr(handler, "do_GET", honest)
        type(self).requests.append(self.headers.get("Range"))
        self.send_response(200)
        self.send_header("ETag", self.etag)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(PAYLOAD[:sent])

    monkeypatch.setattr(handler, "do_GET", cut)


def test_resume_from_part_file(server, tmp_path, monkeypatch):
    handler, base = server
    handler.files["/a.zip"] = PAYLOAD
    _cut_once(handler, monkeypatch)
    with pytest.raises(OSError, match="rerun to resume"):
        download_file(f"{base}/a.zip", tmp_path / "a.zip")
    dest = download_file(f"{base}/a.zip", tmp_path / "a.zip")
    assert dest.read_bytes() == PAYLOAD
    assert handler.requests == [None, "bytes=300000-"] and handler.if_ranges[-1] == '"v1"'
    assert not (tmp_path / "a.zip.part.json").exists()


def test_stale_part_of_another_version_is_restarted(server, tmp_path, monkeypatch):
    """The file changed on the server since the cut: If-Range makes it answer 200, and we start over."""
    handler, base = server
    handler.files["/a.zip"] = PAYLOAD
    _cut_once(handler, monkeypatch)
    with pytest.raises(OSError, match="rerun to resume"):
        download_file(f"{base}/a.zip", tmp_path / "a.zip")
    new_version = PAYLOAD[::-1]
    handler.files["/a.zip"], handler.etag = new_version, '"v2"'
    assert download_file(f"{base}/a.zip", tmp_path / "a.zip").read_bytes() == new_version


def test_part_of_unknown_origin_is_not_appended_to(server, tmp_path):
    handler, base = server
    handler.files["/a.zip"] = PAYLOAD
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD[::-1][:300_000])  # no record of where it came from
    assert download_file(f"{base}/a.zip", tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert handler.requests == [None]


def test_partial_answer_with_the_wrong_range_is_restarted(server, tmp_path, monkeypatch):
    handler, base = server
    handler.files["/a.zip"] = PAYLOAD
    _cut_once(handler, monkeypatch)
    with pytest.raises(OSError, match="rerun to resume"):
        download_file(f"{base}/a.zip", tmp_path / "a.zip")
    honest = handler.do_GET

    def wrong_range(self):  # 206, but from byte 0 instead of the requested offset
        monkeypatch.setattr(handler, "do_GET", honest)
        type(self).requests.append(self.headers.get("Range"))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes 0-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    monkeypatch.setattr(handler, "do_GET", wrong_range)
    assert download_file(f"{base}/a.zip", tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert handler.requests == [None, "bytes=300000-", None]


def test_cut_chunked_transfer_is_a_clear_error(server, tmp_path, monkeypatch):
    handler, base = server

    def cut_chunked(self):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"%x\r\n" % 5000 + PAYLOAD[:1000])  # a chunk announced, then the line drops
        self.wfile.flush()

    monkeypatch.setattr(handler, "do_GET", cut_chunked)
    with pytest.raises(download_module.DownloadError, match=r"stopped at \d+ bytes; rerun to resume"):
        download_file(f"{base}/a.zip", tmp_path / "a.zip")
    assert not (tmp_path / "a.zip").exists()


def test_checksum_mismatch_deletes_the_download(server, tmp_path, monkeypatch):
    """A cut without Content-Length looks complete to HTTP; the checksum says otherwise."""
    handler, base = server

    def no_length(self):
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(PAYLOAD[:5000])

    monkeypatch.setattr(handler, "do_GET", no_length)
    expected = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(download_module.DownloadError, match=f"expected {expected}"):
        download_file(f"{base}/a.zip", tmp_path / "a.zip", sha256=expected)
    assert not (tmp_path / "a.zip").exists() and not (tmp_path / "a.zip.part").exists()


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


def _esc50_archive(tmp_path: Path) -> bytes:
    source = make_synthetic_esc50(tmp_path / "src" / "ESC-50-master", n_classes=2, clips_per_class=5, seconds=0.5)
    archive = tmp_path / "archive.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(source.rglob("*")):
            zf.write(file, file.relative_to(source.parent).as_posix())
    return archive.read_bytes()


@pytest.fixture
def small_esc50(server, tmp_path, monkeypatch):
    """The loopback server offers a 10-clip ESC-50-shaped archive as the official URL."""
    handler, base = server
    handler.files["/master.zip"] = _esc50_archive(tmp_path)
    monkeypatch.setattr(download_module, "ESC50_URL", f"{base}/master.zip")
    monkeypatch.setattr(download_module, "check_esc50_complete", partial(check_esc50_complete, expected_rows=10))
    return handler


def test_first_archive_checksum_is_recorded_and_later_checked(small_esc50, tmp_path, capsys):
    cache = tmp_path / "cache"
    root = ensure_esc50(cache_dir=cache)
    recorded = (cache / "ESC-50-master.zip.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(small_esc50.files["/master.zip"]).hexdigest()
    assert "no official checksum" in capsys.readouterr().err
    # The archive changes under us; re-extraction must not trust it.
    shutil.rmtree(root)
    archive = cache / "ESC-50-master.zip"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"not the [0-9a-f]{64} recorded .* delete .*ESC-50-master.zip"):
        ensure_esc50(cache_dir=cache)


def test_truncated_archive_is_reported_with_delete_advice(small_esc50, tmp_path, monkeypatch):
    """No Content-Length and a cut body: HTTP cannot tell, the archive check does, once, with advice."""
    body = small_esc50.files["/master.zip"][:-300]

    def no_length(self):
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    monkeypatch.setattr(small_esc50, "do_GET", no_length)
    cache = tmp_path / "cache"
    for _ in range(2):  # the second run reports the same archive without re-extracting it
        with pytest.raises(DatasetError, match=r"ESC-50-master.zip is incomplete or corrupt .* delete it and rerun"):
            ensure_esc50(cache_dir=cache)
    assert not (cache / "ESC-50-master").exists() and not (cache / "ESC-50-master.zip.sha256").exists()


def test_archive_missing_clips_says_delete_it(server, tmp_path, monkeypatch):
    handler, base = server
    handler.files["/master.zip"] = _esc50_archive(tmp_path)
    monkeypatch.setattr(download_module, "ESC50_URL", f"{base}/master.zip")
    monkeypatch.setattr(download_module, "check_esc50_complete", partial(check_esc50_complete, expected_rows=11))
    with pytest.raises(DatasetError, match=r"has 10 rows, expected 11.*ESC-50-master.zip lacks them: delete it"):
        ensure_esc50(cache_dir=tmp_path / "cache")


def test_no_network_names_the_failure_and_the_local_option(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on: connection refused, like no network
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(download_module, "ESC50_URL", f"http://127.0.0.1:{port}/master.zip")
    with pytest.raises(download_module.DownloadError, match=r"cannot download .*--data /path/to/ESC-50-master"):
        ensure_esc50(cache_dir=tmp_path / "data")
    assert not (tmp_path / "data").exists()  # no empty folder left behind
