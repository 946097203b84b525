"""Label-aware WebDataset streams for MedCLIP training inside OpenCLIP's data machinery.

MedCLIP decouples images and texts: an image without a report is paired at load time with a sentence from a
labelled sentence bank that shares one of its positive findings, so image-only and text-only corpora both
feed training. This module keeps `open_clip_train.data.get_wds_dataset`'s orchestration (shard shuffle,
resampling, `--train-data-upsampling-factors`, epochs, `with_epoch`) and replaces only its tail:

    image-bearing samples -> decode -> pick a text (own report sentence | bank sentence) -> transform,
    tokenize -> pack [tokens | image labels | text labels] into one int64 row -> batch

Packing the labels into the text tensor keeps every batch a plain `(images, texts)` tuple, so OpenCLIP's
`train_one_epoch` runs unchanged; the model subclass in `plugins.openclip_train` strips the label columns.
Shard format: `tarballs_spec/` (json `kind`/`labels`/`sentences`, label order = `findings.CHEXPERT_FINDINGS`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .findings import CHEXPERT_FINDINGS, FINDING_INDEX, NUM_FINDINGS, apply_uncertainty_policy, validate_labels
from .models import MEDCLIP_MEAN, MEDCLIP_STD, pad_to_square

NO_FINDING = FINDING_INDEX["No Finding"]
SAMPLE_KINDS = ("paired", "image", "text")
IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")

# How the pairing stage chose a sample's text (kept on the sample for tests and statistics).
RULE_OWN_REPORT = "own-report"  # paired study: a sentence of its own report
RULE_SHARED_FINDING = "shared-finding"  # bank sentence sharing a positive finding with the image
RULE_NO_FINDING = "no-finding"  # image without positive findings: a No Finding bank sentence
RULE_FALLBACK = "fallback-no-finding"  # no bank sentence has any of the image's findings (as MedCLIP does)


# --------------------------------------------------------------------------------------------------------------
# Label transport: [token ids (ctx) | image labels (L) | text labels (L)] as one int64 row.
# --------------------------------------------------------------------------------------------------------------
def pack_labels(tokens: torch.Tensor, image_labels: Sequence[float], text_labels: Sequence[float]) -> torch.Tensor:
    """One int64 row carrying token ids and both label vectors; float64 label bits ride in int64 columns."""
    labels = torch.cat(
        [torch.as_tensor(image_labels, dtype=torch.float64), torch.as_tensor(text_labels, dtype=torch.float64)]
    )
    return torch.cat([tokens.reshape(-1).long(), labels.view(torch.int64)])


def unpack_labels(
    texts: torch.Tensor, context_length: int, num_labels: int = NUM_FINDINGS
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Inverse of `pack_labels` on a batch; returns (tokens, None, None) when `texts` is not packed."""
    if texts.ndim != 2 or texts.shape[1] != context_length + 2 * num_labels:
        return texts, None, None
    labels = texts[:, context_length:].contiguous().view(torch.float64).float()
    return texts[:, :context_length], labels[:, :num_labels], labels[:, num_labels:]


