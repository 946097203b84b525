"""Label-aware WebDataset streams for MedCLIP training inside OpenCLIP's data machinery.

MedCLIP decouples images and texts: an image without a report is paired at load time with a sentence from a
labelled sentence bank that shares one of its positive findings, so image-only and text-only corpora both feed
training. `get_medclip_wds_dataset` has `open_clip_train.data.get_wds_dataset`'s signature and *is* that function:
`open_clip_medclip.plugins.openclip_data` calls it and splices the MedCLIP stages into the pipeline it builds
(shard lists, resampling, upsampling factors, shard shuffle, node/worker split, `with_epoch` and the batch
arithmetic stay upstream's):

    tar reader (any URL; samples counted per shard) -> seeded sample shuffle -> image-bearing samples ->
    check (the shard validator's own `check_sample`; one decode; its `decoded_image_problems`), skips named ->
    pick a text (own report sentence | bank sentence) -> image transform -> batch -> tokenize, trim to the
    batch's longest text -> pack labels

Start-up reads only the shard index files written beside the shards (`medclip shards build` / `medclip shards
index DIR`): per-shard sample counts by kind, the build's label policy and the sentence bank — plus each build's
small `provenance.json` for the image size the validator checks (the index does not record it) — never an image
shard, once per rank. URLs are anything OpenCLIP/webdataset read: local paths, brace patterns, `::` groups,
`pipe:` commands, `http(s)://`, and fsspec URLs (`s3://` ... with the fsspec backend installed). The index is
looked up at the shards' URL prefix, or given with `--medclip-index LOCATION[::LOCATION...]` (one per group).

Labels travel through OpenCLIP's `(images, texts)` batches packed behind the token ids by
`open_clip_medclip.labels.pack_batch` (small integer codes and a marker column, any token width); the model
subclass in `plugins.openclip_train` unpacks them. The `--medclip-uncertain` policy is applied exactly once, here,
to the raw codes, after checking it against the build's recorded policy.
"""
from __future__ import annotations

import io
import itertools
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np
import torch

from . import hosted
from . import labels as label_contract
from .augment import GrayToNormalizedRGB, PadToSquare, medclip_train_transform  # noqa: F401  (re-exported)
from .errors import UserError
from .findings import CHEXPERT_FINDINGS, FINDING_INDEX, NUM_FINDINGS
from .options import MedclipOptions

log = logging.getLogger("open_clip_medclip.streams")

NO_FINDING = FINDING_INDEX["No Finding"]
SAMPLE_KINDS = ("paired", "image", "text")
IMAGE_KINDS = ("paired", "image")
IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")

# How the pairing stage chose a sample's text (kept on the sample for tests and statistics).
RULE_OWN_REPORT = "own-report"  # paired study: a sentence of its own report
RULE_SHARED_FINDING = "shared-finding"  # bank sentence sharing a positive finding with the image
RULE_NO_FINDING = "no-finding"  # image without positive findings: a No Finding bank sentence
RULE_FALLBACK = "fallback-no-finding"  # no bank sentence has any of the image's findings (as MedCLIP does)

# Findings that count for the shared-finding rule (No Finding excluded), as bits of a per-sentence mask.
_PAIRING_FINDINGS = tuple(f for f in range(NUM_FINDINGS) if f != NO_FINDING)


# --------------------------------------------------------------------------------------------------------------
# Label transport (kept for old callers: the one contract is `open_clip_medclip.labels`)
# --------------------------------------------------------------------------------------------------------------
def pack_labels(tokens: torch.Tensor, image_labels, text_labels) -> torch.Tensor:
    """Deprecated alias of `labels.pack_batch` (one row or a batch); use `open_clip_medclip.labels`."""
    return label_contract.pack_batch(tokens, torch.as_tensor(image_labels, dtype=torch.float32),
                                     torch.as_tensor(text_labels, dtype=torch.float32))


def unpack_labels(texts: torch.Tensor, context_length: int | None = None, num_labels: int = NUM_FINDINGS):
    """Deprecated alias of `labels.unpack_batch` (any token width; the arguments are ignored)."""
    return label_contract.unpack_batch(texts)


