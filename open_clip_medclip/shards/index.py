"""The shard index: small files beside the shards so readers never open an image shard to learn what a build holds.

Written by `medclip shards build` (and by `medclip shards index DIR` for older builds, or `medclip shards merge`
for part builds); checked by `medclip shards validate`; read by the training streams at start-up with
`read_index(location)`. The format (index version 1: `index.json`, the sentence bank `index-bank.npz`, the
per-sample checksums `index-samples.jsonl`) is specified in `tarballs_spec/SPEC.md` §7, and only there.
Everything here is order-independent (sorted), so N part builds merged give the index of a single build.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from open_clip_medclip.errors import UserError
from open_clip_medclip.findings import CHEXPERT_FINDINGS, NUM_FINDINGS
from open_clip_medclip.labels import CODE_DTYPE, POLICIES, LabelError, to_codes
from open_clip_medclip.shards.format import IMAGE_KINDS, KINDS, SHARD_PATTERN, SPEC_VERSION, dump_json, open_url

INDEX_VERSION = 1
INDEX_FILE = "index.json"
BANK_FILE = "index-bank.npz"
CHECKSUMS_FILE = "index-samples.jsonl"
INDEX_FILES = (INDEX_FILE, BANK_FILE, CHECKSUMS_FILE)
INDEX_KEYS = {"index_version", "spec_version", "label_order", "label_policy", "shards", "samples", "kinds", "bank",
              "checksums"}  # the keys of index.json, each a ShardIndex field
CHECKSUM_DIGITS = 32
BANK_KIND_BITS = {"paired": 1, "text": 2}
BANK_ARRAYS = ("text_bytes", "text_offsets", "codes", "kinds", "counts")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_TAR_TOKEN = re.compile(r"[^/\s]*\.tar\b(?!.*\.tar\b)")


class ShardIndexError(UserError):
    """The index cannot be read or does not describe the shards; the message names the file."""


# --------------------------------------------------------------------------------------------------------------
# Per-sample facts (the same function for builds, `medclip shards index` and `validate`)
# --------------------------------------------------------------------------------------------------------------
def sample_checksum(members: Mapping[str, bytes]) -> str:
    """Content checksum of one sample: sha256 over (extension, length, bytes) of its members in extension order.

    Keys starting with `__` (webdataset's `__key__`, `__url__`) are ignored, so a stream sample dict works too.
    """
    digest = hashlib.sha256()
    for extension in sorted(name for name in members if not name.startswith("__")):
        data = members[extension]
        digest.update(extension.encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:CHECKSUM_DIGITS]


def bank_entries(document: Mapping, text: str | None = None) -> list[tuple[str, list]]:
    """(sentence, label values) pairs a sample contributes to the bank (empty for image samples)."""
    if document.get("kind") not in BANK_KIND_BITS:
        return []
    entries = [(s["text"].strip(), s["labels"]) for s in document.get("sentences") or [] if s["text"].strip()]
    if not entries and document["kind"] == "text" and text and text.strip():
        entries = [(text.strip(), document["labels"])]
    return entries


@dataclass
class ShardFacts:
    """What the index records about one shard."""

    name: str
    keys: list[str] = field(default_factory=list)
    checksums: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)
    bank: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)  # (text, codes, kind)

    def add(self, key: str, document: Mapping, members: Mapping[str, bytes]) -> None:
        """Record one sample; bank entries with invalid labels are left out (the validator names them)."""
        text = members.get("txt")
        self.keys.append(key)
        self.checksums.append(sample_checksum(members))
        self.kinds[document["kind"]] += 1
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        for sentence, values in bank_entries(document, text):
            codes = _codes(values)
            if codes is not None:
                self.bank.append((sentence, codes, document["kind"]))

    def to_json(self) -> dict:
        return {"name": self.name, "keys": self.keys, "checksums": self.checksums, "kinds": dict(self.kinds),
                "bank": [list(entry) for entry in self.bank]}

    @classmethod
    def from_json(cls, data: Mapping) -> ShardFacts:
        return cls(data["name"], list(data["keys"]), list(data["checksums"]), Counter(data["kinds"]),
                   [(text, tuple(codes), kind) for text, codes, kind in data["bank"]])


@functools.lru_cache(maxsize=4096)
def _cached_codes(values: tuple) -> tuple[int, ...]:
    return tuple(int(code) for code in to_codes(list(values)))


def _codes(values: object) -> tuple[int, ...] | None:
    """Codes of a label vector (memoised: banks repeat a few thousand distinct vectors), None when invalid."""
    try:
        key = tuple(values)
        hash(key)
    except TypeError:
        return None
    if any(isinstance(v, bool) or (isinstance(v, float) and v != v) for v in key):
        return None  # invalid; bools would hit the cache entry of 1 / 0 (equal hashes), NaN would defeat it
    try:
        return _cached_codes(key)
    except LabelError:
        return None


# --------------------------------------------------------------------------------------------------------------
# The sentence bank as arrays
# --------------------------------------------------------------------------------------------------------------
@dataclass
class BankArrays:
    """The lean sentence bank: one UTF-8 buffer + offsets, an int8 code matrix, kind bits and counts."""

    text_bytes: np.ndarray
    text_offsets: np.ndarray
    codes: np.ndarray
    kinds: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.codes)

    def text(self, index: int) -> str:
        return bytes(self.text_bytes[self.text_offsets[index]:self.text_offsets[index + 1]]).decode("utf-8")

    def select_kinds(self, kinds: Iterable[str]) -> np.ndarray:
        """Indices of the entries seen in samples of any of `kinds` (paired, text)."""
        bits = sum(BANK_KIND_BITS[kind] for kind in set(kinds) if kind in BANK_KIND_BITS)
        return np.flatnonzero(self.kinds & bits)

    def entries(self) -> list[tuple[str, tuple[int, ...], int, int]]:
        """(text, codes, kind bits, count) per entry; for tests and merges."""
        return [(self.text(i), tuple(int(c) for c in self.codes[i]), int(self.kinds[i]), int(self.counts[i]))
                for i in range(len(self))]

    @classmethod
    def from_entries(cls, entries: Mapping[tuple[str, tuple[int, ...]], list[int]]) -> BankArrays:
        """From {(text, codes): [kind bits, count]}; sorted by UTF-8 text bytes, then codes."""
        ordered = sorted(((text.encode("utf-8"), codes), value) for (text, codes), value in entries.items())
        lengths = np.fromiter((len(t) for (t, _), _ in ordered), dtype=np.int64, count=len(ordered))
        offsets = np.zeros(len(ordered) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(
            text_bytes=np.frombuffer(b"".join(t for (t, _), _ in ordered), dtype=np.uint8).copy(),
            text_offsets=offsets,
            codes=np.array([codes for (_, codes), _ in ordered], dtype=CODE_DTYPE).reshape(len(ordered),
                                                                                          NUM_FINDINGS),
            kinds=np.array([value[0] for _, value in ordered], dtype=np.uint8),
            counts=np.array([value[1] for _, value in ordered], dtype=np.int32),
        )

    def to_bytes(self) -> bytes:
        """A deterministic .npz (fixed zip timestamps, uncompressed, no pickles)."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for name in BANK_ARRAYS:
                member = io.BytesIO()
                np.lib.format.write_array(member, np.ascontiguousarray(getattr(self, name)), allow_pickle=False)
                archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), member.getvalue())
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> BankArrays:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                bank = cls(**{name: arrays[name] for name in BANK_ARRAYS})
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
            raise ShardIndexError(f"{where}: not a shard-index sentence bank ({type(exc).__name__}: {exc})") from None
        n = len(bank.codes)
        if (bank.codes.ndim != 2 or bank.codes.shape[1] != NUM_FINDINGS or bank.codes.dtype != CODE_DTYPE
                or bank.text_offsets.shape != (n + 1,) or bank.kinds.shape != (n,) or bank.counts.shape != (n,)
                or (n and int(bank.text_offsets[-1]) != len(bank.text_bytes))):
            raise ShardIndexError(f"{where}: bank arrays have inconsistent shapes or dtypes")
        return bank


