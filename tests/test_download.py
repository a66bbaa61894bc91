"""download_file against a local HTTP server whose misbehaviour each test scripts."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from knowsam import download as dl
from knowsam.download import ChecksumError, DownloadError, download_file, download_gdrive
from knowsam.errors import ConfigError

CONTENT = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable mod 256
DIGEST = hashlib.sha256(CONTENT).hexdigest()


@dataclass
class Script:
    """How the server answers request number n (1-based)."""

    honour_range: bool = True
    cut_after: Callable[[int], int | None] = lambda n: None  # body bytes sent before hanging up
    status: Callable[[int], int] = lambda n: 200
    ranges: list[str | None] = field(default_factory=list)  # Range header of each request


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            script.ranges.append(self.headers.get("Range"))
            n = len(script.ranges)
            status = script.status(n)
            if status != 200:
                self.send_error(status)
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and script.honour_range:
                start = int(match.group(1))
                if start >= len(CONTENT):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(CONTENT)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(CONTENT) - 1}/{len(CONTENT)}")
            else:
                self.send_response(200)
            body = CONTENT[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            limit = script.cut_after(n)
            self.wfile.write(body if limit is None else body[:limit])
            self.wfile.flush()
            self.close_connection = True

    return Handler


@pytest.fixture
def serve():
    servers = []

    def start(script: Script) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/data.bin"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Record backoff waits instead of sleeping."""
    waits: list[float] = []
    monkeypatch.setattr(dl.time, "sleep", waits.append)
    return waits


def test_plain_download_returns_digest_and_leaves_no_part(serve, tmp_path):
    script = Script()
    dest = tmp_path / "sub" / "data.bin"
    assert download_file(serve(script), dest, sha256=DIGEST, progress=False) == DIGEST
    assert dest.read_bytes() == CONTENT
    assert not (tmp_path / "sub" / "data.bin.part").exists()
    assert script.ranges == [None]


def test_cut_transfer_is_resumed_with_range(serve, tmp_path, sleeps):
    script = Script(cut_after=lambda n: 3000 if n == 1 else None)
    dest = tmp_path / "data.bin"
    assert download_file(serve(script), dest, sha256=DIGEST, progress=False) == DIGEST
    assert script.ranges == [None, "bytes=3000-"]
    assert dest.read_bytes() == CONTENT
    assert sleeps == [1.0]


def test_part_from_an_earlier_run_is_resumed(serve, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(CONTENT[:4096])
    script = Script()
    assert download_file(serve(script), tmp_path / "data.bin", progress=False) == DIGEST
    assert script.ranges == ["bytes=4096-"]


def test_complete_part_is_accepted_on_416(serve, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(CONTENT)
    script = Script()
    assert download_file(serve(script), tmp_path / "data.bin", sha256=DIGEST, progress=False) == DIGEST
    assert script.ranges == [f"bytes={len(CONTENT)}-"]
    assert (tmp_path / "data.bin").read_bytes() == CONTENT


def test_server_ignoring_range_restarts_from_zero(serve, tmp_path, sleeps):
    script = Script(honour_range=False, cut_after=lambda n: 3000 if n == 1 else None)
    dest = tmp_path / "data.bin"
    assert download_file(serve(script), dest, sha256=DIGEST, progress=False) == DIGEST
    assert script.ranges == [None, "bytes=3000-"]  # asked to resume, got the whole file
    assert dest.read_bytes() == CONTENT  # not prefix + whole file


def test_wrong_checksum_is_refused_and_nothing_is_left(serve, tmp_path):
    wrong = hashlib.sha256(b"something else").hexdigest()
    dest = tmp_path / "data.bin"
    with pytest.raises(ChecksumError) as info:
        download_file(serve(Script()), dest, sha256=wrong, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(dest) in message and wrong in message and DIGEST in message
    assert info.value.exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_retries_are_bounded_and_each_resumes(serve, tmp_path, sleeps):
    script = Script(cut_after=lambda n: 100)
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError) as info:
        download_file(serve(script), dest, retries=2, progress=False)
    assert script.ranges == [None, "bytes=100-", "bytes=200-"]
    assert sleeps == [1.0, 2.0]
    message = str(info.value)
    assert "3 attempts" in message and ("short read" in message or "connection lost" in message)
    assert not dest.exists()
    assert (tmp_path / "data.bin.part").read_bytes() == CONTENT[:300]  # kept for a later resume


def test_server_error_is_retried_then_succeeds(serve, tmp_path, sleeps):
    script = Script(status=lambda n: 503 if n == 1 else 200)
    assert download_file(serve(script), tmp_path / "d", progress=False, backoff=0.5) == DIGEST
    assert len(script.ranges) == 2
    assert sleeps == [0.5]


def test_client_error_is_not_retried(serve, tmp_path, sleeps):
    script = Script(status=lambda n: 404)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(serve(script), tmp_path / "d", progress=False)
    assert len(script.ranges) == 1
    assert sleeps == []


def test_connection_refused_fails_after_retries(tmp_path, sleeps):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.zip"
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "x.zip", retries=1, progress=False)
    assert url in str(info.value) and "2 attempts" in str(info.value)
    assert sleeps == [1.0]
    assert list(tmp_path.iterdir()) == []


def test_negative_retries_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        download_file("http://127.0.0.1:1/x", tmp_path / "x", retries=-1)


def test_gdrive_rejects_malformed_ids(tmp_path):
    for bad in ("", "a/b", "https://drive.google.com/file/d/x"):
        with pytest.raises(ConfigError, match="Google Drive file id"):
            download_gdrive(bad, tmp_path / "x.zip")


def test_gdrive_output_is_verified_and_renamed(monkeypatch, tmp_path):
    import gdown

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        Path(kwargs["output"]).write_bytes(CONTENT)
        return kwargs["output"]

    monkeypatch.setattr(gdown, "download", fake_download)
    dest = tmp_path / "Train.zip"
    assert download_gdrive("1YiGHLw4iTvKdvbT6MgwO9zcCv8zJ_Bnb", dest, sha256=DIGEST, progress=False) == DIGEST
    assert dest.read_bytes() == CONTENT and sorted(p.name for p in tmp_path.iterdir()) == ["Train.zip"]
    assert calls[0]["id"] == "1YiGHLw4iTvKdvbT6MgwO9zcCv8zJ_Bnb" and calls[0]["quiet"] is True

    with pytest.raises(ChecksumError):
        download_gdrive("1YiGHLw4iTvKdvbT6MgwO9zcCv8zJ_Bnb", tmp_path / "b.zip", sha256="0" * 64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Train.zip"]  # nothing kept of b.zip


def test_gdrive_failure_is_one_line(monkeypatch, tmp_path):
    import gdown
    import gdown.exceptions

    def failing(**kwargs):
        raise gdown.exceptions.FileURLRetrievalError("Cannot retrieve the public link.\nToo many users.")

    monkeypatch.setattr(gdown, "download", failing)
    with pytest.raises(DownloadError) as info:
        download_gdrive("1Y2z7FD5p5y31vkZwQQomXFRB0HutHyao", tmp_path / "t.zip", progress=False)
    assert "\n" not in str(info.value)
    assert "1Y2z7FD5p5y31vkZwQQomXFRB0HutHyao" in str(info.value) and "Too many users" in str(info.value)
