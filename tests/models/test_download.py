"""Crash-safe downloads of the official weights, against a local HTTP server on 127.0.0.1 that misbehaves."""
from __future__ import annotations

import hashlib
import http.server
import io
import threading
import time
import zipfile
from pathlib import Path

import pytest

from open_clip_medclip import download
from open_clip_medclip.download import DownloadError
from open_clip_medclip.errors import UserError

NAME = "medclip-vit-pretrained.zip"


def zip_bytes(payload: bytes = b"\x00weights" * 4000) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("medclip-vit-pretrained/pytorch_model.bin", payload)
    return buffer.getvalue()


GOOD = zip_bytes()


class Server:
    """A threaded HTTP server; `mode` decides how it answers: good, stall-headers, stall-body, cut, 404."""

    def __init__(self):
        self.mode = "good"
        self.body = GOOD
        self.hits = 0
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.hits += 1
                if server.mode == "stall-headers":
                    server.release.wait(10)
                    return
                if server.mode == "404":
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                if server.mode == "stall-body":
                    self.wfile.write(server.body[:100])
                    self.wfile.flush()
                    server.release.wait(10)
                    return
                if server.mode == "cut":
                    self.wfile.write(server.body[: len(server.body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(server.body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights"
        self.url = f"https://storage.example.invalid/pytrial/{NAME}"  # resolved onto self.base by the env var

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(monkeypatch):
    srv = Server()
    monkeypatch.setenv(download.BASE_URL_ENV, srv.base)
    yield srv
    srv.close()


def fetch(srv: Server, cache: Path, **kwargs):
    kwargs = {"connect_timeout": 2.0, "read_timeout": 0.5, "attempts": 1, "retry_wait_s": 0.0,
              "progress": False, **kwargs}
    return download.fetch(srv.url, cache, **kwargs)


def test_good_zip_is_cached_and_reused_without_the_server(server, tmp_path):
    path = fetch(server, tmp_path)
    assert path == tmp_path / NAME and path.read_bytes() == GOOD
    assert not (tmp_path / (NAME + ".part")).exists()
    assert server.hits == 1
    assert fetch(server, tmp_path) == path
    assert server.hits == 1  # the second call did not hit the server


@pytest.mark.parametrize("mode", ["stall-headers", "stall-body"])
def test_stalled_server_times_out_with_url_and_cache_path(server, tmp_path, mode):
    server.mode = mode
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        fetch(server, tmp_path)
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, UserError)
    assert f"could not download {server.base}/{NAME}: the server sent nothing for 0.5 s (read timeout)" in message
    assert f"save it as {tmp_path / NAME}" in message
    assert not (tmp_path / NAME).exists() and not (tmp_path / (NAME + ".part")).exists()


def test_cut_body_never_lands_under_the_final_name_and_is_retried(server, tmp_path):
    server.mode = "cut"
    with pytest.raises(DownloadError, match=rf"the server closed the connection after {len(GOOD) // 2} of "
                                            rf"{len(GOOD)} bytes \(after 2 attempts\)") as err:
        fetch(server, tmp_path, attempts=2)
    assert server.hits == 2
    assert str(tmp_path / NAME) in str(err.value)
    assert not (tmp_path / NAME).exists() and not (tmp_path / (NAME + ".part")).exists()
    server.mode = "good"  # the next call downloads the whole file
    assert fetch(server, tmp_path).read_bytes() == GOOD


def test_missing_file_is_not_retried(server, tmp_path):
    server.mode = "404"
    with pytest.raises(DownloadError, match=r"HTTP 404 Not Found \(after 1 attempt\)"):
        fetch(server, tmp_path, attempts=3)
    assert server.hits == 1


@pytest.mark.parametrize("corrupt", [GOOD[: len(GOOD) // 2], b"", b"<html>quota exceeded</html>",
                                     GOOD.replace(b"\x00weights", b"\x00weighTs", 1)],
                         ids=["partial-zip", "empty", "html-page", "bad-crc"])
def test_corrupt_cached_file_is_replaced(server, tmp_path, corrupt, caplog):
    (tmp_path / NAME).write_bytes(corrupt)  # e.g. a partial zip cached by upstream's download under the final name
    with caplog.at_level("WARNING", logger="open_clip_medclip"):
        path = fetch(server, tmp_path)
    assert path.read_bytes() == GOOD and server.hits == 1
    assert "cached copy is unusable" in caplog.text and "downloading it again" in caplog.text


def test_size_and_sha256_are_checked(server, tmp_path):
    good_sha = hashlib.sha256(GOOD).hexdigest()
    assert fetch(server, tmp_path, sha256=good_sha, size=len(GOOD)).read_bytes() == GOOD
    other = tmp_path / "other"
    with pytest.raises(DownloadError, match=r"sha256 [0-9a-f]{16}\.\.\. differs from the expected 0000000000000000"):
        fetch(server, other, sha256="0" * 64)
    with pytest.raises(DownloadError, match=rf"{len(GOOD)} bytes, expected 12"):
        fetch(server, other, size=12)
    assert not list(other.iterdir()) or all(p.name.endswith(".lock") for p in other.iterdir())


def test_cache_path_that_is_a_folder_is_named(server, tmp_path):
    (tmp_path / NAME).mkdir()
    with pytest.raises(DownloadError, match=rf"{NAME}: exists and is not a file; remove it"):
        fetch(server, tmp_path)


def test_stale_part_file_is_removed(server, tmp_path):
    (tmp_path / (NAME + ".part")).write_bytes(GOOD[:10])  # a download killed mid-way
    assert fetch(server, tmp_path).read_bytes() == GOOD
    assert not (tmp_path / (NAME + ".part")).exists()
    (tmp_path / (NAME + ".part")).write_bytes(GOOD[:10])  # also cleaned when the cached copy is good
    assert fetch(server, tmp_path).read_bytes() == GOOD and server.hits == 1
    assert not (tmp_path / (NAME + ".part")).exists()


def test_base_url_without_scheme_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(download.BASE_URL_ENV, "127.0.0.1:8000/weights")
    with pytest.raises(DownloadError, match=rf"127\.0\.0\.1:8000/weights/{NAME}: not an http\(s\) URL "
                                            r"\(check MEDCLIP_WEIGHTS_BASE_URL\)"):
        download.fetch(f"https://example.invalid/{NAME}", tmp_path)


def test_bad_timeout_setting_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv(download.TIMEOUT_ENV, "soon")
    with pytest.raises(UserError, match=r"MEDCLIP_DOWNLOAD_TIMEOUT='soon': expected READ or CONNECT,READ"):
        download.fetch("http://127.0.0.1:9/x.zip", tmp_path)


def test_pretrained_tag_downloads_through_fetch(server, tmp_path):
    """`pretrained='medclip'`: OpenCLIP's download step for the MedCLIP tags goes through `fetch` (plugin hook)."""
    import open_clip
    from open_clip import factory

    import open_clip_medclip  # noqa: F401

    cfg = open_clip.get_pretrained_cfg("medclip-swin", "medclip")
    assert download.is_medclip_cfg(cfg)
    (tmp_path / NAME).write_bytes(GOOD[:100])  # a partial zip cached by an older version
    path = factory.download_pretrained(cfg, cache_dir=str(tmp_path))
    assert Path(path).read_bytes() == GOOD and server.hits == 1