# --------------------------------------------------------------------------------------------------------------
# Lean sentence bank: one UTF-8 buffer + offsets, an int8 code matrix, per-finding index arrays
# --------------------------------------------------------------------------------------------------------------
class SentenceBank:
    """Deduplicated labelled sentences indexed by positive finding, for drawing texts that match an image.

    Storage is a handful of flat arrays, so forked loader workers share it copy-on-write: `buffer` (all texts as
    UTF-8, one `bytes` object), `offsets` (int64 [N+1]), `codes` (raw int8 label codes [N, 14]), `masks` (int16
    bit mask of each sentence's positive findings under the policy) and `by_finding` (int32 index arrays of the
    sentences positive for each finding). No per-sentence Python object exists until a sentence is drawn.
    """

    def __init__(self, buffer: bytes | np.ndarray, offsets: np.ndarray, codes: np.ndarray,
                 policy: str = "zeros") -> None:
        label_contract.check_policy_name(policy, label_contract.TRAINING_POLICIES)
        self.buffer = np.frombuffer(buffer, dtype=np.uint8) if isinstance(buffer, bytes | bytearray) else \
            np.ascontiguousarray(buffer, dtype=np.uint8)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.codes = np.ascontiguousarray(codes, dtype=label_contract.CODE_DTYPE).reshape(-1, NUM_FINDINGS)
        if len(self.offsets) != len(self.codes) + 1:
            raise ValueError(f"sentence bank: {len(self.codes)} label rows but {len(self.offsets) - 1} texts")
        self.policy = policy
        positive = label_contract.apply_policy(self.codes, policy) == 1.0 if len(self.codes) else \
            np.zeros((0, NUM_FINDINGS), dtype=bool)
        bits = (1 << np.arange(NUM_FINDINGS, dtype=np.int32)).astype(np.int32)
        bits[NO_FINDING] = 0
        self.masks = (positive.astype(np.int32) @ bits).astype(np.int32)
        self.by_finding = [np.flatnonzero(positive[:, f]).astype(np.int32) for f in range(NUM_FINDINGS)]
        self._sizes = [len(a) for a in self.by_finding]
        # policy lookup by code (codes were checked to lie in BLANK_CODE..1 by apply_policy above)
        self._table = label_contract.apply_policy(np.arange(label_contract.BLANK_CODE, 2, dtype=np.int8), policy)

    # construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: Sequence[str], codes: np.ndarray, policy: str = "zeros") -> SentenceBank:
        """From sentence texts and their raw codes [N, 14]; stripped duplicates keep their first labels."""
        first: dict[str, int] = {}
        for row, text in enumerate(texts):
            text = text.strip()
            if text and text not in first:
                first[text] = row
        encoded = [t.encode("utf-8") for t in first]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        rows = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        codes = np.asarray(codes, dtype=label_contract.CODE_DTYPE).reshape(-1, NUM_FINDINGS)
        return cls(b"".join(encoded), offsets, codes[rows], policy)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, Sequence[float | None]]], policy: str = "zeros") -> SentenceBank:
        """From (sentence, label values) pairs (1/0/-1/None); values are validated by the label contract."""
        texts, vectors = [], []
        for text, values in entries:
            texts.append(text)
            vectors.append(values)
        return cls.from_texts(texts, label_contract.codes_matrix(vectors, "sentence bank"), policy)

    @classmethod
    def concat(cls, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], policy: str) -> SentenceBank:
        """One bank from several (buffer, offsets, codes) parts, e.g. several builds' indexes; an entry (text and
        codes) found in several parts is kept once. A single part is used as it is (no copy)."""
        parts = [p for p in parts if len(p[1]) > 1]
        if not parts:
            return cls(b"", np.zeros(1, dtype=np.int64), np.zeros((0, NUM_FINDINGS)), policy)
        if len(parts) == 1:
            return cls(*parts[0], policy=policy)
        seen: dict[tuple[bytes, bytes], None] = {}
        for buffer, offsets, part_codes in parts:
            buffer = np.asarray(buffer, dtype=np.uint8)
            part_codes = np.asarray(part_codes, dtype=label_contract.CODE_DTYPE).reshape(-1, NUM_FINDINGS)
            for row, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
                seen.setdefault((buffer[a:b].tobytes(), part_codes[row].tobytes()), None)
        texts = [t for t, _ in seen]
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in texts], out=offsets[1:])
        codes = np.frombuffer(b"".join(c for _, c in seen), dtype=label_contract.CODE_DTYPE).reshape(-1, NUM_FINDINGS)
        return cls(b"".join(texts), offsets, codes, policy)

    # access ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.codes)

    def text(self, index: int) -> str:
        return self.buffer[self.offsets[index]:self.offsets[index + 1]].tobytes().decode("utf-8")

    @property
    def texts(self) -> list[str]:
        """All texts as a list (tests and inspection; training never builds it)."""
        return [self.text(i) for i in range(len(self))]

    def targets(self, index: int) -> np.ndarray:
        """Float32 training targets of one sentence under the bank's policy."""
        return self._table[self.codes[index] - label_contract.BLANK_CODE]

    @property
    def labels(self) -> np.ndarray:
        """All targets [N, 14] under the bank's policy (tests and inspection)."""
        return label_contract.apply_policy(self.codes, self.policy)

    def counts(self) -> dict[str, int]:
        """Number of bank sentences positive for each finding."""
        return {name: size for name, size in zip(CHEXPERT_FINDINGS, self._sizes, strict=True)}

    def nbytes(self) -> int:
        return self.buffer.nbytes + self.offsets.nbytes + self.codes.nbytes + self.masks.nbytes + \
            sum(a.nbytes for a in self.by_finding)

    # drawing -----------------------------------------------------------------------------------------------
    def draw(self, image_targets: Sequence[float], rng: random.Random) -> tuple[int, str]:
        """Index of a sentence for an image (policy-applied targets) and the rule that chose it.

        A sentence sharing any positive finding (No Finding excluded) is drawn uniformly from the union of the
        matching findings' sentences: a finding is picked in proportion to its pool size and a sentence in its
        pool, then kept with probability 1/(number of the image's findings it has) — so no union is built. Images
        without positives get a No Finding sentence; if the bank has none of the image's findings, a No Finding
        sentence (MedCLIP's fallback).
        """
        sizes = self._sizes
        if isinstance(image_targets, np.ndarray):
            image_targets = image_targets.tolist()
        image_mask = 0
        has_positive = False
        pools = []
        total = 0
        for f in _PAIRING_FINDINGS:
            if image_targets[f] == 1.0:
                has_positive = True
                if sizes[f]:
                    image_mask |= 1 << f
                    pools.append(f)
                    total += sizes[f]
        if total:
            by_finding, masks = self.by_finding, self.masks
            while True:
                pick = rng.randrange(total)
                for f in pools:
                    if pick < sizes[f]:
                        break
                    pick -= sizes[f]
                index = int(by_finding[f][pick])
                shared = (int(masks[index]) & image_mask).bit_count()
                if shared == 1 or rng.random() * shared < 1.0:
                    return index, RULE_SHARED_FINDING
        rule = RULE_FALLBACK if has_positive else RULE_NO_FINDING
        pool = self.by_finding[NO_FINDING]
        if not len(pool):
            if not len(self):
                raise UserError("the sentence bank is empty: add text-only or paired shards (or --medclip-bank-data)")
            return rng.randrange(len(self)), RULE_FALLBACK
        return int(pool[rng.randrange(len(pool))]), rule


# --------------------------------------------------------------------------------------------------------------
# URLs and the shard index
# --------------------------------------------------------------------------------------------------------------
def expand_shard_groups(urls: str | Sequence[str], weights: str | Sequence[float] | None = None
                        ) -> list[tuple[list[str], float | None]]:
    """`a::b` brace-notation groups (and `--train-data-upsampling-factors`) as [(shard list, factor)]."""
    import braceexpand

    groups = urls.split("::") if isinstance(urls, str) else [list(urls)]
    if weights is None:
        factors: list[float | None] = [None] * len(groups)
    else:
        factors = [float(w) for w in (weights.split("::") if isinstance(weights, str) else weights)]
        if len(factors) != len(groups):
            raise UserError(f"{len(groups)} data groups but {len(factors)} upsampling factors ({weights!r})")
    return [(group if isinstance(group, list) else list(braceexpand.braceexpand(group)), factor)
            for group, factor in zip(groups, factors, strict=True)]


def shard_name(url: str) -> str:
    """The shard's file name, the key of the index's per-shard table (for `pipe:` URLs, its last `.tar` word)."""
    words = [w.strip("'\"") for w in url.split()]
    tars = [w for w in words if w.endswith(".tar")]
    path = tars[-1] if tars else url
    if "://" in path:
        path = urlparse(path).path
    return path.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class ShardCounts:
    """Samples of one shard by kind, as the index records them."""

    kinds: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    @property
    def images(self) -> int:
        return sum(self.kinds.get(k, 0) for k in IMAGE_KINDS)


