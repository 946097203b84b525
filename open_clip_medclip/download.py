"""Crash-safe downloads of the official MedCLIP weights (`pretrained='medclip'`).

What `fetch` guarantees:
- connect and read timeouts (a stalled server fails instead of hanging);
- the body goes to `<cache>/<name>.part` and only a complete, verified file is renamed to `<cache>/<name>`:
  the byte count must match Content-Length (and the expected size where known), a zip must pass a full CRC test,
  and the sha256 must match where known;
- a cached file that fails the same check (a partial zip left by an older version, a corrupt copy) is
  downloaded again instead of failing every later load;
- failed attempts are retried; the final error names the URL and the cache path for a manual download;
- concurrent processes (DDP ranks) take a file lock, so one downloads and the others reuse its result.

Settings: `MEDCLIP_WEIGHTS_BASE_URL` replaces everything before the file name in the URL (a mirror, or a test
server); `MEDCLIP_DOWNLOAD_TIMEOUT` is `READ` or `CONNECT,READ` seconds; `MEDCLIP_DOWNLOAD_ATTEMPTS` the number of
tries. Standard library only (torch is not needed to download a file).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from open_clip_medclip.atomic import fsync_dir
from open_clip_medclip.errors import UserError

log = logging.getLogger("open_clip_medclip")

BASE_URL_ENV = "MEDCLIP_WEIGHTS_BASE_URL"
TIMEOUT_ENV = "MEDCLIP_DOWNLOAD_TIMEOUT"
ATTEMPTS_ENV = "MEDCLIP_DOWNLOAD_ATTEMPTS"
DEFAULT_CONNECT_TIMEOUT_S = 20.0
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_ATTEMPTS = 3
PART_SUFFIX = ".part"
CHUNK_BYTES = 1 << 20
MARKER_KEY = "medclip_download"  # set in a pretrained cfg to route it through `fetch`


class DownloadError(UserError):
    """A download that failed for good: says why, the URL, and where to put a manually downloaded copy."""


class _Unusable(Exception):
    """A downloaded or cached file that fails the integrity check (message says how)."""


def default_cache_dir() -> Path:
    """OpenCLIP's own default for URL downloads, so files cached by earlier versions are found (and checked)."""
    return Path(os.path.expanduser("~/.cache/clip"))


def resolve_url(url: str, base_url: str | None = None) -> str:
    """`url`, or its file name under `base_url` / $MEDCLIP_WEIGHTS_BASE_URL when one is set."""
    base = base_url if base_url is not None else os.environ.get(BASE_URL_ENV, "")
    if not base:
        return url
    return base.rstrip("/") + "/" + url.rsplit("/", 1)[-1]


def _env_timeouts() -> tuple[float, float]:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S
    try:
        values = [float(v) for v in raw.split(",")]
        if len(values) not in (1, 2) or min(values) <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={raw!r}: expected READ or CONNECT,READ seconds (positive numbers)") from None
    return (min(values[0], DEFAULT_CONNECT_TIMEOUT_S), values[0]) if len(values) == 1 else (values[0], values[1])


def _env_attempts() -> int:
    raw = os.environ.get(ATTEMPTS_ENV, "").strip()
    if not raw:
        return DEFAULT_ATTEMPTS
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"{ATTEMPTS_ENV}={raw!r}: expected a whole number of at least 1")
    return int(raw)


# ------------------------------------------------------------------------------------------------- checking


def check_file(path: Path, sha256: str | None = None, size: int | None = None) -> None:
    """Raise `_Unusable` saying what is wrong with a downloaded or cached file."""
    actual = path.stat().st_size
    if actual == 0:
        raise _Unusable("empty file")
    if size is not None and actual != size:
        raise _Unusable(f"{actual} bytes, expected {size}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if path.name.lower().removesuffix(PART_SUFFIX).endswith(".zip") or head[:2] == b"PK":
        if head[:2] != b"PK":
            raise _Unusable(f"not a zip file (starts with {head!r}; an error page instead of the file?)")
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
            raise _Unusable(f"truncated or corrupt zip ({exc})") from None
        if bad is not None:
            raise _Unusable(f"zip member {bad!r} fails its CRC check (corrupt)")
    if sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
                digest.update(block)
        if not digest.hexdigest().startswith(sha256.lower()):
            raise _Unusable(f"sha256 {digest.hexdigest()[:16]}... differs from the expected {sha256[:16]}...")


# ------------------------------------------------------------------------------------------------- transport


def _with_read_timeout(connection_class: type, read_timeout: float) -> type:
    class Connection(connection_class):
        def connect(self):  # connect (and TLS handshake) under the connect timeout, then switch to the read one
            super().connect()
            self.sock.settimeout(read_timeout)

    return Connection


def _opener(read_timeout: float) -> urllib.request.OpenerDirector:
    class HTTPHandler(urllib.request.HTTPHandler):
        def do_open(self, http_class, req, **kwargs):
            return super().do_open(_with_read_timeout(http_class, read_timeout), req, **kwargs)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def do_open(self, http_class, req, **kwargs):
            return super().do_open(_with_read_timeout(http_class, read_timeout), req, **kwargs)

    return urllib.request.build_opener(HTTPHandler(), HTTPSHandler())


def _download_once(url: str, part: Path, connect_timeout: float, read_timeout: float, progress: bool) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "open_clip_medclip"})
    with _opener(read_timeout).open(request, timeout=connect_timeout) as response:
        length_header = response.headers.get("Content-Length")
        expected = int(length_header) if length_header and length_header.isdigit() else None
        received = 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=expected, unit="B", unit_scale=True, ncols=80, file=sys.stderr,
                       desc=url.rsplit("/", 1)[-1])
        try:
            with open(part, "wb") as output:
                while True:
                    block = response.read(CHUNK_BYTES)
                    if not block:
                        break
                    output.write(block)
                    received += len(block)
                    if bar is not None:
                        bar.update(len(block))
                output.flush()
                os.fsync(output.fileno())
        finally:
            if bar is not None:
                bar.close()
    if expected is not None and received != expected:
        raise _Unusable(f"the server closed the connection after {received} of {expected} bytes")


