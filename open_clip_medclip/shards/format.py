"""Names and encodings of the shard format, spec version 1 (written up in `tarballs_spec/SPEC.md`).

Writer and validator both take these constants from here, so the two cannot drift apart.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

SPEC_VERSION = 1
KINDS = ("paired", "image", "text")
IMAGE_FORMATS = ("jpg", "png")
IMAGE_KINDS = ("paired", "image")
TEXT_KINDS = ("paired", "text")
MEMBER_EXTENSIONS = ("jpg", "png", "txt", "json")
JPEG_QUALITY = 95
DEFAULT_IMAGE_SIZE = 256

SIZES_FILE = "sizes.json"
PROVENANCE_FILE = "provenance.json"
REJECTS_FILE = "rejects.jsonl"
SHARD_PATTERN = re.compile(r"^(?P<prefix>[A-Za-z0-9_-]+)-(?P<index>\d{6})\.tar$")
TEMP_SUFFIX = ".tmp"
WORK_DIR = ".medclip-build"

KEY_MAX_LENGTH = 90  # keeps `<key>.json` within ustar's 100-byte name field
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")

# Licence and attribution per source family, written to provenance.json (override with --licence).
SOURCE_LICENCES: dict[str, str] = {
    "chexpert": "Stanford University CheXpert Dataset Research Use Agreement",
    "mimic": "PhysioNet Credentialed Health Data License 1.5.0",
    "nih": "NIH Clinical Center: unrestricted use, attribution requested (Wang X. et al., ChestX-ray8, CVPR 2017)",
    "rsna": "RSNA Pneumonia Detection Challenge data terms (Kaggle)",
    "covid": "COVID-19 Radiography Database terms (Kaggle; mixed sources, see the dataset page)",
    "pediatric": "CC BY 4.0 (Kermany D. et al., Cell 2018; Mendeley Data doi:10.17632/rscbjbr9sj.2)",
    "iu": "CC BY-NC-ND 4.0 (Demner-Fushman D. et al., JAMIA 2016; Indiana University / OpenI)",
    "chexpert-labeler-sample": "MIT (stanfordmlgroup/chexpert-labeler sample reports)",
}
UNKNOWN_LICENCE = "unknown: set --licence"


def sample_key(source: str, record_id: str, kind: str) -> str:
    """`<source>__<id>__<kind>` with unsafe characters replaced; a hash of the exact id is added whenever the id
    had to change (or was too long), so two ids never share a key and the key never contains a dot (which
    WebDataset would read as the start of the member extension)."""
    safe_source, safe_id = _UNSAFE.sub("_", source), _UNSAFE.sub("_", record_id).strip("_")
    key = f"{safe_source}__{safe_id}__{kind}"
    if safe_id != record_id or len(key) > KEY_MAX_LENGTH:
        digest = hashlib.sha256(f"{source}\0{record_id}".encode()).hexdigest()[:10]
        room = KEY_MAX_LENGTH - len(safe_source) - len(kind) - len(digest) - 5
        key = f"{safe_source}__{safe_id[:room]}-{digest}__{kind}"
    return key


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def dump_json(value: object, indent: int | None = None) -> str:
    """The one JSON encoding used in shards and beside them: sorted keys, UTF-8, no NaN (so bytes repeat)."""
    separators = (",", ": ") if indent else (",", ":")
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False, indent=indent,
                      separators=separators)


def tar_member_info(name: str, size: int) -> tarfile.TarInfo:
    """The one deterministic tar header (ustar, mtime 0, uid/gid 0, no user/group names, mode 0644)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `.<name>.tmp`, fsync, rename: the file is either absent, the old one or complete."""
    path = Path(path)
    temp = path.with_name(f".{path.name}{TEMP_SUFFIX}")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> None:
    """A reproducible tar of (member name, bytes) in the given order, written to a temp name, fsynced, renamed."""
    path = Path(path)
    temp = path.with_name(f".{path.name}{TEMP_SUFFIX}")
    with tarfile.open(temp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(tar_member_info(name, len(data)), io.BytesIO(data))
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)