def merge_bank_entries(target: dict, facts: Iterable[ShardFacts]) -> dict:
    """Add shards' bank occurrences to {(text, codes): [kind bits, count]}."""
    for shard in facts:
        for text, codes, kind in shard.bank:
            value = target.setdefault((text, codes), [0, 0])
            value[0] |= BANK_KIND_BITS[kind]
            value[1] += 1
    return target


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def index_files(facts: Iterable[ShardFacts], label_policy: str, spec_version: int = SPEC_VERSION,
                bank_entries_map: dict | None = None) -> dict[str, bytes]:
    """The three index files (name -> bytes) for shards described by `facts`."""
    shards = sorted(facts, key=lambda s: s.name)
    bank_map = bank_entries_map if bank_entries_map is not None else merge_bank_entries({}, shards)
    bank = BankArrays.from_entries(bank_map).to_bytes()
    checksums = "".join(dump_json({"shard": s.name, "keys": s.keys, "checksums": s.checksums}) + "\n"
                        for s in shards).encode()
    kinds: Counter = Counter()
    for shard in shards:
        kinds.update(shard.kinds)
    index = {
        "index_version": INDEX_VERSION,
        "spec_version": spec_version,
        "label_order": list(CHEXPERT_FINDINGS),
        "label_policy": label_policy,
        "shards": {s.name: ShardInfo(s.name, len(s.keys), dict(s.kinds)).to_json() for s in shards},
        "samples": sum(len(s.keys) for s in shards),
        "kinds": dict(sorted(kinds.items())),
        "bank": {"file": BANK_FILE, "entries": len(bank_map), "sha256": _sha256(bank)},
        "checksums": {"file": CHECKSUMS_FILE, "samples": sum(len(s.keys) for s in shards),
                      "sha256": _sha256(checksums)},
    }
    return {BANK_FILE: bank, CHECKSUMS_FILE: checksums, INDEX_FILE: (dump_json(index, indent=2) + "\n").encode()}


