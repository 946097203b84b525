"""Write labelled WebDataset shards from source records: deterministic, parallel, resumable, accountable.

Determinism: planned samples are sorted by key and shard n holds planned samples [n*S, (n+1)*S) minus rejects,
so a shard's content depends only on its own inputs; tar headers carry fixed mtime/uid/gid/mode and members are
in key then extension order. Crash safety: a shard is written to a temp name and renamed only when complete,
after its reject list (`.medclip-build/<shard>.json`); a rerun skips shards that exist and redoes the rest, so a
killed and resumed run ends with the same bytes as an uninterrupted one. `sizes.json`, `rejects.jsonl` and
`provenance.json` are written last (provenance last: it marks the build complete), after the shard index
(`index.json` and its companions, see `shards/index.py`), whose per-shard facts (keys, checksums, bank sentences)
are collected while each shard is written and kept in the shard's work file, so a resumed build has them too.

Labels: shards store raw codes by default (`uncertainty="raw"`, recorded in provenance and index); coding,
validation and policies come from `open_clip_medclip.labels`. `part=(I, N)` builds only the inputs of part I of N
(`open_clip_medclip.parts`), with part-suffixed shard names, for `medclip shards merge`.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from open_clip_medclip.errors import UserError, handling_signal
from open_clip_medclip.labels import DEFAULT_BUILD_POLICY, POLICIES, policy_values
from open_clip_medclip.parts import in_part, part_suffix
from open_clip_medclip.shards.format import (
    DEFAULT_IMAGE_SIZE,
    IMAGE_FORMATS,
    IMAGE_KINDS,
    JPEG_QUALITY,
    KINDS,
    PROVENANCE_FILE,
    REJECTS_FILE,
    SHARD_PATTERN,
    SIZES_FILE,
    SOURCE_LICENCES,
    SPEC_VERSION,
    TEMP_SUFFIX,
    TEXT_KINDS,
    UNKNOWN_LICENCE,
    WORK_DIR,
    Provenance,
    dump_json,
    sample_key,
    shard_name,
    tar_member_info,
    write_atomic,
)
from open_clip_medclip.shards.images import ImageRejected, prepare_image
from open_clip_medclip.shards.index import INDEX_FILES, ShardFacts, index_files, write_index_files
from open_clip_medclip.sources.records import Record, Reject

ABORT_ENV = "MEDCLIP_SHARDS_ABORT_AFTER"  # test hook: SIGKILL this process after N samples went into tars


class BuildError(UserError, RuntimeError):
    """The build cannot start or continue (bad options, an output folder that holds another build)."""


@dataclass
class BuildOptions:
    """How to write shards. `uncertainty` is a `labels` policy; "raw" (default) keeps -1 and null.

    `part=(I, N)`: only the inputs of part I of N, shard names `<prefix>-partIIIofNNN-<n>.tar`.
    """

    kinds: tuple[str, ...] = ("image",)
    image_size: int = DEFAULT_IMAGE_SIZE
    image_format: str = "jpg"
    samples_per_shard: int = 1000
    workers: int = 1
    uncertainty: str = DEFAULT_BUILD_POLICY
    prefix: str = "shard"
    text_unit: str = "report"  # text kind: one sample per "report" or per labelled "sentence"
    licence: str | None = None
    overwrite: bool = False
    progress: bool = True
    part: tuple[int, int] | None = None

    @property
    def shard_prefix(self) -> str:
        return f"{self.prefix}-{part_suffix(self.part)}" if self.part else self.prefix

    def check(self) -> None:
        problems = []
        if not self.kinds or any(kind not in KINDS for kind in self.kinds):
            problems.append(f"kinds {self.kinds!r}: choose from {', '.join(KINDS)}")
        if self.image_format not in IMAGE_FORMATS:
            problems.append(f"image format {self.image_format!r}: choose jpg or png")
        if self.image_size < 8:
            problems.append(f"image size {self.image_size} is below 8 px")
        if self.samples_per_shard < 1:
            problems.append("samples per shard must be at least 1")
        if self.uncertainty not in POLICIES:
            problems.append(f"uncertainty policy {self.uncertainty!r}: choose from {', '.join(POLICIES)}")
        if self.text_unit not in ("report", "sentence"):
            problems.append(f"text unit {self.text_unit!r}: choose report or sentence")
        if not SHARD_PATTERN.match(shard_name(self.prefix, 0)):
            problems.append(f"prefix {self.prefix!r} may use only letters, digits, '_' and '-'")
        if self.part is not None and not (len(self.part) == 2 and 1 <= self.part[0] <= self.part[1]):
            problems.append(f"part {self.part!r}: expected (I, N) with 1 <= I <= N")
        if problems:
            raise BuildError("; ".join(problems))


@dataclass
class BuildSummary:
    out_dir: str
    inputs: int
    written: int
    rejected: int
    shards: int
    reject_reasons: dict[str, int]
    kinds: dict[str, int]
    resumed_shards: int = 0
    already_complete: bool = False
    seconds: float = 0.0
    samples_per_second: float = field(default=0.0)

    def line(self) -> str:
        """The one-line account every build prints: inputs = written + rejected."""
        return (f"{self.inputs} inputs = {self.written} written + {self.rejected} rejected "
                f"in {self.shards} shard(s) at {self.out_dir}")

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PlannedSample:
    key: str
    kind: str
    record: Record


LabelFunction = Callable[[str], object]


def as_label_function(labeler: object | None) -> LabelFunction | None:
    """Accept a `knowledge.Labeler` (uses `.label_report`) or any callable text → result with `.labels` and
    `.sentences` (each with `.text`, `.labels`)."""
    if labeler is None:
        return None
    function = getattr(labeler, "label_report", labeler)
    if not callable(function):
        raise BuildError(f"labeler {labeler!r} has no label_report() and is not callable")
    return function


def labeler_provenance(labeler: object | None) -> dict | None:
    if labeler is None:
        return None
    return {"name": type(labeler).__module__ + "." + type(labeler).__qualname__,
            "version": str(getattr(labeler, "version", "unknown")),
            "rules_hash": str(getattr(labeler, "rules_hash", "unknown"))}


def _label_text(label: LabelFunction, text: str) -> tuple[list, list[tuple[str, list]]]:
    result = label(text)
    sentences = [(sentence.text, list(sentence.labels)) for sentence in result.sentences]
    return list(result.labels), sentences


def item_identity(item: Record | Reject) -> str:
    """What `--part` hashes: source and id (a reject without id also by its input and detail)."""
    if item.id is not None:
        return f"{item.source}\0{item.id}"
    return f"{item.source}\0\0{getattr(item, 'input', '')}\0{getattr(item, 'detail', '')}"


def plan_samples(items: Iterable[Record | Reject], options: BuildOptions,
                 label: LabelFunction | None) -> tuple[list[PlannedSample], list[dict]]:
    """Expand records into (record, kind) samples sorted by key; collect rejects in input order.

    A kind applies to a record that has what it needs (an image path for paired/image, a report for
    paired/text); a record with an empty report is planned anyway and rejected as `empty_report` when written.
    With `text_unit="sentence"`, text samples are split here (one per labelled sentence).
    """
    rejects: list[dict] = []
    by_key: dict[str, PlannedSample] = {}
    for item in items:
        if isinstance(item, Reject):
            rejects.append(item.to_json())
            continue
        for kind in options.kinds:
            if kind in IMAGE_KINDS and not item.image_path:
                continue
            if kind in TEXT_KINDS and item.report_text is None:
                continue
            for record in _split_sentences(item, label) if (kind == "text" and options.text_unit == "sentence") \
                    else [item]:
                if isinstance(record, Reject):
                    rejects.append(record.to_json())
                    continue
                key = sample_key(record.source, record.id, kind)
                if key in by_key:
                    rejects.append(Reject(record.source, record.id, "duplicate_id",
                                          f"key {key} already used by an earlier input", record.image_path or "")
                                   .to_json())
                    continue
                by_key[key] = PlannedSample(key, kind, record)
    return [by_key[key] for key in sorted(by_key)], rejects


def _split_sentences(record: Record, label: LabelFunction | None) -> list[Record | Reject]:
    text = (record.report_text or "").strip()
    if not text:
        return [Reject(record.source, record.id, "empty_report", "the report text is empty")]
    if record.sentences is not None:
        sentences = record.sentences
    else:
        if label is None:
            raise BuildError("splitting reports into sentences needs a labeler")
        try:
            sentences = _label_text(label, text)[1]
        except Exception as exc:  # the labeler is external code; its failure rejects this text only
            return [Reject(record.source, record.id, "labeler_error", f"{type(exc).__name__}: {exc}")]
    return [Record(id=f"{record.id}#s{number}", source=record.source, labels=labels, report_text=sentence,
                   meta={**record.meta, "report_id": record.id, "sentence_index": number},
                   sentences=[(sentence, labels)])
            for number, (sentence, labels) in enumerate(sentences) if sentence.strip()]


def make_sample(planned: PlannedSample, options: BuildOptions, label: LabelFunction | None) -> dict[str, bytes]:
    """The tar members of one sample ({extension: bytes}); raises ImageRejected or _SampleRejected."""
    record, kind, policy = planned.record, planned.kind, options.uncertainty
    members: dict[str, bytes] = {}
    if kind in IMAGE_KINDS:
        members[options.image_format] = prepare_image(record.image_path, options.image_size, options.image_format)
    sentences: list[tuple[str, list]] = []
    report_labels = None
    if kind in TEXT_KINDS:
        text = (record.report_text or "").strip()
        if not text:
            raise _SampleRejected("empty_report", "the report text is empty")
        if record.sentences is not None:
            report_labels, sentences = record.labels, record.sentences
        else:
            if label is None:
                raise BuildError(f"{kind} samples from unlabelled reports need a labeler")
            try:
                report_labels, sentences = _label_text(label, text)
            except Exception as exc:  # the labeler is external code; its failure rejects this text only
                raise _SampleRejected("labeler_error", f"{type(exc).__name__}: {exc}") from None
        members["txt"] = text.encode("utf-8")
    labels = report_labels if kind == "text" or record.labels is None else record.labels
    try:
        document = {
            "kind": kind, "id": record.id, "source": record.source,
            "labels": policy_values(list(labels), policy, "labels"),
            "sentences": [{"text": text, "labels": policy_values(list(values), policy, f"sentence {number}")}
                          for number, (text, values) in enumerate(sentences)],
            "meta": dict(record.meta),
        }
        if kind == "paired" and report_labels is not None and record.labels is not None:
            document["meta"]["report_labels"] = policy_values(list(report_labels), policy, "report labels")
    except ValueError as exc:
        raise _SampleRejected("bad_label", str(exc)) from None
    members["json"] = dump_json(document).encode("utf-8")
    return members


class _SampleRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# Worker state, set before the pool forks so records and labeler are inherited, not sent through pipes.
_WORKER_STATE: tuple[list[PlannedSample], BuildOptions, LabelFunction | None] | None = None


def _process(index: int) -> tuple[int, str, object]:
    planned, options, label = _WORKER_STATE
    sample = planned[index]
    try:
        return index, "ok", make_sample(sample, options, label)
    except (ImageRejected, _SampleRejected) as exc:
        record = sample.record
        origin = record.image_path or record.meta.get("path") or f"{record.source}:{record.id}"
        reject = Reject(record.source, record.id, exc.reason, exc.detail, str(origin)).to_json()
        reject["key"] = sample.key
        return index, "reject", reject


class _ShardWriter:
    """One shard being written under a temp name; `finish` records its rejects, then renames the tar."""

    def __init__(self, out_dir: Path, name: str):
        self.path = out_dir / name
        self.temp = out_dir / f".{name}{TEMP_SUFFIX}"
        self.tar = tarfile.open(self.temp, "w", format=tarfile.USTAR_FORMAT)
        self.written, self.rejects = 0, []
        self.facts = ShardFacts(name)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for extension in sorted(members):
            data = members[extension]
            self.tar.addfile(tar_member_info(f"{key}.{extension}", len(data)), io.BytesIO(data))
        self.facts.add(key, json.loads(members["json"]), members)
        self.written += 1

    def finish(self, work_dir: Path) -> None:
        self.tar.close()
        with open(self.temp, "rb+") as handle:
            os.fsync(handle.fileno())
        write_atomic(work_dir / f"{self.path.name}.json",
                      dump_json({"written": self.written, "rejects": self.rejects,
                                 "index": self.facts.to_json()}).encode())
        os.replace(self.temp, self.path)


def _fingerprint(planned: list[PlannedSample], source_rejects: list[dict], options: BuildOptions,
                 labeler_info: dict | None) -> str:
    digest = hashlib.sha256()
    settings = {key: getattr(options, key) for key in ("kinds", "image_size", "image_format", "samples_per_shard",
                                                        "uncertainty", "prefix", "text_unit", "licence", "part")}
    digest.update(dump_json({"spec": SPEC_VERSION, "options": settings, "labeler": labeler_info}).encode())
    for sample in planned:
        record = sample.record
        digest.update(dump_json([sample.key, record.image_path, record.report_text, record.labels,
                                 record.sentences, record.meta]).encode())
    digest.update(dump_json(source_rejects).encode())
    return digest.hexdigest()


def _our_files(out_dir: Path) -> list[Path]:
    names = {SIZES_FILE, PROVENANCE_FILE, REJECTS_FILE, *INDEX_FILES}
    return [path for path in out_dir.iterdir()
            if path.name in names or SHARD_PATTERN.match(path.name) or path.name.endswith(TEMP_SUFFIX)]


def _prepare_out_dir(out_dir: Path, fingerprint: str, options: BuildOptions) -> str:
    """Return "fresh", "resume" or "complete"; refuse a folder that holds a different build."""
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir / WORK_DIR
    if options.overwrite:
        for path in _our_files(out_dir):
            path.unlink()
        shutil.rmtree(work_dir, ignore_errors=True)
    provenance = out_dir / PROVENANCE_FILE
    if provenance.exists() and not work_dir.exists():
        try:
            previous = json.loads(provenance.read_text()).get("build_fingerprint")
        except ValueError:
            previous = None
        if previous == fingerprint:
            return "complete"
        raise BuildError(f"{out_dir}: holds a different shard build (provenance.json fingerprint differs); "
                         "use --overwrite or another folder")
    if work_dir.exists():
        stamp = work_dir / "fingerprint"
        if not stamp.exists() or stamp.read_text().strip() != fingerprint:
            raise BuildError(f"{out_dir}: holds an unfinished build with other inputs or options; "
                             "use --overwrite or another folder")
        for path in out_dir.glob(f".*{TEMP_SUFFIX}"):
            path.unlink()  # partial shards of the killed run
        return "resume"
    if _our_files(out_dir):
        raise BuildError(f"{out_dir}: already has shard files but no build state; use --overwrite or another folder")
    work_dir.mkdir()
    (work_dir / "fingerprint").write_text(fingerprint + "\n")
    return "fresh"


def build_shards(items: Iterable[Record | Reject], out_dir: str | Path, options: BuildOptions | None = None,
                 labeler: object | None = None) -> BuildSummary:
    """Write every record of `items` (any mix of adapters) as samples of `options.kinds` into `out_dir`.

    `labeler` labels report text for paired/text samples (a `knowledge.Labeler` or a stub callable); records
    with preset sentences (already-labelled CSVs) and image-only builds need none.
    """
    options = options or BuildOptions()
    options.check()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    label = as_label_function(labeler)
    if options.part is not None:  # part I of N: deterministic per item
        items = (item for item in items if in_part(item_identity(item), options.part))
    planned, source_rejects = plan_samples(items, options, label)
    labeler_info = labeler_provenance(labeler) if any(
        s.kind in TEXT_KINDS and s.record.sentences is None for s in planned) or (
        "text" in options.kinds and options.text_unit == "sentence") else None
    fingerprint = _fingerprint(planned, source_rejects, options, labeler_info)
    state = _prepare_out_dir(out_dir, fingerprint, options)
    if state == "complete":
        return _summary_from_files(out_dir, started)
    work_dir = out_dir / WORK_DIR
    per_shard = options.samples_per_shard
    shard_count = (len(planned) + per_shard - 1) // per_shard
    names = [shard_name(options.shard_prefix, n) for n in range(shard_count)]
    done = [(out_dir / name).exists() and (work_dir / f"{name}.json").exists() for name in names]
    indices = [i for n in range(shard_count) if not done[n] for i in range(n * per_shard,
                                                                            min((n + 1) * per_shard, len(planned)))]
    _run(planned, indices, options, label, out_dir, names)
    return _finish(out_dir, planned, source_rejects, options, labeler_info, fingerprint, names,
                   resumed=sum(done), started=started)


def _run(planned: list[PlannedSample], indices: list[int], options: BuildOptions, label: LabelFunction | None,
         out_dir: Path, names: list[str]) -> None:
    global _WORKER_STATE
    abort_after = int(os.environ.get(ABORT_ENV, "0") or 0)
    per_shard, work_dir = options.samples_per_shard, out_dir / WORK_DIR
    _WORKER_STATE = (planned, options, label)
    pool = None
    workers = min(options.workers, max(1, len(indices)))
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_ignore_interrupts)
        results = pool.imap(_process, indices, chunksize=max(1, min(16, len(indices) // (workers * 8))))
    else:
        results = map(_process, indices)
    writer: _ShardWriter | None = None
    added = 0
    try:
        with tqdm(total=len(indices), unit="sample", desc="shards", disable=not options.progress) as progress:
            for index, status, payload in results:
                shard = index // per_shard
                if writer is None:
                    writer = _ShardWriter(out_dir, names[shard])
                if status == "ok":
                    writer.add(planned[index].key, payload)
                    added += 1
                    if abort_after and added >= abort_after:
                        os.kill(os.getpid(), signal.SIGKILL)
                else:
                    writer.rejects.append(payload)
                progress.update(1)
                if index == min((shard + 1) * per_shard, len(planned)) - 1:
                    writer.finish(work_dir)
                    writer = None
    finally:
        _WORKER_STATE = None
        if pool is not None:
            with handling_signal(signal.SIGINT, signal.SIG_IGN):  # a second Ctrl-C must not cut the shutdown short
                pool.terminate()
                pool.join()


def _ignore_interrupts() -> None:
    """Pool workers leave Ctrl-C to the parent (which stops them), instead of each printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _finish(out_dir: Path, planned: list[PlannedSample], source_rejects: list[dict], options: BuildOptions,
            labeler_info: dict | None, fingerprint: str, names: list[str], resumed: int,
            started: float) -> BuildSummary:
    work_dir = out_dir / WORK_DIR
    sizes, rejects, facts = {}, list(source_rejects), []
    for name in names:
        part = json.loads((work_dir / f"{name}.json").read_text())
        sizes[name] = part["written"]
        rejects.extend(part["rejects"])
        facts.append(ShardFacts.from_json(part["index"]))
    rejected_keys = {reject.get("key") for reject in rejects if reject.get("key")}
    written = [sample for sample in planned if sample.key not in rejected_keys]
    reasons = dict(sorted(Counter(reject["reason"] for reject in rejects).items()))
    kinds = dict(sorted(Counter(sample.kind for sample in written).items()))
    sources = Counter(sample.record.source for sample in written)
    provenance = Provenance(
        uncertainty_policy=options.uncertainty,
        sources=[{"name": name, "samples": count,
                  "licence": options.licence or SOURCE_LICENCES.get(name, UNKNOWN_LICENCE)}
                 for name, count in sorted(sources.items())],
        labeler=labeler_info, kinds=kinds,
        image={"format": options.image_format, "longer_side": options.image_size, "mode": "L",
               "jpeg_quality": JPEG_QUALITY if options.image_format == "jpg" else None},
        text_unit=options.text_unit, samples_per_shard=options.samples_per_shard, shards=len(names),
        counts={"inputs": len(planned) + len(source_rejects), "written": len(written), "rejected": len(rejects)},
        reject_reasons=reasons, build_fingerprint=fingerprint, part=options.part or None)
    write_atomic(out_dir / REJECTS_FILE, "".join(dump_json(reject) + "\n" for reject in rejects).encode())
    write_atomic(out_dir / SIZES_FILE, (dump_json(sizes, indent=2) + "\n").encode())
    write_index_files(out_dir, index_files(facts, options.uncertainty), write_atomic)
    write_atomic(out_dir / PROVENANCE_FILE, (dump_json(provenance.to_json(), indent=2) + "\n").encode())
    shutil.rmtree(work_dir, ignore_errors=True)
    seconds = time.perf_counter() - started
    return BuildSummary(str(out_dir), provenance.counts["inputs"], len(written), len(rejects), len(names),
                        reasons, kinds, resumed_shards=resumed, seconds=round(seconds, 3),
                        samples_per_second=round(len(written) / seconds, 1) if seconds > 0 else 0.0)


def _summary_from_files(out_dir: Path, started: float) -> BuildSummary:
    provenance = Provenance.from_json(json.loads((out_dir / PROVENANCE_FILE).read_text()))
    counts = provenance.counts
    return BuildSummary(str(out_dir), counts["inputs"], counts["written"], counts["rejected"], provenance.shards,
                        provenance.reject_reasons, provenance.kinds, already_complete=True,
                        seconds=round(time.perf_counter() - started, 3))