class _IndexCache:
    """Shard indexes by index URL, each read once (only `index.json`; the bank on demand)."""

    def __init__(self) -> None:
        self.indexes: dict[str, object] = {}
        self.provenance_sides: dict[str, int | None] = {}

    def get(self, location: str):
        from .shards.index import index_url, read_index

        url = index_url(location)
        if url not in self.indexes:
            self.indexes[url] = read_index(url)
        return url, self.indexes[url]

    def lookup(self, url: str, location: str | None) -> tuple[str, ShardCounts]:
        """(index URL, counts) of the shard at `url`; its index is `location`, or found at the shard's prefix."""
        where, index = self.get(location or url)
        name = shard_name(url)
        if name not in index.shards:
            path = local_path(url)
            if path is not None and not os.path.exists(path):  # a typo or an unmatched pattern, not a stale index
                raise UserError(f"{url}: no such file")
            raise UserError(f"{url}: shard {name!r} is not in the shard index {where} ({len(index.shards)} shards "
                            f"listed); rewrite it with `medclip shards index DIR` or fix --medclip-index")
        return where, ShardCounts({k: int(v) for k, v in index.shards[name].kinds.items()})

    def longer_side(self, index_location: str, shard_url: str) -> int | None:
        """The build's `provenance.image.longer_side`, for the decoded-image size check `validate` also runs.

        The shard index does not record it, so `provenance.json` (a few hundred bytes, written beside the shards
        by every build) is read once per build and rank: at the index's prefix, else at the shard's own prefix
        (an index given with --medclip-index may live elsewhere). Without a readable provenance the size check is
        off (None) and the log says so; the mode check and every other check still run.
        """
        from .shards.format import PROVENANCE_FILE
        from .shards.index import index_url, sibling_url

        candidates = list(dict.fromkeys([sibling_url(index_location, PROVENANCE_FILE),
                                         sibling_url(index_url(shard_url), PROVENANCE_FILE)]))
        for url in candidates:
            if url not in self.provenance_sides:
                self.provenance_sides[url] = _read_longer_side(url)
            if self.provenance_sides[url] is not None:
                return self.provenance_sides[url]
        return None


def _read_longer_side(url: str) -> int | None:
    import json

    from .shards.format import Provenance
    from .shards.index import ShardIndexError, read_url

    try:
        document = json.loads(read_url(url, "build provenance").decode("utf-8"))
    except ShardIndexError:
        log.info("medclip streams: no build provenance at %s: image sizes are not checked against the build's "
                 "longer side (image mode and every other check still run)", url)
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("medclip streams: %s is not valid JSON (%s): image sizes are not checked", url, exc)
        return None
    side = Provenance.from_json(document).longer_side if isinstance(document, dict) else None
    if side is None:
        log.warning("medclip streams: %s gives no integer image.longer_side: image sizes are not checked", url)
    return side


@dataclass
class StreamPlan:
    """What the streams need at start-up, read from the shard indexes only."""

    image_urls: list[str]
    image_weights: list[float] | None
    expected: dict[str, int]  # shard URL -> samples (all kinds) the index lists
    policies: dict[str, str]  # shard URL -> the build's recorded label policy
    checksums: dict[str, dict[str, str]] | None  # shard URL -> {key: content checksum} (--medclip-verify-checksums)
    image_samples: int
    bank: SentenceBank
    policy: str
    indexes: dict[str, object] = field(default_factory=dict)
    longer_sides: dict[str, int | None] = field(default_factory=dict)  # shard URL -> provenance image.longer_side

    def summary(self) -> str:
        return (f"{len(self.image_urls)} image shards, {self.image_samples} image samples, sentence bank "
                f"{len(self.bank)} sentences, label policy {self.policy!r} (from indexes at "
                f"{', '.join(self.indexes)})")


def _explicit_indexes(value: str | None, groups: int) -> list[str | None]:
    if not value:
        return [None] * groups
    locations = value.split("::")
    if len(locations) == 1:
        return locations * groups
    if len(locations) != groups:
        raise UserError(f"--medclip-index has {len(locations)} locations for {groups} data groups ({value!r})")
    return locations


def _bank_part(index, kinds: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text buffer, offsets, codes) of an index's sentence bank, restricted to entries seen in `kinds`."""
    arrays = index.bank_arrays()
    buffer, offsets, codes = arrays.text_bytes, arrays.text_offsets, arrays.codes
    if {"paired", "text"} <= set(kinds):
        return buffer, offsets, codes
    keep = arrays.select_kinds(kinds)
    texts = [arrays.text(int(i)) for i in keep]
    encoded = [t.encode("utf-8") for t in texts]
    sub_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=sub_offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), sub_offsets, codes[keep]


_WILDCARDS = ("*", "?", "[")


def local_path(url: str) -> str | None:
    """The file a local shard URL names (a path or `file:`), None for remote URLs."""
    if is_remote_url(url):
        return None
    return urlparse(url).path if url.startswith("file:") else url


def check_shards_exist(option: str, urls: str | None) -> None:
    """`option PATTERN: no such file URL` for the first local shard of `urls` that does not exist (an unmatched
    brace pattern, a typo, a literal `*.tar`: OpenCLIP expands braces, never wildcards)."""
    if not urls:
        return
    for shards, _ in expand_shard_groups(urls):
        missing = [url for url in shards if local_path(url) is not None and not os.path.exists(local_path(url))]
        if not missing:
            continue
        count = f" ({len(missing)} of the {len(shards)} shards it names are missing)" if len(shards) > 1 else ""
        hint = ("; shard lists take brace notation, not wildcards: e.g. dir/train-{000000..000009}.tar"
                if any(c in urls for c in _WILDCARDS) else "")
        raise UserError(f"{option} {urls!r}: no such file {missing[0]}{count}{hint}")