def write_index_files(folder: Path, files: Mapping[str, bytes], write) -> None:
    """Write companions first and index.json last (its presence marks a complete index)."""
    for name in (BANK_FILE, CHECKSUMS_FILE, INDEX_FILE):
        write(Path(folder) / name, files[name])


# --------------------------------------------------------------------------------------------------------------
# Reading (local folders and any URL webdataset or fsspec opens)
# --------------------------------------------------------------------------------------------------------------
def index_url(location: str) -> str:
    """The index file for a folder / URL prefix, a shard URL (or brace pattern), or an explicit index path."""
    location = str(location)
    if INDEX_FILE in location:
        return location
    if _TAR_TOKEN.search(location):
        return _TAR_TOKEN.sub(INDEX_FILE, location)
    return location.rstrip("/") + "/" + INDEX_FILE


def sibling_url(index_location: str, name: str) -> str:
    """`name` (a shard or companion file) at the index's URL prefix."""
    head, found, tail = index_location.rpartition(INDEX_FILE)
    return head + name + tail if found else index_location.rstrip("/") + "/" + name


def read_url(url: str, what: str = "file") -> bytes:
    """All bytes at `url`; ShardIndexError naming the URL when it cannot be read."""
    try:
        handle = open_url(url)
        try:
            data = handle.read()
        finally:
            handle.close()
    except FileNotFoundError:
        raise ShardIndexError(f"{url}: {what} not found; write it with 'medclip shards index DIR' "
                          "(builds made before the index existed)") from None
    except Exception as exc:  # pipes, curl and fsspec backends raise their own types
        raise ShardIndexError(f"{url}: cannot read the {what} ({type(exc).__name__}: {exc})") from None
    return data


@dataclass
class ShardInfo:
    """One entry of `index.json`'s `shards`: `{name: {"samples": n, "kinds": {kind: n}}}`."""

    name: str
    samples: int
    kinds: dict[str, int]

    @property
    def image_samples(self) -> int:
        return sum(self.kinds.get(kind, 0) for kind in IMAGE_KINDS)

    def to_json(self) -> dict:
        return {"samples": self.samples, "kinds": dict(sorted(self.kinds.items()))}

    @classmethod
    def from_json(cls, name: str, entry: Mapping) -> ShardInfo:
        return cls(name, entry["samples"], dict(entry["kinds"]))


