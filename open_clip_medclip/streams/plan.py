"""Start-up plan of the streams, from the shard indexes only: shard groups, counts, policies, the bank, checks."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np

from .. import labels as label_contract
from ..errors import UserError
from ..options import MedclipOptions
from ..shards.format import IMAGE_KINDS
from .bank import SentenceBank, pack_texts
from .faults import is_remote_url

log = logging.getLogger("open_clip_medclip.streams")


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

    def lookup(self, url: str, location: str | None) -> tuple[str, ShardCounts]:
        """(index URL, counts) of the shard at `url`; its index is `location`, or found at the shard's prefix."""
        from ..shards.index import index_url, read_index

        where = index_url(location or url)
        if where not in self.indexes:
            self.indexes[where] = read_index(where)
        index = self.indexes[where]
        name = shard_name(url)
        if name not in index.shards:
            path = local_path(url)
            if path is not None and not os.path.exists(path):  # a typo or an unmatched pattern, not a stale index
                raise UserError(f"{url}: no such file")
            raise UserError(f"{url}: shard {name!r} is not in the shard index {where} ({len(index.shards)} shards "
                            f"listed); rewrite it with `medclip shards index DIR` or fix --medclip-index")
        return where, ShardCounts({k: int(v) for k, v in index.shards[name].kinds.items()})

    def longer_side(self, index_location: str, shard_url: str) -> int | None:
        """The build's `provenance.image.longer_side` (not in the index), for the size check `validate` also runs.

        Read once per build and rank from the small `provenance.json` at the index's prefix, else at the shard's own
        (an index given with --medclip-index may live elsewhere); None, and logged, without a readable one.
        """
        from ..shards.format import PROVENANCE_FILE
        from ..shards.index import index_url, sibling_url

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

    from ..shards.format import Provenance
    from ..shards.index import ShardIndexError, read_url

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


def _located_shards(urls: str, index_option: str | None, weights=None
                    ) -> Iterator[tuple[str, float | None, str | None]]:
    """(shard URL, upsampling factor, `--medclip-index` location or None) of every shard of `urls`' groups."""
    groups = expand_shard_groups(urls, weights)
    for (shards, factor), location in zip(groups, _explicit_indexes(index_option, len(groups)), strict=True):
        for url in shards:
            yield url, factor, location


def _bank_part(index, kinds: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text buffer, offsets, codes) of an index's sentence bank, restricted to entries seen in `kinds`."""
    arrays = index.bank_arrays()
    buffer, offsets, codes = arrays.text_bytes, arrays.text_offsets, arrays.codes
    if {"paired", "text"} <= set(kinds):
        return buffer, offsets, codes
    keep = arrays.select_kinds(kinds)
    return *pack_texts([arrays.text(int(i)).encode("utf-8") for i in keep]), codes[keep]


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
    cache = _IndexCache()
    images = sum(1 for url, _, location in _located_shards(args.train_data, options.index)
                 if cache.lookup(url, location)[1].images)
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
    cache = _IndexCache()
    image_urls: list[str] = []
    image_weights: list[float] | None = [] if weights is not None else None
    expected: dict[str, int] = {}
    policies: dict[str, str] = {}
    longer_sides: dict[str, int | None] = {}
    index_of: dict[str, str] = {}  # image shard URL -> its index URL
    image_samples = 0
    bank_locations: list[str] = []
    needs_bank = False
    for url, factor, location in _located_shards(urls, options.index, weights):
        where, counts = cache.lookup(url, location)
        bank_locations.append(where)
        expected[url] = counts.total
        policies[url] = cache.indexes[where].label_policy
        if counts.images:
            image_urls.append(url)
            index_of[url] = where
            longer_sides[url] = cache.longer_side(where, url)
            image_samples += counts.images
            needs_bank = needs_bank or counts.kinds.get("image", 0) > 0
            if image_weights is not None:
                image_weights.append(factor)
    if options.bank_data:
        bank_locations += [cache.lookup(url, location)[0]
                           for url, _, location in _located_shards(options.bank_data, options.bank_index)]
    if not is_train and not options.val_own_bank and getattr(args, "train_data", None):
        bank_locations += [cache.lookup(url, location)[0]
                           for url, _, location in _located_shards(args.train_data, options.index)]
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
        checksums = {url: cache.indexes[index_of[url]].sample_checksums().get(shard_name(url), {})
                     for url in image_urls}
    return StreamPlan(image_urls, image_weights, expected, policies, checksums, image_samples, bank, policy,
                      dict(cache.indexes), longer_sides)