def _describe(exc: BaseException, read_timeout: float, connect_timeout: float) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            return f"no connection within {connect_timeout:g} s"
        return f"cannot connect: {reason}"
    if isinstance(exc, TimeoutError):
        return f"the server sent nothing for {read_timeout:g} s (read timeout)"
    if isinstance(exc, http.client.IncompleteRead):
        return f"the server closed the connection after {len(exc.partial)} bytes"
    if isinstance(exc, _Unusable):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: the server says the file is not there or not for us."""
    return isinstance(exc, urllib.error.HTTPError) and 400 <= exc.code < 500 and exc.code not in (408, 429)


@contextlib.contextmanager
def _cache_lock(target: Path) -> Iterator[None]:
    """One downloader per cache file across processes (POSIX); elsewhere no lock, the rename stays atomic."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = target.with_name(f".{target.name}.lock")
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------- public


def fetch(url: str, cache_dir: str | os.PathLike | None = None, *, filename: str | None = None,
          sha256: str | None = None, size: int | None = None, connect_timeout: float | None = None,
          read_timeout: float | None = None, attempts: int | None = None, retry_wait_s: float = 2.0,
          base_url: str | None = None, progress: bool | None = None) -> Path:
    """Return the verified cached copy of `url`, downloading it (again, if the cached copy is bad) when needed.

    Raises `DownloadError` (a `UserError`) naming the URL and the cache path when every attempt failed.
    """
    url = resolve_url(url, base_url)
    env_connect, env_read = _env_timeouts()
    connect_timeout = env_connect if connect_timeout is None else connect_timeout
    read_timeout = env_read if read_timeout is None else read_timeout
    attempts = _env_attempts() if attempts is None else max(1, attempts)
    progress = sys.stderr.isatty() if progress is None else progress
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / (filename or urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] or "download")
    part = target.with_name(target.name + PART_SUFFIX)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        hint = f" (check {BASE_URL_ENV})" if os.environ.get(BASE_URL_ENV) and base_url is None else ""
        raise DownloadError(f"{url}: not an http(s) URL{hint}")
    manual = f"download it by hand from {url} and save it as {target} (or pass the file itself as pretrained=PATH)"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"{cache}: cannot create the weights cache folder ({exc.strerror}); pass another "
                            "cache_dir or " + manual) from None
    with _cache_lock(target):
        with contextlib.suppress(OSError):
            part.unlink()  # left by a killed download (we hold the lock, so nobody else is writing it)
        if target.exists() or target.is_symlink():
            if not target.is_file():
                raise DownloadError(f"{target}: exists and is not a file; remove it, or {manual}")
            try:
                check_file(target, sha256, size)
                return target
            except _Unusable as exc:
                log.warning("%s: cached copy is unusable (%s); downloading it again from %s", target, exc, url)
                target.unlink()
        reason = "not tried"
        attempt = 0
        for attempt in range(1, attempts + 1):
            try:
                _download_once(url, part, connect_timeout, read_timeout, progress)
                check_file(part, sha256, size)
                os.replace(part, target)
                fsync_dir(cache)
                return target
            except (OSError, http.client.HTTPException, _Unusable) as exc:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
                reason = _describe(exc, read_timeout, connect_timeout)
                if _permanent(exc):
                    break
                if attempt < attempts:
                    log.warning("download of %s failed (%s); retrying (%d of %d)", url, reason, attempt + 1, attempts)
                    time.sleep(retry_wait_s * attempt)
    raise DownloadError(f"could not download {url}: {reason} (after {attempt} attempt{'s' * (attempt != 1)}); "
                        + manual)


def is_medclip_cfg(cfg: dict | None, official_urls: tuple[str, ...] = ()) -> bool:
    """A pretrained cfg for the official MedCLIP weights (marked, or one of `official_urls`)."""
    if not cfg or "file" in cfg or not cfg.get("url"):
        return False
    if cfg.get(MARKER_KEY):
        return True
    return cfg["url"] in official_urls


def wrap_download_pretrained(original: Callable, official_urls: tuple[str, ...] = ()) -> Callable:
    """Wrap `open_clip.factory.download_pretrained` so MedCLIP tags (marked, or one of `official_urls`) download
    through `fetch`; others unchanged."""

    def download_pretrained(cfg, prefer_hf_hub=True, cache_dir=None):
        if is_medclip_cfg(cfg, official_urls):
            return str(fetch(cfg["url"], cache_dir, sha256=cfg.get("sha256"), size=cfg.get("size")))
        return original(cfg, prefer_hf_hub=prefer_hf_hub, cache_dir=cache_dir)

    download_pretrained.__wrapped__ = original
    download_pretrained.__doc__ = original.__doc__
    return download_pretrained