@dataclass
class ShardIndex:
    """A parsed `index.json`; the bank and checksums are read on first use (and their sha256 checked)."""

    location: str
    index_version: int
    spec_version: int
    label_policy: str
    label_order: list[str]
    shards: dict[str, ShardInfo]
    samples: int
    kinds: dict[str, int]
    bank: dict
    checksums: dict
    _bank: BankArrays | None = field(default=None, repr=False)
    _checksums: dict | None = field(default=None, repr=False)

    def shard_url(self, name: str) -> str:
        return sibling_url(self.location, name)

    def _companion(self, entry: dict, what: str) -> bytes:
        url = self.shard_url(entry["file"])
        data = read_url(url, what)
        if _sha256(data) != entry["sha256"]:
            raise ShardIndexError(f"{url}: sha256 differs from {self.location} (the {what} was changed or belongs to "
                              "another build); rewrite the index with 'medclip shards index DIR'")
        return data

    def bank_arrays(self) -> BankArrays:
        """The sentence bank (read once, then cached)."""
        if self._bank is None:
            self._bank = BankArrays.from_bytes(self._companion(self.bank, "sentence bank"), self.shard_url(
                self.bank["file"]))
        return self._bank

    def sample_checksums(self) -> dict[str, dict[str, str]]:
        """{shard name: {sample key: checksum}} (read once, then cached)."""
        if self._checksums is None:
            data = self._companion(self.checksums, "checksum list")
            out: dict[str, dict[str, str]] = {}
            for line in data.decode("utf-8").splitlines():
                entry = json.loads(line)
                out[entry["shard"]] = dict(zip(entry["keys"], entry["checksums"], strict=True))
            self._checksums = out
        return self._checksums


def parse_index(data: bytes, location: str) -> ShardIndex:
    """Check and parse `index.json` bytes; ShardIndexError naming `location` for anything malformed."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardIndexError(f"{location}: not valid UTF-8 JSON ({exc})") from None
    problems = index_problems(document)
    if problems:
        raise ShardIndexError(f"{location}: {problems[0]}")
    shards = {name: ShardInfo.from_json(name, entry) for name, entry in document["shards"].items()}
    return ShardIndex(location=location, **{key: document[key] for key in INDEX_KEYS} | {"shards": shards})


def read_index(location: str) -> ShardIndex:
    """The index of a build: `location` is its folder or URL prefix, a shard URL, or the index file itself.

    Reads only `index.json` (the bank and checksums on demand); never opens an image shard.
    """
    url = index_url(location)
    return parse_index(read_url(url, "shard index"), url)


def index_problems(document: object) -> list[str]:
    """Structure problems of an `index.json` document (the schema's `index` definition, hand-written)."""
    if not isinstance(document, dict):
        return ["index must be a JSON object"]
    problems = [f"lacks key {key!r}" for key in sorted(INDEX_KEYS - document.keys())]
    if problems:
        return problems
    if document["index_version"] != INDEX_VERSION:
        problems.append(f"index_version is {document['index_version']!r}; this reader reads {INDEX_VERSION}")
    if document["spec_version"] != SPEC_VERSION:
        problems.append(f"spec_version is {document['spec_version']!r}; this reader reads {SPEC_VERSION}")
    if document["label_order"] != list(CHEXPERT_FINDINGS):
        problems.append("label_order differs from findings.CHEXPERT_FINDINGS")
    if document["label_policy"] not in POLICIES:
        problems.append(f"label_policy {document['label_policy']!r} is not one of {', '.join(POLICIES)}")
    shards = document["shards"]
    if not isinstance(shards, dict):
        problems.append("shards must be an object {name: {samples, kinds}}")
    else:
        for name, entry in shards.items():
            if not SHARD_PATTERN.match(name):
                problems.append(f"shards: {name!r} is not <prefix>-<6 digits>.tar")
            elif not (isinstance(entry, dict) and isinstance(entry.get("samples"), int)
                      and isinstance(entry.get("kinds"), dict)
                      and all(k in KINDS and isinstance(v, int) for k, v in entry["kinds"].items())
                      and sum(entry["kinds"].values()) == entry["samples"]):
                problems.append(f"shards: {name}: needs samples (int) and kinds {{kind: int}} summing to it")
    for key, names in (("bank", ("file", "entries", "sha256")), ("checksums", ("file", "samples", "sha256"))):
        entry = document[key]
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and "/" not in entry["file"]
                and isinstance(entry.get(names[1]), int) and isinstance(entry.get("sha256"), str)):
            problems.append(f"{key} must give file (a name beside index.json), {names[1]} (int) and sha256")
    if not isinstance(document["samples"], int):
        problems.append("samples must be an integer")
    elif isinstance(shards, dict) and not problems and document["samples"] != sum(
            e["samples"] for e in shards.values()):
        problems.append(f"samples is {document['samples']}, the shards entries sum to "
                        f"{sum(e['samples'] for e in shards.values())}")
    return problems