# --------------------------------------------------------------------------------------------------------------
# Sentence bank
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SentenceBank:
    """Labelled sentences indexed by positive finding, for drawing texts that match an image's labels."""

    texts: list[str]
    labels: np.ndarray  # [N, NUM_FINDINGS] float32, uncertainty policy applied
    by_finding: list[np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.float32).reshape(len(self.texts), NUM_FINDINGS)
        self.by_finding = [np.flatnonzero(self.labels[:, f] == 1.0) for f in range(NUM_FINDINGS)]

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, Sequence[float | None]]], policy: str = "zeros") -> SentenceBank:
        """Build from (sentence, coded labels) pairs; duplicate sentences keep their first labels."""
        seen: dict[str, list[float]] = {}
        for text, labels in entries:
            text = text.strip()
            if text and text not in seen:
                seen[text] = apply_uncertainty_policy(labels, policy)
        return cls(list(seen), np.array(list(seen.values()), dtype=np.float32).reshape(len(seen), NUM_FINDINGS))

    def counts(self) -> dict[str, int]:
        """Number of bank sentences positive for each finding."""
        return {name: int(len(idx)) for name, idx in zip(CHEXPERT_FINDINGS, self.by_finding, strict=True)}

    def draw(self, image_labels: Sequence[float], rng: random.Random) -> tuple[int, str]:
        """Index of a sentence for an image (policy-applied labels) and the rule that chose it.

        A sentence sharing any positive finding (No Finding excluded) is drawn uniformly from the union of
        the matching findings' sentences (rejection sampling, so no union is built); images without
        positives get a No Finding sentence; if the bank has none of the image's findings, a No Finding
        sentence (MedCLIP's fallback).
        """
        positives = [
            f for f in range(NUM_FINDINGS) if f != NO_FINDING and image_labels[f] == 1.0 and len(self.by_finding[f])
        ]
        if positives:
            sizes = [len(self.by_finding[f]) for f in positives]
            while True:
                finding = rng.choices(positives, weights=sizes, k=1)[0]
                index = int(self.by_finding[finding][rng.randrange(len(self.by_finding[finding]))])
                shared = sum(1 for f in positives if self.labels[index, f] == 1.0)
                if rng.random() * shared < 1.0:
                    return index, RULE_SHARED_FINDING
        has_positive = any(image_labels[f] == 1.0 for f in range(NUM_FINDINGS) if f != NO_FINDING)
        rule = RULE_FALLBACK if has_positive else RULE_NO_FINDING
        pool = self.by_finding[NO_FINDING]
        if not len(pool):
            if not len(self.texts):
                raise ValueError("the sentence bank is empty: add text-only or paired shards (or --medclip-bank-data)")
            return rng.randrange(len(self.texts)), RULE_FALLBACK
        return int(pool[rng.randrange(len(pool))]), rule


# --------------------------------------------------------------------------------------------------------------
# Shard scan: sample kinds per shard and the sentence bank, read from the json (and txt) members only
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ShardScan:
    """What a set of shards holds: per-shard kind counts and the bank entries of their texts."""

    kinds: dict[str, Counter]
    bank_entries: list[tuple[str, list[float | None]]]

    def image_count(self, url: str) -> int:
        counts = self.kinds.get(url, Counter())
        return counts["paired"] + counts["image"]

    def image_shards(self, urls: Sequence[str]) -> list[str]:
        return [u for u in urls if self.image_count(u) > 0]


def _sample_key(member_name: str) -> tuple[str, str]:
    """Split a tar member name the way webdataset does (`base_plus_ext`): key up to the first dot of the basename."""
    directory, base = os.path.split(member_name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def _check_meta(meta: object, where: str) -> dict:
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    kind = meta.get("kind")
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"{where}: 'kind' is {kind!r}; expected one of {SAMPLE_KINDS} (not a medclip shard?)")
    validate_labels(meta.get("labels") or [], where=f"{where} labels")
    for i, sentence in enumerate(meta.get("sentences") or []):
        if not isinstance(sentence, dict) or not isinstance(sentence.get("text"), str):
            raise ValueError(f"{where}: sentences[{i}] must be an object with a 'text' string")
        validate_labels(sentence.get("labels") or [], where=f"{where} sentences[{i}] labels")
    return meta


