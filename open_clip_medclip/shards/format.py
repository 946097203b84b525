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
from dataclasses import dataclass, field, fields
from pathlib import Path

from open_clip_medclip.findings import CHEXPERT_FINDINGS
from open_clip_medclip.parts import part_json, read_part

SPEC_VERSION = 1
KINDS = ("paired", "image", "text")
IMAGE_FORMATS = ("jpg", "png")
IMAGE_KINDS = ("paired", "image")  # the kinds whose samples carry an image (the others carry text only)
TEXT_KINDS = ("paired", "text")
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


def shard_name(prefix: str, index: int, last: int | None = None) -> str:
    """`<prefix>-000003.tar`; with `last`, the brace pattern of shards index..last: `<prefix>-{000000..000009}.tar`."""
    number = f"{index:06d}" if last is None else f"{{{index:06d}..{last:06d}}}"
    return f"{prefix}-{number}.tar"


@dataclass
class Provenance:
    """`provenance.json` (spec §5): `from_json` reads any file so far (a missing key as None: `validate` names it;
    a part as {index, count} or {index, of}); `to_json` is what the builder and merge write, byte for byte."""

    uncertainty_policy: str
    kinds: dict[str, int]
    image: dict
    text_unit: str
    samples_per_shard: int
    sources: list[dict]
    shards: int
    labeler: dict | None
    counts: dict[str, int]
    reject_reasons: dict[str, int]
    build_fingerprint: str
    spec_version: int = SPEC_VERSION
    label_order: list[str] = field(default_factory=lambda: list(CHEXPERT_FINDINGS))
    builder: str = "open_clip_medclip.shards"
    part: tuple[int, int] | None = None  # written as parts.part_json
    merged_from: int | None = None  # the number of part builds `medclip shards merge` combined

    @property
    def longer_side(self) -> int | None:
        """`image.longer_side` when the file gives an integer (the decoded-image size check needs it)."""
        side = self.image.get("longer_side") if isinstance(self.image, dict) else None
        return side if type(side) is int else None

    def to_json(self) -> dict:
        document = {item.name: getattr(self, item.name) for item in fields(self)} | {"part": part_json(self.part)}
        return {key: value for key, value in document.items() if value is not None or key == "labeler"}

    @classmethod
    def from_json(cls, document: dict) -> Provenance:
        return cls(**{item.name: document.get(item.name) for item in fields(cls)} | {"part": read_part(
            document.get("part"))})


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


def url_scheme(url: str) -> str:
    """The URL's scheme, lower case; "" for a local path (a Windows drive letter too). The one scheme test."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", url)
    return match[1].lower() if match else ""


def open_url(url: str):
    """A binary read handle for a local path, `file:`, `pipe:`, http(s) and the other `webdataset.gopen` schemes,
    or any fsspec URL (s3://, gs://, memory:// ...) when fsspec and its backend are installed."""
    scheme = url_scheme(url)
    if not scheme:
        return open(url, "rb")
    import webdataset

    if scheme == "file" or scheme in webdataset.gopen_schemes:
        return webdataset.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


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
    """A reproducible tar of (member name, bytes) in the given order (small tars: built in memory), `write_atomic`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(tar_member_info(name, len(data)), io.BytesIO(data))
    write_atomic(path, buffer.getvalue())