def preflight_shards(args, world_size: int) -> str | None:
    """Checks before anything is built: every local shard exists, and without --dataset-resampled each loader
    worker of each rank gets an image shard (open_clip_train asserts it with a traceback otherwise).

    Too few image shards for `--workers` x ranks caps `args.workers` (returned: the line saying so); fewer image
    shards than ranks is a `UserError` saying what to do. Reads only the shard indexes.
    """
    check_shards_exist("--train-data", getattr(args, "train_data", None))
    check_shards_exist("--val-data", getattr(args, "val_data", None))
    options = MedclipOptions.from_args(args)
    check_shards_exist("--medclip-bank-data", options.bank_data)
    if not getattr(args, "train_data", None) or getattr(args, "dataset_resampled", False):
        return None
    groups = expand_shard_groups(args.train_data)
    cache = _IndexCache()
    images = sum(1 for (shards, _), location in zip(groups, _explicit_indexes(options.index, len(groups)), strict=True)
                 for url in shards if cache.lookup(url, location)[1].images)
    workers = max(0, int(getattr(args, "workers", 0) or 0))
    if images >= max(1, workers) * world_size:
        return None
    if images < world_size:
        raise UserError(
            f"--train-data: {images} image shard(s) for {world_size} ranks: each rank reads its own shards; pass "
            "--dataset-resampled (shards drawn with replacement), run fewer ranks, or build more, smaller shards "
            "(medclip shards build --samples-per-shard N)")
    capped = images // world_size
    args.workers = capped
    return (f"--workers {workers} capped to {capped}: {images} image shard(s) for {world_size} rank(s), and each "
            "loader worker reads its own shards (--dataset-resampled keeps every worker; more, smaller shards too)")


def plan_streams(args, is_train: bool) -> StreamPlan:
    """Image-bearing shards (with upsampling factors), expected counts and the sentence bank, from the indexes."""
    urls = args.train_data if is_train else args.val_data
    weights = getattr(args, "train_data_upsampling_factors", None) if is_train else None
    options = MedclipOptions.from_args(args)
    policy = options.uncertain
    groups = expand_shard_groups(urls, weights)
    explicit = _explicit_indexes(options.index, len(groups))
    cache = _IndexCache()
    image_urls: list[str] = []
    image_weights: list[float] | None = [] if weights is not None else None
    expected: dict[str, int] = {}
    policies: dict[str, str] = {}
    longer_sides: dict[str, int | None] = {}
    image_samples = 0
    bank_locations: list[str] = []
    needs_bank = False
    explicit_of: dict[str, str | None] = {}
    for (shards, factor), location in zip(groups, explicit, strict=True):
        for url in shards:
            explicit_of[url] = location
            where, counts = cache.lookup(url, location)
            bank_locations.append(where)
            expected[url] = counts.total
            policies[url] = cache.indexes[where].label_policy
            if counts.images:
                image_urls.append(url)
                longer_sides[url] = cache.longer_side(where, url)
                image_samples += counts.images
                needs_bank = needs_bank or counts.kinds.get("image", 0) > 0
                if image_weights is not None:
                    image_weights.append(factor)
    extra_bank = options.bank_data
    if extra_bank:
        bank_groups = expand_shard_groups(extra_bank)
        bank_explicit = _explicit_indexes(options.bank_index, len(bank_groups))
        for (shards, _), location in zip(bank_groups, bank_explicit, strict=True):
            bank_locations += [cache.lookup(url, location)[0] for url in shards]
    if not is_train and not options.val_own_bank and getattr(args, "train_data", None):
        train_groups = expand_shard_groups(args.train_data)
        train_explicit = _explicit_indexes(options.index, len(train_groups))
        for (shards, _), location in zip(train_groups, train_explicit, strict=True):
            bank_locations += [cache.lookup(url, location)[0] for url in shards]
    if not image_urls:
        raise UserError(f"{urls}: no shard holds images (paired or image kind, says the index); nothing to train on")
    for location, index in cache.indexes.items():
        label_contract.check_policy(getattr(index, "label_policy", "raw"), policy, where=f"shards at {location}")
    bank_kinds = tuple(options.bank_kinds)
    parts = [_bank_part(cache.indexes[loc], bank_kinds) for loc in dict.fromkeys(bank_locations)]
    bank = SentenceBank.concat(parts, policy)
    if needs_bank and not len(bank):
        raise UserError(f"{urls}: image-only shards need a sentence bank, but no text-only or paired shard has "
                        "sentences (add text shards to the data or pass --medclip-bank-data)")
    checksums = None
    if options.verify_checksums:  # one more index file, read once per rank
        checksums = {}
        for url in image_urls:
            where, _ = cache.get(explicit_of.get(url) or url)
            checksums[url] = cache.indexes[where].sample_checksums().get(shard_name(url), {})
    return StreamPlan(image_urls, image_weights, expected, policies, checksums, image_samples, bank, policy,
                      dict(cache.indexes), longer_sides)


# --------------------------------------------------------------------------------------------------------------
# Per-worker stream statistics: samples per shard against the index, named skips, the epoch summary
# --------------------------------------------------------------------------------------------------------------
def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


class StreamStats:
    """Counts of one loader worker: samples read per shard (compared with the index), skipped samples by reason.

    Warnings about a shard are rate-limited to one line per shard per epoch (an epoch may read a shard several
    times when `with_epoch` repeats a short pass); repeats are counted in the epoch summary instead.
    """

    def __init__(self, expected: dict[str, int], rank: int = 0) -> None:
        self.expected = expected
        self.rank = rank
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self.shards_read = 0
        self.short: list[str] = []
        self.skipped: Counter = Counter()
        self.batches = 0
        self.failed_shards = 0
        self.warned: set[str] = set()
        self.suppressed = 0

    def warn_once(self, url: str, message: str, *values) -> None:
        """A warning about shard `url`, at most once per epoch (later ones are only counted)."""
        if url in self.warned:
            self.suppressed += 1
            return
        self.warned.add(url)
        log.warning(message, *values)

    def shard_done(self, url: str, count: int, error: str | None = None, attempts: int = 1) -> None:
        self.shards_read += 1
        expected = self.expected.get(url)
        if error is not None or (expected is not None and count != expected):
            what = f"{count} of {expected}" if expected is not None else str(count)
            tries = f" in {attempts} attempts" if attempts > 1 else ""
            line = f"{shard_name(url)}: read {what} samples{tries}" + (f" ({error})" if error else "")
            if line not in self.short:
                self.short.append(line)
            self.warn_once(url, "medclip streams: %s: read %s samples the shard index lists%s%s", url, what, tries,
                           f" before an error: {error}" if error else " (truncated or changed shard?)")
        elif attempts > 1:
            self.warn_once(url, "medclip streams: %s: read after %d attempts", url, attempts)

    def skip(self, url: str, key: str, reason: str) -> None:
        kind = reason.split(":", 1)[0]
        self.skipped[kind] += 1
        log.warning("medclip streams: skipped sample %s in %s: %s", key, url, reason)

    def summary(self, epoch: int | None) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        text = (f"medclip streams epoch {epoch} rank {self.rank} worker {_worker_id()}: {self.samples} samples read "
                f"from {self.shards_read} shards, {skipped} skipped" + (f" ({reasons})" if reasons else ""))
        if self.failed_shards:
            text += f"; {self.failed_shards} shard(s) skipped after retries"
        if self.short:
            text += f"; shards not matching the index: {'; '.join(self.short)}"
        if self.suppressed:
            text += f"; {self.suppressed} repeated shard warning(s) not shown"
        return text

    def report(self, epoch: int | None) -> None:
        (log.warning if self.short or self.skipped or self.failed_shards else log.info)(self.summary(epoch))
        self.reset()