def scan_shards(urls: Sequence[str], bank_kinds: Sequence[str] = ("text", "paired")) -> ShardScan:
    """Read the json/txt members of local shard files; collect kind counts and labelled sentences."""
    kinds: dict[str, Counter] = {}
    entries: list[tuple[str, list[float | None]]] = []
    for url in urls:
        if not os.path.isfile(url):
            raise FileNotFoundError(
                f"{url}: shard not found (medclip streams scan local shard files to build the sentence bank)"
            )
        metas: dict[str, dict] = {}
        reports: dict[str, str] = {}
        try:
            with tarfile.open(url, "r") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _sample_key(member.name)
                    if ext not in ("json", "txt"):
                        continue
                    payload = tar.extractfile(member).read()
                    if ext == "json":
                        metas[key] = _check_meta(json.loads(payload), f"{url}:{member.name}")
                    else:
                        reports[key] = payload.decode("utf-8")
        except (tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{url}: unreadable medclip shard ({exc})") from exc
        counts: Counter = Counter()
        for key, meta in metas.items():
            counts[meta["kind"]] += 1
            if meta["kind"] not in bank_kinds:
                continue
            sentences = meta.get("sentences") or []
            if sentences:
                entries.extend((s["text"], s["labels"]) for s in sentences)
            elif meta["kind"] == "text" and reports.get(key, "").strip():
                entries.append((reports[key], meta["labels"]))
        kinds[url] = counts
    return ShardScan(kinds, entries)


def expand_shard_groups(urls: str | Sequence[str], weights: str | None = None) -> list[tuple[list[str], float | None]]:
    """`a::b` brace-notation groups (and `--train-data-upsampling-factors`) as [(shard list, factor)]."""
    import braceexpand

    groups = urls.split("::") if isinstance(urls, str) else [list(urls)]
    factors: list[float | None]
    if weights is None:
        factors = [None] * len(groups)
    else:
        factors = [float(w) for w in weights.split("::")]
        if len(factors) != len(groups):
            raise ValueError(f"{len(groups)} data groups but {len(factors)} upsampling factors ({weights!r})")
    out = []
    for group, factor in zip(groups, factors, strict=True):
        shards = group if isinstance(group, list) else list(braceexpand.braceexpand(group))
        out.append((shards, factor))
    return out


# --------------------------------------------------------------------------------------------------------------
# Pipeline stages
# --------------------------------------------------------------------------------------------------------------
def tar_samples_nothrow(src, handler=None):
    """`open_clip_train.data.tarfile_to_samples_nothrow` that also works with webdataset 1.x.

    webdataset 1.x ends every shard with an empty EOF marker dict, which open_clip_train 3.3's grouper cannot
    read (KeyError 'fname'); dropping the markers keeps its tolerant grouping on both 0.2.x and 1.x.
    """
    from open_clip_train.data import group_by_keys_nothrow, log_and_continue
    from webdataset.tariterators import tar_file_expander, url_opener

    handler = handler or log_and_continue
    files = (f for f in tar_file_expander(url_opener(src, handler=handler), handler=handler) if "fname" in f)
    return group_by_keys_nothrow(files, handler=handler)


def has_image_and_meta(sample: dict) -> bool:
    return "json" in sample and any(ext in sample for ext in IMAGE_EXTENSIONS)


def epoch_rng(purpose: str, seed: int, rank: int, epoch) -> random.Random:
    """A python RNG seeded by (purpose, seed, rank, dataloader worker, epoch): fresh per worker and epoch, and
    identical when a run is repeated or resumed. `epoch` is a SharedEpoch, an int or None."""
    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    epoch = epoch.get_value() if hasattr(epoch, "get_value") else int(epoch or 0)
    return random.Random(f"medclip-streams:{purpose}:{seed}:{rank}:{worker}:{epoch}")


class PairTexts:
    """Pipeline stage giving each image its text and both label vectors.

    The RNG is re-seeded at every pass from (seed, rank, dataloader worker, epoch), so pairings differ per
    worker and per epoch yet repeat exactly across runs with the same seed.
    """

    def __init__(self, bank: SentenceBank, policy: str = "zeros", seed: int = 0, rank: int = 0, epoch=None) -> None:
        self.bank = bank
        self.policy = policy
        self.seed = seed
        self.rank = rank
        self.epoch = epoch  # open_clip_train.data.SharedEpoch, an int, or None

    def _rng(self) -> random.Random:
        return epoch_rng("pair-texts", self.seed, self.rank, self.epoch)

    def pair(self, sample: dict, rng: random.Random) -> dict:
        key = sample.get("__key__", "?")
        meta = sample["json"]
        if isinstance(meta, bytes | str):
            meta = json.loads(meta)
        kind = meta.get("kind")
        image = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
        coded = validate_labels(meta.get("labels") or [], where=f"{key}.json labels")
        image_labels = apply_uncertainty_policy(coded, self.policy)
        sentences = meta.get("sentences") or []
        if kind == "paired":
            if sentences:
                chosen = sentences[rng.randrange(len(sentences))]
                text, text_labels = chosen["text"], apply_uncertainty_policy(chosen["labels"], self.policy)
            else:
                report = sample.get("txt", "")
                text = report.decode("utf-8") if isinstance(report, bytes) else str(report)
                text_labels = image_labels
            rule = RULE_OWN_REPORT
        elif kind == "image":
            index, rule = self.bank.draw(image_labels, rng)
            text, text_labels = self.bank.texts[index], self.bank.labels[index].tolist()
        else:
            raise ValueError(f"{key}: kind {kind!r} has no image")
        return {
            "__key__": key,
            "image": image,
            "text": text,
            "image_labels": image_labels,
            "text_labels": [float(v) for v in text_labels],
            "rule": rule,
        }

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        rng = self._rng()
        # Image augmentations downstream draw from torch's RNG: seed it per (worker, epoch) too, so a resumed
        # run sees exactly the batches the uninterrupted run saw.
        torch.manual_seed(epoch_rng("augment", self.seed, self.rank, self.epoch).getrandbits(63))
        for sample in source:
            yield self.pair(sample, rng)


class SeededShuffle:
    """`wds.shuffle` with its buffer RNG seeded per (rank, worker, epoch); webdataset seeds it from pid and time."""

    def __init__(self, bufsize: int, initial: int, seed: int = 0, rank: int = 0, epoch=None) -> None:
        self.bufsize, self.initial = bufsize, initial
        self.seed, self.rank, self.epoch = seed, rank, epoch

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        from webdataset.filters import _shuffle

        rng = epoch_rng("shuffle", self.seed, self.rank, self.epoch)
        return _shuffle(iter(source), bufsize=self.bufsize, initial=self.initial, rng=rng)


class ToTrainingSample:
    """(image tensor, text, both label vectors) from a paired sample; tokenization waits for the whole batch."""

    def __init__(self, preprocess_image: Callable) -> None:
        self.preprocess_image = preprocess_image

    def __call__(self, sample: dict) -> tuple[torch.Tensor, str, torch.Tensor]:
        labels = torch.tensor(sample["image_labels"] + sample["text_labels"], dtype=torch.float64)
        return self.preprocess_image(sample["image"]), sample["text"], labels


class PackBatch:
    """Tokenize a batch's texts in one call and pack the labels behind the tokens: `(images, packed texts)`.

    One tokenizer call per batch is about 3x cheaper per text than one per sample.
    """

    def __init__(self, tokenizer: Callable) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        images, texts, labels = batch
        tokens = self.tokenizer(list(texts)).long()
        return images, torch.cat([tokens, labels.view(torch.int64)], dim=1)


# MedCLIP's training augmentation (reference §1.4); evaluation uses the model's own preprocessing
# --------------------------------------------------------------------------------------------------------------
class PadToSquare:
    """MedCLIP's `_pad_img` as a picklable transform (8-bit grayscale on a black square)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return pad_to_square(image)


class GrayToNormalizedRGB:
    """8-bit grayscale PIL image -> normalised 3-channel tensor, as MedCLIP's collator repeats the channel.

    Normalising the single channel before repeating it is ~3x cheaper than converting to RGB first; with
    per-channel statistics that differ, the channels are normalised separately.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.uniform = bool((self.mean == self.mean[0]).all() and (self.std == self.std[0]).all())

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        gray = pil_to_tensor(image.convert("L")).float().div_(255.0)
        if self.uniform:
            return gray.sub_(self.mean[0]).div_(self.std[0]).expand(len(self.mean), -1, -1)
        return (gray - self.mean) / self.std


def medclip_train_transform(
    image_size: int = 224,
    mean: Sequence[float] = (MEDCLIP_MEAN,) * 3,
    std: Sequence[float] = (MEDCLIP_STD,) * 3,
) -> Callable:
    """MedCLIP's pre-training augmentation: pad, flip, jitter, affine, resize to 256/224 × size, random crop."""
    from torchvision import transforms as T

    return T.Compose(
        [
            PadToSquare(),
            T.RandomHorizontalFlip(0.5),
            T.ColorJitter(0.2, 0.2),
            T.RandomAffine(degrees=10, translate=(0.0625, 0.0625), scale=(0.8, 1.1)),
            T.Resize((round(image_size * 256 / 224),) * 2),
            T.RandomCrop(image_size),
            GrayToNormalizedRGB(mean, std),
        ]
    )


# --------------------------------------------------------------------------------------------------------------
# The dataset function (same signature as open_clip_train.data.get_wds_dataset)
# --------------------------------------------------------------------------------------------------------------
def build_stream_inputs(args, is_train: bool) -> tuple[list[str], list[float] | None, SentenceBank, ShardScan]:
    """Image-bearing shards (with their upsampling factors), the sentence bank and the scan of all shards."""
    urls = args.train_data if is_train else args.val_data
    weights = args.train_data_upsampling_factors if is_train else None
    groups = expand_shard_groups(urls, weights)
    bank_urls = [u for shards, _ in groups for u in shards]
    extra_bank = getattr(args, "medclip_bank_data", None)
    if extra_bank:
        bank_urls += [u for shards, _ in expand_shard_groups(extra_bank) for u in shards]
    if not is_train and not getattr(args, "medclip_val_own_bank", False) and args.train_data:
        bank_urls += [u for shards, _ in expand_shard_groups(args.train_data) for u in shards]
    bank_kinds = tuple(getattr(args, "medclip_bank_kinds", ("text", "paired")))
    scan = scan_shards(list(dict.fromkeys(bank_urls)), bank_kinds=bank_kinds)
    bank = SentenceBank.from_entries(scan.bank_entries, getattr(args, "medclip_uncertain", "zeros"))
    image_urls: list[str] = []
    image_weights: list[float] | None = [] if weights is not None else None
    for shards, factor in groups:
        kept = scan.image_shards(shards)
        image_urls += kept
        if image_weights is not None:
            image_weights += [factor] * len(kept)
    if not image_urls:
        raise ValueError(f"{urls}: no shard holds images (paired or image kind); nothing to train on")
    needs_bank = any(scan.kinds[u]["image"] for u in image_urls)
    if needs_bank and not len(bank):
        raise ValueError(
            f"{urls}: image-only shards need a sentence bank, but no text-only or paired shard has sentences "
            "(add text shards to the data or pass --medclip-bank-data)"
        )
    return image_urls, image_weights, bank, scan


def get_medclip_wds_dataset(args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None):
    """Drop-in for `open_clip_train.data.get_wds_dataset` that yields label-packed (image, text) batches."""
    import webdataset as wds
    from open_clip_train.data import (
        _SAMPLE_SHUFFLE_INITIAL,
        _SAMPLE_SHUFFLE_SIZE,
        _SHARD_SHUFFLE_INITIAL,
        _SHARD_SHUFFLE_SIZE,
        DataInfo,
        ResampledShards2,
        SharedEpoch,
        detshuffle2,
        log_and_continue,
    )

    image_urls, image_weights, bank, scan = build_stream_inputs(args, is_train)
    resampled = getattr(args, "dataset_resampled", False) and is_train
    if is_train:
        num_samples = args.train_num_samples or sum(scan.image_count(u) for u in image_urls)
    else:
        num_samples = args.val_num_samples or 0
    if is_train and image_weights is not None and not resampled:
        raise ValueError("--train-data-upsampling-factors needs --dataset-resampled (as in open_clip_train)")
    logging.info(
        "medclip streams (%s): %d image shards, %d image samples, sentence bank %d sentences",
        "train" if is_train else "val",
        len(image_urls),
        sum(scan.image_count(u) for u in image_urls),
        len(bank),
    )

    shared_epoch = SharedEpoch(epoch=epoch)
    if resampled:
        # Explicit uniform weights: open_clip_train's expand_urls only accepts a URL list together with weights.
        weights = image_weights if image_weights is not None else [1.0] * len(image_urls)
        pipeline = [ResampledShards2(image_urls, weights=weights, deterministic=True, epoch=shared_epoch)]
    else:
        pipeline = [wds.SimpleShardList(image_urls)]
    if is_train:
        if not resampled:
            pipeline += [
                detshuffle2(
                    bufsize=_SHARD_SHUFFLE_SIZE, initial=_SHARD_SHUFFLE_INITIAL, seed=args.seed, epoch=shared_epoch
                ),
                wds.split_by_node,
                wds.split_by_worker,
            ]
        pipeline += [
            tar_samples_nothrow,
            SeededShuffle(
                _SAMPLE_SHUFFLE_SIZE, _SAMPLE_SHUFFLE_INITIAL, seed=args.seed, rank=getattr(args, "rank", 0),
                epoch=shared_epoch,
            ),
        ]
    else:
        pipeline += [wds.split_by_worker, wds.tarfile_to_samples(handler=log_and_continue)]
    pipeline += [
        wds.select(has_image_and_meta),
        wds.decode("pil", handler=log_and_continue),
        PairTexts(
            bank,
            policy=getattr(args, "medclip_uncertain", "zeros"),
            seed=args.seed,
            rank=getattr(args, "rank", 0),
            epoch=shared_epoch,
        ),
        wds.map(ToTrainingSample(preprocess_img)),
        wds.batched(args.batch_size, partial=not is_train),
        wds.map(PackBatch(tokenizer)),
    ]
    dataset = wds.DataPipeline(*pipeline)

    if is_train:
        if not resampled:
            assert len(image_urls) >= args.workers * args.world_size, "number of shards must be >= total workers"
        round_fn = math.floor if floor else math.ceil
        global_batch_size = args.batch_size * args.world_size
        num_batches = round_fn(num_samples / global_batch_size)
        num_workers = max(1, args.workers)
        num_worker_batches = round_fn(num_batches / num_workers)
        num_batches = num_worker_batches * num_workers
        num_samples = num_batches * global_batch_size
        dataset = dataset.with_epoch(num_worker_batches)
    else:
        num_batches = math.ceil(num_samples / args.batch_size)

    dataloader = wds.WebLoader(
        dataset, batch_size=None, shuffle=False, num_workers=args.workers, persistent_workers=args.workers > 0
    )
    dataloader.num_batches = num_batches
    dataloader.num_samples = num_samples
    return DataInfo(dataloader=dataloader, shared_epoch=shared_epoch)


def iter_pairs(urls: str, bank_data: str | None = None, policy: str = "zeros", seed: int = 0, epoch: int = 0):
    """Yield paired samples (image decoded as PIL, text, labels, rule) from shards, in shard order.

    For inspection and tests: the same pairing stage as training, without shuffling or batching.
    """
    import webdataset as wds

    groups = expand_shard_groups(urls)
    shard_list = [u for shards, _ in groups for u in shards]
    bank_urls = shard_list + ([u for s, _ in expand_shard_groups(bank_data) for u in s] if bank_data else [])
    scan = scan_shards(list(dict.fromkeys(bank_urls)))
    bank = SentenceBank.from_entries(scan.bank_entries, policy)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(scan.image_shards(shard_list)),
        wds.tarfile_to_samples(),
        wds.select(has_image_and_meta),
        wds.decode("pil"),
        PairTexts(bank, policy=policy, seed=seed, epoch=epoch),
    )
    return bank, iter(pipeline)
