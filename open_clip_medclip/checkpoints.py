"""Crash-safe training checkpoints: atomic writes and a resume that skips unreadable files.

`atomic_save(obj, path)` writes `torch.save(obj)` to `.<name>.tmp-<pid>` beside the target, fsyncs it, renames it
over `path` and fsyncs the folder (`open_clip_medclip.atomic`): a run killed while saving leaves the previous
checkpoints intact and no partial file under a checkpoint name (temporary names are hidden and do not end in
`.pt`, so `--resume latest` never sees them; a dead run's leftovers are removed on the next save).

`unreadable_reason(path)` says why a checkpoint cannot be loaded (empty, truncated: no zip central directory, no
pickled object) without reading the tensors; `newest_readable(paths)` picks the newest good one of a sorted list
and reports the ones it skipped. The trainer glue (`plugins/openclip_train.py`) routes open_clip_train's own
saves and `--resume latest` through these.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence

from open_clip_medclip.atomic import atomic_write


def atomic_save(obj, path, save=None) -> None:
    """`torch.save(obj, path)` through `atomic.atomic_write` (hidden fsynced temporary file, atomic rename; a dead
    run's temporary for the same name is removed first). Non-path targets (file objects) go to `save` unchanged."""
    if save is None:
        import torch

        save = torch.save
    if not isinstance(path, (str, os.PathLike)):
        save(obj, path)
        return
    with atomic_write(path, "wb") as handle:
        save(obj, handle)


def unreadable_reason(path: str) -> str | None:
    """Why `path` is not a loadable torch checkpoint, or None when it looks intact (cheap: no tensor reads)."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:
        return "empty (0 bytes)"
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":  # torch's legacy (non-zip) format: a pickle stream
        return None
    if head != b"PK\x03\x04":
        return f"not a torch checkpoint ({size} bytes, unknown format)"
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"truncated or corrupt ({size} bytes; {exc})"
    if not any(info.filename.endswith("data.pkl") for info in infos):
        return f"truncated or corrupt ({size} bytes; no pickled object inside)"
    end = max((info.header_offset + info.compress_size for info in infos), default=0)
    if end > size:
        return f"truncated ({size} bytes, records need {end})"
    return None


def newest_readable(candidates: Sequence[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """(the last readable path of `candidates`, [(skipped path, reason), ...] newest first)."""
    skipped: list[tuple[str, str]] = []
    for path in reversed(list(candidates)):
        reason = unreadable_reason(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def describe_skipped(skipped: Sequence[tuple[str, str]]) -> str:
    return "; ".join(f"{path}: {reason}" for path, reason in skipped)