class ShardSourceError(UserError):
    """The shard source failed past the `--medclip-shard-*` budget: the run stops (exit code 3).

    Raised in a loader worker, it reaches the main process through the DataLoader, which wraps its message in the
    worker's traceback; `ShardSourceError.line(exc)` recovers the one line.
    """

    exit_code = 3

    @staticmethod
    def line(exc: BaseException) -> str:
        lines = [part.strip() for part in str(exc).splitlines() if part.strip()]
        marker = f"{ShardSourceError.__name__}: "
        for part in reversed(lines):
            if marker in part:
                return part.split(marker, 1)[1].strip()
        return lines[-1] if lines else ShardSourceError.__name__


def is_remote_url(url: str) -> bool:
    """Whether reading `url` goes over a network or a command (http(s), `pipe:`, fsspec), where a retry can help."""
    scheme = urlparse(url).scheme
    return not (scheme in ("", "file") or len(scheme) == 1)


@dataclass(frozen=True)
class ShardFailurePolicy:
    """`--medclip-shard-*`: how remote shard reads retry, and when failed shards stop the run.

    A remote shard whose read ends in an error (cannot open, HTTP error, truncated body, no byte for `timeout`
    seconds, a `pipe:` command failing) is re-read up to `retries` times, waiting `backoff`, 2x, 4x ... seconds
    (at most 60) between tries; samples already delivered are not delivered again. A shard that still fails is
    skipped and counted. A loader worker stops the run when `max_failures` shards fail in a row, or when the
    shards it skipped this epoch exceed `max_skipped` of its share of the epoch's shards (`share`). Local files
    are read once (a retry cannot change them) and never stop the run this way; a whole pass over a worker's
    shards without one sample stops it whatever the source (otherwise `with_epoch` would repeat it forever).
    """

    retries: int
    timeout: float
    backoff: float
    max_failures: int
    max_skipped: float
    share: int = 1

    def wait(self, attempt: int) -> float:
        return min(60.0, self.backoff * 2 ** (attempt - 1))

    def budget(self) -> str:
        return f"{self.retries} retries, {self.timeout:g} s read timeout"

    @classmethod
    def from_args(cls, args=None, shards: int = 1) -> ShardFailurePolicy:
        """From the `--medclip-shard-*` options (`MedclipOptions`, their defaults where `args` lacks them);
        `shards`: the epoch's shards, shared by world size x loader workers."""
        options = MedclipOptions.from_args(args)
        given = {name: getattr(options, f"shard_{name}") for name in ("retries", "timeout", "backoff", "max_failures",
                                                                      "max_skipped")}
        for name, value in given.items():
            if value < 0 or (name == "max_failures" and value < 1):
                raise UserError(f"--medclip-shard-{name.replace('_', '-')} must be "
                                f"{'>= 1' if name == 'max_failures' else '>= 0'}, got {value}")
        readers = max(1, int(getattr(args, "world_size", 1) or 1)) * max(1, int(getattr(args, "workers", 1) or 1))
        return cls(**given, share=max(1, -(-shards // readers)))


class ShardReader:
    """Pipeline stage: `{"url": ...}` dicts in, the samples of each shard out, counted per shard.

    Opens any URL webdataset or fsspec opens (`plugins.openclip_data.open_url`). A shard whose stream ends
    early is compared with the index when it ends; errors name the shard. Remote reads retry, and failing
    sources stop the run, as `policy` (`ShardFailurePolicy`) says.
    """

    def __init__(self, stats: StreamStats, policy: ShardFailurePolicy | None = None, epoch=None) -> None:
        self.stats = stats
        self.policy = policy or ShardFailurePolicy.from_args()
        self.epoch = epoch
        self.consecutive = 0
        self._skipped_epoch: tuple[object, int] = (None, 0)

    def _read(self, url: str, errors: list[str]) -> Iterator[dict]:
        def handler(exc: BaseException) -> bool:
            first = exc.args[0] if exc.args else ""
            errors.append(f"{type(exc).__name__}: {str(first).split(' @ ')[0]}".rstrip(": "))
            return True

        timeout = self.policy.timeout if is_remote_url(url) else None
        return hosted.piece("shard_samples")(url, handler, timeout=timeout or None)

    def _failed(self, url: str, error: str, attempts: int) -> None:
        """Count a remote shard skipped after its attempts; stop the run past the policy's thresholds."""
        policy = self.policy
        self.consecutive += 1
        self.stats.failed_shards += 1
        epoch = self.epoch.get_value() if hasattr(self.epoch, "get_value") else self.epoch
        seen_epoch, skipped = self._skipped_epoch
        skipped = skipped + 1 if seen_epoch == epoch else 1
        self._skipped_epoch = (epoch, skipped)
        why = None
        if self.consecutive >= policy.max_failures:
            why = f"{self.consecutive} shard(s) in a row failed"
        elif skipped > policy.max_skipped * policy.share:
            why = (f"{skipped} of this loader worker's {policy.share} shard(s) this epoch failed (more than "
                   f"--medclip-shard-max-skipped {policy.max_skipped:g})")
        if why is not None:
            raise ShardSourceError(
                f"stopping: {why} after {attempts} attempt(s) each ({policy.budget()}); last: {url}: {error}. "
                "Checkpoints written so far are intact; once the shards can be read again, rerun the same command "
                "with --resume latest")

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        attempted = delivered = 0
        last_error = None
        for shard in source:
            url = shard["url"] if isinstance(shard, dict) else str(shard)
            retries = self.policy.retries if is_remote_url(url) else 0
            count = attempts = 0
            while True:
                attempts += 1
                errors: list[str] = []
                already = count
                for position, sample in enumerate(self._read(url, errors)):
                    if position < already:  # a re-read: an earlier attempt delivered these
                        continue
                    count += 1
                    self.stats.samples += 1
                    yield sample
                if not errors or attempts > retries:
                    break
                log.debug("medclip streams: %s: attempt %d failed (%s); retrying", url, attempts, "; ".join(errors))
                time.sleep(self.policy.wait(attempts))
            attempted += 1
            delivered += count
            error = "; ".join(errors) if errors else None
            self.stats.shard_done(url, count, error, attempts)
            if error:
                last_error = f"{url}: {error}"
                if is_remote_url(url):
                    self._failed(url, error, attempts)
            elif is_remote_url(url):
                self.consecutive = 0
        if attempted and not delivered:
            raise ShardSourceError(f"stopping: no sample could be read from any of this loader worker's {attempted} "
                                   f"shard(s) in a whole pass; last: {last_error or 'no error, the shards are empty'}")


def check_stream_sample(sample: dict, policy: str, checksum: str | None = None) -> tuple[dict | None, list[str]]:
    """The shard validator's own per-sample check (`medclip shards validate` runs the same `check_sample`).

    Images are checked by their magic bytes here and fully decoded by the caller, once; `policy` is the build's
    recorded label policy (values such a build cannot have written are problems, e.g. NaN or -1 under zeros);
    `checksum` (with `--medclip-verify-checksums`) is the sample's content checksum from the shard index.
    """
    from .shards.validate import check_sample

    key = sample.get("__key__", "?")
    document, problems = check_sample(key, sample, shard=sample.get("__url__", ""), policy=policy,
                                      checksum=checksum)
    return document, [p.message if not p.member else f"{p.member}: {p.message}" for p in problems]


class CheckedSamples:
    """Pipeline stage: image-bearing samples that pass the shard validator's checks, decoded; others skipped.

    The validator's own functions decide: `check_sample` before the decode, `decoded_image_problems` (mode L, the
    build's longer side from `longer_sides`) after it; the image is decoded once. Each skip is logged with the
    shard, the key and the reason and counted for the epoch summary.
    """

    def __init__(self, stats: StreamStats, policies: dict[str, str] | None = None,
                 checksums: dict[str, dict[str, str]] | None = None,
                 longer_sides: dict[str, int | None] | None = None) -> None:
        self.stats = stats
        self.policies = policies or {}
        self.checksums = checksums
        self.longer_sides = longer_sides or {}

    def prepare(self, sample: dict) -> dict | None:
        from PIL import Image

        from .shards.validate import decoded_image_problems

        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        checksum = self.checksums.get(url, {}).get(key, "") if self.checksums is not None else None
        meta, problems = check_stream_sample(sample, self.policies.get(url, label_contract.RAW_POLICY), checksum)
        if problems:
            self.stats.skip(url, key, "invalid sample: " + "; ".join(problems))
            return None
        if meta.get("kind") not in IMAGE_KINDS:
            return None
        ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
        try:
            image = Image.open(io.BytesIO(sample[ext]))
            image.load()
        except Exception as exc:  # noqa: BLE001 - any decoder failure skips the sample, named
            self.stats.skip(url, key, f"corrupt image: {key}.{ext} does not decode ({type(exc).__name__}: {exc})")
            return None
        problems = decoded_image_problems(f"{key}.{ext}", image, self.longer_sides.get(url))
        if problems:
            self.stats.skip(url, key, "invalid sample: " + "; ".join(f"{p.member}: {p.message}" for p in problems))
            return None
        return {"__key__": key, "__url__": url, "image": image, "meta": meta, "txt": sample.get("txt")}

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        for sample in source:
            prepared = self.prepare(sample)
            if prepared is not None:
                yield prepared


def epoch_rng(purpose: str, seed: int, rank: int, epoch) -> random.Random:
    """A python RNG seeded by (purpose, seed, rank, dataloader worker, epoch): fresh per worker and epoch, and
    identical when a run is repeated or resumed. `epoch` is a SharedEpoch, an int or None."""
    epoch = epoch.get_value() if hasattr(epoch, "get_value") else int(epoch or 0)
    return random.Random(f"medclip-streams:{purpose}:{seed}:{rank}:{_worker_id()}:{epoch}")


class PairTexts:
    """Pipeline stage giving each image its text and both target vectors (the policy applied once, here).

    The RNG is re-seeded at every pass from (seed, rank, dataloader worker, epoch), so pairings differ per
    worker and per epoch yet repeat exactly across runs with the same seed.
    """

    def __init__(self, bank: SentenceBank, policy: str = "zeros", seed: int = 0, rank: int = 0, epoch=None) -> None:
        self.bank = bank
        self.policy = policy
        self.seed = seed
        self.rank = rank
        self.epoch = epoch  # open_clip_train.data.SharedEpoch, an int, or None

    def targets(self, values) -> np.ndarray:
        return label_contract.apply_policy(label_contract.to_codes(values), self.policy)

    def pair(self, sample: dict, rng: random.Random) -> dict:
        meta = sample["meta"]
        kind = meta.get("kind")
        image_targets = self.targets(meta["labels"])
        sentences = meta.get("sentences") or []
        if kind == "paired":
            if sentences:
                chosen = sentences[rng.randrange(len(sentences))]
                text, text_targets = chosen["text"], self.targets(chosen["labels"])
            else:
                report = sample.get("txt") or b""
                text = report.decode("utf-8") if isinstance(report, bytes) else str(report)
                text_targets = image_targets
            rule = RULE_OWN_REPORT
        elif kind == "image":
            index, rule = self.bank.draw(image_targets, rng)
            text, text_targets = self.bank.text(index), self.bank.targets(index)
        else:
            raise ValueError(f"{sample['__key__']}: kind {kind!r} has no image")
        return {"__key__": sample["__key__"], "image": sample["image"], "text": text,
                "image_labels": image_targets, "text_labels": text_targets, "rule": rule}

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        rng = epoch_rng("pair-texts", self.seed, self.rank, self.epoch)
        # Image augmentations downstream draw from torch's RNG: seed it per (worker, epoch) too, so a resumed
        # run sees exactly the batches the uninterrupted run saw.
        torch.manual_seed(epoch_rng("augment", self.seed, self.rank, self.epoch).getrandbits(63))
        for sample in source:
            yield self.pair(sample, rng)


class SeededShuffle:
    """The sample shuffle buffer with its RNG seeded per (rank, worker, epoch); webdataset seeds from pid/time."""

    def __init__(self, bufsize: int, initial: int, seed: int = 0, rank: int = 0, epoch=None) -> None:
        self.bufsize, self.initial = bufsize, initial
        self.seed, self.rank, self.epoch = seed, rank, epoch

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        return hosted.piece("seeded_shuffle")(source, self.bufsize, self.initial, epoch_rng("shuffle", self.seed, self.rank,
                                                                            self.epoch))


class ToTrainingSample:
    """(image tensor, text, image targets, text targets); tokenization waits for the whole batch (or was done by
    `BucketByLength`, which leaves the sample's token row in place of its text)."""

    def __init__(self, preprocess_image: Callable) -> None:
        self.preprocess_image = preprocess_image

    def __call__(self, sample: dict) -> tuple:
        text = sample["tokens"] if "tokens" in sample else sample["text"]
        return (self.preprocess_image(sample["image"]), text,
                torch.from_numpy(np.asarray(sample["image_labels"], dtype=np.float32)),
                torch.from_numpy(np.asarray(sample["text_labels"], dtype=np.float32)))


# --------------------------------------------------------------------------------------------------------------
# Text trimming and packing
# --------------------------------------------------------------------------------------------------------------
def trim_tokens(tokens: torch.Tensor, multiple: int = 8, pad_id: int = 0) -> torch.Tensor:
    """Drop the padding columns behind the batch's longest text, keeping a width that is a multiple of `multiple`.

    `multiple` 0 keeps the tokenizer's full width; 1 trims to exactly the longest text (what MedCLIP's collator
    does with `padding=True`); 8 (default for masked poolers) rounds up for tensor-core friendly shapes.
    """
    if multiple <= 0 or tokens.ndim != 2 or tokens.shape[1] == 0:
        return tokens
    used = tokens.ne(pad_id).any(dim=0).nonzero()
    width = trimmed_width(int(used[-1]) + 1 if len(used) else 1, tokens.shape[1], multiple)
    return tokens if width == tokens.shape[1] else tokens[:, :width].contiguous()


def trimmed_width(longest: int, full_width: int, multiple: int) -> int:
    """The width `trim_tokens` keeps for a batch whose longest text has `longest` tokens (multiple > 0)."""
    return min(full_width, -(-longest // multiple) * multiple)


def text_multiple_for(args) -> int:
    """`--medclip-text-multiple`: an int, or `auto` (default) from the model's text tower.

    auto: HF text towers with MedCLIP's reference pooler (`medclip_pooler`, which averages padding too) trim to
    exactly the longest text, as the authors' collator pads; other HF towers mask padding, so their embeddings do
    not depend on it and the width is rounded up to a multiple of 8; OpenCLIP's own text transformer: no trimming.
    """
    value = MedclipOptions.from_args(args).text_multiple
    if value != "auto":
        value = int(value)
        if value < 0:
            raise UserError(f"--medclip-text-multiple must be auto or >= 0, got {value}")
        return value
    model_name = getattr(args, "model", None)
    if not model_name:
        return 8
    import open_clip

    text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    if not text_cfg.get("hf_model_name"):
        return 0
    return 1 if text_cfg.get("hf_pooler_type") == "medclip_pooler" else 8


def text_bucket_for(args) -> int:
    """`--medclip-text-bucket N`: batches per length-sorted pool (0, the default: no bucketing)."""
    value = int(MedclipOptions.from_args(args).text_bucket or 0)
    if value < 0:
        raise UserError(f"--medclip-text-bucket must be >= 0, got {value}")
    return value


def tokenizer_pad_id(tokenizer) -> int:
    inner = getattr(tokenizer, "tokenizer", None)
    pad = getattr(inner, "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else 0


def token_lengths(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Per row: the index of its last non-padding token + 1 (the width `trim_tokens` would keep for it alone)."""
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return (tokens.ne(pad_id) * positions).amax(dim=1)


class BucketByLength:
    """`--medclip-text-bucket N`: length bucketing of the training stream, off by default.

    Takes `pool` batches' worth of paired samples at a time, tokenizes their texts in one call (the rows travel on
    as the samples' `tokens`, so `PackBatch` does not tokenize again), sorts them by token length (stable: equal
    lengths keep the shuffle buffer's random order), cuts the sorted pool into runs of `batch_size` and yields the
    runs in an order shuffled by an RNG seeded per (seed, rank, worker, epoch). `wds.batched` downstream cuts
    exactly these runs, so each batch holds texts of similar length and its trimmed width shrinks.

    Nothing is added or dropped: the samples of an epoch and its number of batches are those without bucketing.
    `worker_batches` (the worker's batches per epoch, from `with_epoch`) is a quota of full batches carried across
    the passes `with_epoch` repeats within an epoch, so no pool reaches into samples the epoch would not have used:
    the last pool of an epoch (or of a pass that runs dry) is partial, and its trailing `len % batch_size` samples,
    in stream order (what `batched(partial=False)` drops), stay out of the sort and come last. Bucketing changes
    which negatives share a batch: sentences of similar length.
    """

    def __init__(self, tokenizer: Callable, pool: int, batch_size: int, seed: int = 0, rank: int = 0, epoch=None,
                 worker_batches: int | None = None, pad_id: int | None = None) -> None:
        if pool < 1 or batch_size < 1:
            raise ValueError(f"bucketing needs pool >= 1 and batch_size >= 1, got {pool}, {batch_size}")
        self.tokenizer = tokenizer
        self.pool, self.batch_size = pool, batch_size
        self.seed, self.rank, self.epoch = seed, rank, epoch
        self.worker_batches = worker_batches or None
        self.pad_id = tokenizer_pad_id(tokenizer) if pad_id is None else pad_id
        self._left: int | None = None  # full batches still owed this epoch (None: no quota)
        self._left_epoch = None

    def runs(self, samples: list[dict], rng: random.Random) -> list[list[dict]]:
        """The pool's samples (tokens added) as runs of similar length, in shuffled order; a partial run last."""
        tokens = self.tokenizer([s["text"] for s in samples]).long()
        for sample, row in zip(samples, tokens):
            sample["tokens"] = row
        full = len(samples) - len(samples) % self.batch_size
        order = sorted(range(full), key=token_lengths(tokens[:full], self.pad_id).tolist().__getitem__)
        runs = [[samples[i] for i in order[start:start + self.batch_size]] for start in range(0, full, self.batch_size)]
        rng.shuffle(runs)
        if full < len(samples):
            runs.append(samples[full:])
        return runs

    def _quota(self) -> int | None:
        """Batches left in this epoch: a fresh quota at a new epoch or once the last one was used up; what is
        left of it when `with_epoch` starts another pass because the previous one ran dry."""
        if not self.worker_batches:
            return None
        epoch = self.epoch.get_value() if hasattr(self.epoch, "get_value") else self.epoch
        if epoch != self._left_epoch or not self._left:
            self._left, self._left_epoch = self.worker_batches, epoch
        return self._left

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        rng = epoch_rng("text-bucket", self.seed, self.rank, self.epoch)
        source = iter(source)
        while True:
            left = self._quota()
            take = self.pool if left is None else min(self.pool, left)
            samples = list(itertools.islice(source, take * self.batch_size))
            if left is not None:
                self._left = left - len(samples) // self.batch_size
            if samples:
                for run in self.runs(samples, rng):
                    yield from run
            if len(samples) < take * self.batch_size or self._left == 0:
                return


class PackBatch:
    """Tokenize a batch's texts in one call, trim the padding columns, pack the labels: `(images, packed texts)`.

    One tokenizer call per batch is about 3x cheaper per text than one per sample. Texts that arrive as a token
    tensor (tokenized by `BucketByLength`) are only trimmed.
    """

    def __init__(self, tokenizer: Callable, multiple: int = 8, pad_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.multiple = multiple
        self.pad_id = tokenizer_pad_id(tokenizer) if pad_id is None else pad_id

    def __call__(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        images, texts, image_targets, text_targets = batch
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenizer(list(texts))
        tokens = trim_tokens(tokens.long(), self.multiple, self.pad_id)
        return images, label_contract.pack_batch(tokens, image_targets, text_targets)


class EpochReport:
    """Last stage: passes batches through; logs the worker's stream summary at the end of each epoch."""

    def __init__(self, stats: StreamStats, worker_batches: int | None, epoch=None) -> None:
        self.stats = stats
        self.worker_batches = worker_batches
        self.epoch = epoch

    def _epoch(self) -> int | None:
        return self.epoch.get_value() if hasattr(self.epoch, "get_value") else self.epoch

    def __call__(self, source: Iterable) -> Iterator:
        for batch in source:
            self.stats.batches += 1
            if self.worker_batches and self.stats.batches >= self.worker_batches:
                self.stats.report(self._epoch())
            yield batch
        if not self.worker_batches:
            self.stats.report(self._epoch())


# --------------------------------------------------------------------------------------------------------------
# The dataset function (upstream's get_wds_dataset with the MedCLIP stages spliced in)
# --------------------------------------------------------------------------------------------------------------
def get_medclip_wds_dataset(args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None):
    """Drop-in for `open_clip_train.data.get_wds_dataset` that yields label-packed (image, text) batches."""
    import webdataset as wds

    plan = plan_streams(args, is_train)
    resampled = bool(getattr(args, "dataset_resampled", False)) and is_train
    if is_train and plan.image_weights is not None and not resampled:
        raise UserError("--train-data-upsampling-factors needs --dataset-resampled (as in open_clip_train)")
    rank = getattr(args, "rank", 0)
    failure_policy = ShardFailurePolicy.from_args(args, len(plan.image_urls))
    multiple = text_multiple_for(args)
    bucket = text_bucket_for(args) if is_train else 0
    if bucket and not multiple:
        log.warning("--medclip-text-bucket %d has no effect: text columns are not trimmed (--medclip-text-multiple "
                    "0, or OpenCLIP's own text tower); batches are not bucketed", bucket)
        bucket = 0
    log.info("medclip streams (%s): %s; text columns %s%s", "train" if is_train else "val", plan.summary(),
             {0: "not trimmed (tokenizer context)", 1: "trimmed to the batch's longest text"}.get(
                 multiple, f"trimmed to the batch's longest text rounded up to a multiple of {multiple}"),
             f"; batches bucketed by text length in pools of {bucket} batches" if bucket else "")

    def build_stages(shared_epoch, worker_batches, shuffle):
        stats = StreamStats(plan.expected, rank)
        shuffle_stage = None
        if shuffle is not None:
            shuffle_stage = SeededShuffle(shuffle[0], shuffle[1], seed=args.seed, rank=rank, epoch=shared_epoch)
        tail = [
            CheckedSamples(stats, plan.policies, plan.checksums, plan.longer_sides),
            PairTexts(plan.bank, policy=plan.policy, seed=args.seed, rank=rank, epoch=shared_epoch),
        ]
        if bucket:
            tail.append(BucketByLength(tokenizer, bucket, args.batch_size, seed=args.seed, rank=rank,
                                       epoch=shared_epoch, worker_batches=worker_batches))
        tail += [
            wds.map(ToTrainingSample(preprocess_img)),
            wds.batched(args.batch_size, partial=not is_train),
            wds.map(PackBatch(tokenizer, multiple)),
            EpochReport(stats, worker_batches, shared_epoch),
        ]
        return ShardReader(stats, failure_policy, shared_epoch), shuffle_stage, tail

    info = hosted.piece("spliced_wds_dataset")(args, preprocess_img, is_train, epoch, floor, tokenizer, shards=plan.image_urls,
                               weights=plan.image_weights, num_samples=plan.image_samples,
                               build_stages=build_stages)
    info.dataloader.medclip_plan = plan
    return info


def iter_pairs(urls: str, bank_data: str | None = None, policy: str = "zeros", seed: int = 0, epoch: int = 0,
               index: str | None = None):
    """(bank, iterator of paired samples: PIL image, text, targets, rule) from shards, in shard order.

    For inspection and tests: the same reading, checking and pairing stages as training, without shuffling.
    """
    from types import SimpleNamespace

    args = SimpleNamespace(train_data=urls, val_data=None, train_data_upsampling_factors=None,
                           medclip_bank_data=bank_data, medclip_uncertain=policy, medclip_index=index)
    plan = plan_streams(args, is_train=True)
    stats = StreamStats(plan.expected)
    stages = [ShardReader(stats), CheckedSamples(stats, plan.policies, plan.checksums, plan.longer_sides),
              PairTexts(plan.bank, policy=plan.policy, seed=seed, epoch=epoch)]
    source: Iterable = ({"url": url} for url in plan.image_urls)
    for stage in stages:
        source = stage(source)
    return plan.bank, source
