"""The pipeline stages spliced into open_clip_train's webdataset pipeline, and the dataset function."""
from __future__ import annotations

import io
import itertools
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from .. import hosted
from .. import labels as label_contract
from ..errors import UserError
from ..shards.format import IMAGE_KINDS
from ..text_width import text_bucket_for, text_multiple_for, token_lengths, tokenizer_pad_id, trim_tokens
from .bank import RULE_OWN_REPORT, SentenceBank
from .faults import ShardFailurePolicy, ShardSourceError, is_remote_url
from .plan import plan_streams, shard_name

log = logging.getLogger("open_clip_medclip.streams")

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")


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


class ShardReader:
    """Pipeline stage: `{"url": ...}` dicts in, the samples of each shard (any URL) out, counted per shard and
    compared with the index when it ends; errors name the shard. Remote reads retry and failing sources stop the
    run as `policy` says."""

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
        epoch = epoch_value(self.epoch)
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


class CheckedSamples:
    """Pipeline stage: image-bearing samples that pass the shard validator's checks, decoded; others skipped.

    The validator's own functions decide (what `medclip shards validate` runs): `check_sample` before the decode
    (magic bytes; label values the build's recorded policy cannot have written; the index's content checksum with
    `--medclip-verify-checksums`), `decoded_image_problems` (mode L, the build's longer side from `longer_sides`)
    after it; the image is decoded once. Each skip is logged with the shard, key and reason, and counted.
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

        from ..shards.validate import check_sample, decoded_image_problems

        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        checksum = self.checksums.get(url, {}).get(key, "") if self.checksums is not None else None
        meta, problems = check_sample(key, sample, shard=sample.get("__url__", ""), checksum=checksum,
                                      policy=self.policies.get(url, label_contract.RAW_POLICY))
        if problems:
            return self.skip_invalid(url, key, problems)
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
            return self.skip_invalid(url, key, problems)
        return {"__key__": key, "__url__": url, "image": image, "meta": meta, "txt": sample.get("txt")}

    def skip_invalid(self, url: str, key: str, problems: list) -> None:
        self.stats.skip(url, key, "invalid sample: " + "; ".join(
            f"{p.member}: {p.message}" if p.member else p.message for p in problems))

    def __call__(self, source: Iterable[dict]) -> Iterator[dict]:
        for sample in source:
            prepared = self.prepare(sample)
            if prepared is not None:
                yield prepared


def epoch_value(epoch) -> int | None:
    """The epoch a stage was given: a `SharedEpoch` (set by the trainer, read in each worker), an int or None."""
    return epoch.get_value() if hasattr(epoch, "get_value") else epoch


def epoch_rng(purpose: str, seed: int, rank: int, epoch) -> random.Random:
    """A python RNG seeded by (purpose, seed, rank, dataloader worker, epoch): fresh per worker and epoch, and
    identical when a run is repeated or resumed. `epoch` is a SharedEpoch, an int or None."""
    epoch = int(epoch_value(epoch) or 0)
    return random.Random(f"medclip-streams:{purpose}:{seed}:{rank}:{_worker_id()}:{epoch}")


class PairTexts:
    """Pipeline stage giving each image its text and both target vectors (the policy applied once, here); pairings
    are drawn with `epoch_rng`, so they differ per worker and epoch yet repeat exactly across runs."""

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
        rng = epoch_rng("shuffle", self.seed, self.rank, self.epoch)
        return hosted.piece("seeded_shuffle")(source, self.bufsize, self.initial, rng)


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


class BucketByLength:
    """`--medclip-text-bucket N`: length bucketing of the training stream, off by default.

    Tokenizes `pool` batches' worth of samples in one call (the rows travel on as `tokens`, so `PackBatch` does not
    tokenize again), sorts them stably by token length, cuts them into the runs of `batch_size` that `wds.batched`
    downstream cuts, and yields the runs in a seeded shuffled order. Nothing is added or dropped: `worker_batches`
    (from `with_epoch`) is a quota of full batches carried across the passes of an epoch, so no pool reaches into
    samples the epoch would not use; a partial pool's trailing `len % batch_size` samples stay unsorted, last.
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
        epoch = epoch_value(self.epoch)
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

    def __call__(self, source: Iterable) -> Iterator:
        for batch in source:
            self.stats.batches += 1
            if self.worker_batches and self.stats.batches >= self.worker_batches:
                self.stats.report(epoch_value(self.epoch))
            yield batch
        if not self.worker_batches:
            self.stats.report(epoch_value(self.epoch))


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

    return hosted.piece("spliced_wds_dataset")(args, preprocess_img, is_train, epoch, floor, tokenizer,
                                               shards=plan.image_urls, weights=plan.image_weights,
                                               num_samples=plan.image_samples, build_stages=build_stages)


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
