"""Outputs that are either the previous good result or the new complete one, never half of either.

`atomic_write(path)` writes to a hidden temporary file in the same folder, `.<name>.tmp-<pid>`, fsyncs it and
renames it over `path`; on any error (or Ctrl-C) the temporary file is removed and `path` keeps its old content.
`clean_stale_temps(folder, name)` removes temporary files and folders of that form whose process is gone (left
by a killed run); `atomic_write` and `temp_path` call it, so a stale temporary is cleaned on the next run.

Light on purpose (standard library only), so any module can use it.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
# Where a process cannot be probed safely (Windows: os.kill(pid, 0) would terminate it), age decides instead.
STALE_AFTER_S = 24 * 3600


def temp_path(path: str | os.PathLike, clean: bool = True) -> Path:
    """`.<name>.tmp-<pid>` beside `path`, after removing stale temporaries of the same name (`clean=True`)."""
    path = Path(path)
    if clean and path.parent.is_dir():
        clean_stale_temps(path.parent, path.name)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists on this machine (or we cannot tell)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return True  # no safe probe; clean_stale_temps falls back to the file's age
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove `.<name>.tmp-<pid>` files/folders in `folder` (any name when `name` is None) whose process is gone.

    Temporaries of live processes (another run writing the same output right now) are left alone. Returns the
    paths removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if not match or (name is not None and match.group("name") != name):
            continue
        pid = int(match.group("pid"))
        if pid == os.getpid():
            stale = True  # our own leftover from an earlier failed attempt in this process
        elif os.name == "nt":
            try:
                stale = now - entry.lstat().st_mtime > STALE_AFTER_S
            except OSError:
                continue
        else:
            stale = not pid_alive(pid)
        if not stale:
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = None,
                 newline: str | None = None) -> Iterator:
    """Open a temporary file for writing; on success it replaces `path` (fsynced), on error it is removed.

    `mode` is "w" (text, UTF-8 unless `encoding` says otherwise) or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    temp = temp_path(path)
    binary = mode == "wb"
    handle = open(temp, mode, encoding=None if binary else (encoding or "utf-8"),
                  newline=None if binary else newline)
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(temp, path)
    except BaseException:
        handle.close()
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """`Path.write_text`, atomically."""
    with atomic_write(path, "w", encoding=encoding) as handle:
        handle.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`Path.write_bytes`, atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
