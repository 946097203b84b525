"""Check a shard folder against the spec (`tarballs_spec/SPEC.md`, version 1) and say exactly what is wrong.

Every problem names the file, the tar member when there is one, and the rule broken. The per-sample JSON and
provenance checks are hand-written to agree with `tarballs_spec/schema.json` (a test runs both on the same
documents when `jsonschema` is installed), so validation needs no extra dependency.

`check_sample` is the one per-sample check: `validate_shards` runs it on every sample and the training streams
call the same function on every sample they read; `decoded_image_problems` is the one check of a decoded image
(mode, size), run by both after their single decode. So a stream rejects exactly what `validate` rejects. Label
values are checked by `open_clip_medclip.labels` (NaN, a string "1", 2.0 are errors, never coerced).
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from PIL import Image

from open_clip_medclip.findings import CHEXPERT_FINDINGS
from open_clip_medclip.labels import POLICIES, STORED_VALUES, stored_value_problems, vector_problems
from open_clip_medclip.parts import read_part
from open_clip_medclip.shards.format import (
    IMAGE_FORMATS,
    IMAGE_KINDS,
    KINDS,
    PROVENANCE_FILE,
    REJECTS_FILE,
    SHARD_PATTERN,
    SIZES_FILE,
    SPEC_VERSION,
    TEMP_SUFFIX,
    TEXT_KINDS,
    WORK_DIR,
    Provenance,
    sample_key,
)
from open_clip_medclip.shards.index import (
    INDEX_FILE,
    BankArrays,
    ShardFacts,
    ShardIndexError,
    merge_bank_entries,
    parse_index,
    sample_checksum,
)
from open_clip_medclip.sources.records import REJECT_REASONS

MEMBER_NAME = re.compile(r"^(?P<key>[A-Za-z0-9_-]+)\.(?P<ext>jpg|png|txt|json)$")
SAMPLE_KEYS = {"kind", "id", "source", "labels", "sentences", "meta"}
PROVENANCE_KEYS = {item.name for item in fields(Provenance)} - {"part", "merged_from"}  # the required keys
IMAGE_MAGIC = {"jpg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}


@dataclass
class Problem:
    file: str
    member: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.member}: {self.message}" if self.member else f"{self.file}: {self.message}"


@dataclass
class ValidationReport:
    folder: str
    problems: list[Problem] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    facts: list = field(default_factory=list, repr=False)  # index.ShardFacts per shard (not in to_json)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"folder": self.folder, "ok": self.ok, "shards": self.shards, "samples": self.samples,
                "kinds": self.kinds, "problems": [p.__dict__ for p in self.problems]}


def check_label_vector(values: object, where: str) -> list[str]:
    if not isinstance(values, list):
        return [f"{where}: expected a list of label values, got {type(values).__name__}"]
    return vector_problems(values, where)


def check_sample_json(document: object) -> list[str]:
    """Problems with one sample's JSON (structure as in schema.json's sample definition)."""
    if not isinstance(document, dict):
        return ["json must be an object"]
    problems = [f"json lacks key {key!r}" for key in sorted(SAMPLE_KEYS - document.keys())]
    problems += [f"json has unknown key {key!r}" for key in sorted(document.keys() - SAMPLE_KEYS)]
    if "kind" in document and document["kind"] not in KINDS:
        problems.append(f"kind {document['kind']!r} is not one of {', '.join(KINDS)}")
    for key in ("id", "source"):
        if key in document and (not isinstance(document[key], str) or not document[key]):
            problems.append(f"{key} must be a non-empty string")
    if "labels" in document:
        problems += check_label_vector(document["labels"], "labels")
    if "meta" in document and not isinstance(document["meta"], dict):
        problems.append("meta must be an object")
    sentences = document.get("sentences")
    if "sentences" in document and not isinstance(sentences, list):
        problems.append("sentences must be a list")
    elif isinstance(sentences, list):
        if document.get("kind") == "image" and sentences:
            problems.append("sentences must be [] for kind image")
        for number, sentence in enumerate(sentences):
            where = f"sentences[{number}]"
            if not isinstance(sentence, dict) or set(sentence) != {"text", "labels"}:
                problems.append(f"{where} must be an object with exactly 'text' and 'labels'")
                continue
            if not isinstance(sentence["text"], str) or not sentence["text"]:
                problems.append(f"{where}.text must be a non-empty string")
            problems += check_label_vector(sentence["labels"], f"{where}.labels")
    return problems


def check_provenance(document: object) -> list[str]:
    """Problems with provenance.json (structure as in schema.json's provenance definition)."""
    if not isinstance(document, dict):
        return ["provenance must be an object"]
    problems = [f"lacks key {key!r}" for key in sorted(PROVENANCE_KEYS - document.keys())]
    if document.get("spec_version", SPEC_VERSION) != SPEC_VERSION:
        problems.append(f"spec_version is {document['spec_version']!r}; this validator reads {SPEC_VERSION}")
    if "label_order" in document and document["label_order"] != list(CHEXPERT_FINDINGS):
        problems.append("label_order differs from findings.CHEXPERT_FINDINGS")
    if "uncertainty_policy" in document and document["uncertainty_policy"] not in POLICIES:
        problems.append(f"uncertainty_policy {document['uncertainty_policy']!r} is not one of {POLICIES}")
    part = document.get("part")
    if part is not None and (read_part(part) is None or set(part) != {"index", "count"}):  # written shape only
        problems.append("part must be {index, count} integers with 1 <= index <= count")
    sources = document.get("sources", [])
    if not isinstance(sources, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("licence"), str)
            and isinstance(s.get("samples"), int) for s in sources):
        problems.append("sources must be a list of {name, licence, samples}")
    labeler = document.get("labeler")
    if labeler is not None and not (isinstance(labeler, dict) and all(
            isinstance(labeler.get(k), str) for k in ("name", "version", "rules_hash"))):
        problems.append("labeler must be null or {name, version, rules_hash} strings")
    image = document.get("image", {})
    if not isinstance(image, dict) or image.get("format") not in IMAGE_FORMATS or not isinstance(
            image.get("longer_side"), int):
        problems.append("image must give format (jpg|png) and longer_side (int)")
    counts = document.get("counts", {})
    if not isinstance(counts, dict) or not all(isinstance(counts.get(k), int) for k in ("inputs", "written",
                                                                                         "rejected")):
        problems.append("counts must give inputs, written and rejected as integers")
    elif counts["inputs"] != counts["written"] + counts["rejected"]:
        problems.append(f"counts: inputs {counts['inputs']} != written {counts['written']} + rejected "
                        f"{counts['rejected']}")
    for key in ("shards", "samples_per_shard"):
        if key in document and not isinstance(document[key], int):
            problems.append(f"{key} must be an integer")
    if "build_fingerprint" in document and not isinstance(document["build_fingerprint"], str):
        problems.append("build_fingerprint must be a string")
    return problems


def _read_json(path: Path, report: ValidationReport) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        report.problems.append(Problem(str(path), None, "missing"))
    except (ValueError, UnicodeDecodeError) as exc:
        report.problems.append(Problem(str(path), None, f"not valid JSON: {exc}"))
    return None


def check_sample(key: str, members: Mapping[str, bytes], *, shard: str = "", policy: str = "raw",
                 checksum: str | None = None, decode_images: bool = False,
                 longer_side: int | None = None) -> tuple[dict | None, list[Problem]]:
    """Check one sample; return (its parsed JSON or None when unusable, problems). Cheap by default.

    `members` maps extension -> bytes (a webdataset sample dict works: keys starting with `__` are ignored).
    `shard` names the file in each Problem; `policy` is the build's recorded label policy (values a build with
    that policy cannot have written are problems); `checksum`, when given, is compared with the sample's content
    checksum (`index.sample_checksum`); `decode_images` fully decodes images (else magic bytes only).
    Checks: UTF-8 JSON, the sample schema, label coding (labels.py), stored values under `policy`, the key is the
    one recomputed from source/id/kind, the members the kind needs (and no others), non-empty UTF-8 text, images.
    The document is returned whenever the JSON parsed, even with problems, so callers can name the kind.
    """
    found: list[Problem] = []

    def problem(member: str | None, message: str) -> None:
        found.append(Problem(shard, member, message))

    members = {ext: data for ext, data in members.items() if not ext.startswith("__")}
    if checksum is not None and sample_checksum(members) != checksum:
        problem(f"{key}.*", "content differs from the checksum in the shard index (edited after the build?)")
    if "json" not in members:
        problem(f"{key}.*", "sample has no .json member")
        return None, found
    member = f"{key}.json"
    try:
        raw = members["json"]
        document = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError) as exc:
        problem(member, f"not valid UTF-8 JSON: {exc}")
        return None, found
    messages = check_sample_json(document)
    for message in messages:
        problem(member, message)
    if messages:
        return (document if isinstance(document, dict) else None), found
    kind = document["kind"]
    vectors = [("labels", document["labels"])] + [(f"sentences[{i}].labels", s["labels"])
                                                   for i, s in enumerate(document["sentences"])]
    for where, vector in vectors:
        for message in stored_value_problems(vector, policy, where):
            problem(member, message)
    expected = sample_key(document["source"], document["id"], kind)
    if key != expected:
        problem(member, f"key {key} is not the key of source {document['source']!r}, id {document['id']!r}, "
                        f"kind {kind!r}: expected {expected}")
    images = [ext for ext in IMAGE_FORMATS if ext in members]
    if kind in IMAGE_KINDS and len(images) != 1:
        problem(member, f"kind {kind} needs exactly one image member (.jpg or .png), found {len(images)}")
    if kind not in IMAGE_KINDS and images:
        problem(f"{key}.{images[0]}", f"kind {kind} must not have an image member")
    if kind in TEXT_KINDS and "txt" not in members:
        problem(member, f"kind {kind} needs a .txt member")
    if kind not in TEXT_KINDS and "txt" in members:
        problem(f"{key}.txt", f"kind {kind} must not have a .txt member")
    if "txt" in members:
        try:
            text = members["txt"]
            if not (text.decode("utf-8") if isinstance(text, bytes) else text).strip():
                problem(f"{key}.txt", "text is empty")
        except UnicodeDecodeError as exc:
            problem(f"{key}.txt", f"not UTF-8: {exc}")
    for ext in images:
        _validate_image(f"{key}.{ext}", ext, members[ext], problem, longer_side, decode_images)
    return document, found


def validate_shards(folder: str | Path, decode_images: bool = True, check_index: bool = True) -> ValidationReport:
    """Validate every shard, `sizes.json`, `provenance.json`, `rejects.jsonl` and the index in `folder`."""
    folder = Path(folder)
    report = ValidationReport(str(folder))
    if not folder.is_dir():
        report.problems.append(Problem(str(folder), None, "not a folder"))
        return report
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX) or p.name == WORK_DIR)
    if leftovers:
        report.problems.append(Problem(str(folder), None, f"unfinished build: {', '.join(leftovers)} present; "
                                                          "rerun the same build command to complete it"))
    sizes = _read_json(folder / SIZES_FILE, report)
    provenance = _read_json(folder / PROVENANCE_FILE, report)
    policy, longer_side = "raw", None
    if provenance is not None:
        for message in check_provenance(provenance):
            report.problems.append(Problem(str(folder / PROVENANCE_FILE), None, message))
        if isinstance(provenance, dict):
            record = Provenance.from_json(provenance)
            policy = record.uncertainty_policy if record.uncertainty_policy in STORED_VALUES else policy
            longer_side = record.longer_side
    index = _read_index(folder, report) if check_index else None
    expected = index.sample_checksums() if index is not None else {}
    tars = sorted(p.name for p in folder.glob("*.tar"))
    for name in tars:
        if not SHARD_PATTERN.match(name):
            report.problems.append(Problem(str(folder / name), None, "name is not <prefix>-<6 digits>.tar"))
    if isinstance(sizes, dict):
        for name in sorted(set(sizes) - set(tars)):
            report.problems.append(Problem(str(folder / SIZES_FILE), None, f"lists {name}, which does not exist"))
        for name in sorted(set(tars) - set(sizes)):
            report.problems.append(Problem(str(folder / SIZES_FILE), None, f"does not list {name}"))
    elif sizes is not None:
        report.problems.append(Problem(str(folder / SIZES_FILE), None, "must be an object {tar name: count}"))
        sizes = None
    seen_keys: dict[str, str] = {}
    kinds: Counter = Counter()
    facts: list[ShardFacts] = []
    truncated: list[str] = []
    for name in tars:
        listed = sizes.get(name) if isinstance(sizes, dict) and isinstance(sizes.get(name), int) else None
        shard = _validate_tar(folder / name, report, seen_keys, policy, longer_side, decode_images,
                              expected.get(name) if index is not None else None, listed, truncated)
        facts.append(shard)
        kinds.update(shard.kinds)
        report.shards += 1
        report.samples += len(shard.keys)
        if name in truncated:  # reported once, with counts; the files describing the whole shard are not wrong
            continue
        if sizes is not None and name in sizes and sizes[name] != len(shard.keys):
            report.problems.append(Problem(str(folder / SIZES_FILE), None,
                                           f"{name}: says {sizes[name]} samples, the tar has {len(shard.keys)}"))
    report.kinds = dict(sorted(kinds.items()))
    report.facts = facts
    if index is not None:
        _compare_index(folder, index, [f for f in facts if f.name not in truncated],
                       policy if isinstance(provenance, dict) else None, report, truncated)
    rejected = _validate_rejects(folder / REJECTS_FILE, report)
    if isinstance(provenance, dict) and isinstance(provenance.get("counts"), dict) and not truncated:
        counts = provenance["counts"]
        if counts.get("written") != report.samples:
            report.problems.append(Problem(str(folder / PROVENANCE_FILE), None,
                                           f"counts.written is {counts.get('written')}, the shards hold "
                                           f"{report.samples} samples"))
        if rejected is not None and counts.get("rejected") != rejected:
            report.problems.append(Problem(str(folder / PROVENANCE_FILE), None,
                                           f"counts.rejected is {counts.get('rejected')}, {REJECTS_FILE} has "
                                           f"{rejected} lines"))
    return report


def _read_index(folder: Path, report: ValidationReport):
    path = folder / INDEX_FILE
    if not path.exists():
        report.problems.append(Problem(str(path), None, "missing; write it with 'medclip shards index "
                                                        f"{folder}' (builds made before the index existed)"))
        return None
    try:
        index = parse_index(path.read_bytes(), str(path))
        index.sample_checksums()
        index.bank_arrays()
    except ShardIndexError as exc:
        report.problems.append(Problem(str(path), None, str(exc).removeprefix(f"{path}: ")))
        return None
    return index


def _compare_index(folder: Path, index, facts: list[ShardFacts], policy: str | None,
                   report: ValidationReport, truncated: list[str] = ()) -> None:
    """The index must describe exactly the shards: names, counts, kinds, keys (checksums: per sample) and bank.
    `truncated` shards (already reported) are left out of `facts` and are not compared; nor is the bank then."""
    where = str(folder / INDEX_FILE)

    def problem(message: str) -> None:
        report.problems.append(Problem(where, None, message))

    if policy is not None and index.label_policy != policy:
        problem(f"label_policy is {index.label_policy!r}, provenance.json says {policy!r}")
    names = {shard.name for shard in facts} | set(truncated)
    for name in sorted(set(index.shards) - names):
        problem(f"lists {name}, which does not exist")
    for name in sorted(names - set(index.shards)):
        problem(f"does not list {name}")
    checksums = index.sample_checksums()
    for shard in facts:
        entry = index.shards.get(shard.name)
        if entry is not None and (entry.samples != len(shard.keys) or entry.kinds != dict(shard.kinds)):
            problem(f"{shard.name}: says {entry.samples} samples {entry.kinds}, the tar has {len(shard.keys)} "
                    f"{dict(sorted(shard.kinds.items()))}")
        recorded = list(checksums.get(shard.name, {}))
        if shard.name in checksums and recorded != shard.keys:
            missing = [key for key in recorded if key not in set(shard.keys)]
            extra = [key for key in shard.keys if key not in set(recorded)]
            detail = "; ".join(([f"missing from the tar: {', '.join(missing[:3])}"] if missing else [])
                               + ([f"not in the index: {', '.join(extra[:3])}"] if extra else []))
            problem(f"{shard.name}: sample keys differ from {index.checksums['file']} ({detail or 'order differs'})")
    if truncated:
        return
    bank = BankArrays.from_entries(merge_bank_entries({}, facts))
    recorded_bank = index.bank_arrays()
    if recorded_bank.entries() != bank.entries():
        problem(f"{index.bank['file']}: the sentence bank differs from the sentences in the shards "
                f"({len(recorded_bank)} entries recorded, {len(bank)} in the shards); rewrite it with "
                f"'medclip shards index {folder}'")


def _validate_rejects(path: Path, report: ValidationReport) -> int | None:
    if not path.exists():
        report.problems.append(Problem(str(path), None, "missing"))
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        where = f"line {number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            report.problems.append(Problem(str(path), where, f"not valid JSON: {exc}"))
            continue
        if not isinstance(entry, dict) or not {"source", "id", "reason", "detail", "input"} <= entry.keys():
            report.problems.append(Problem(str(path), where, "needs source, id, reason, detail and input"))
        elif entry["reason"] not in REJECT_REASONS:
            report.problems.append(Problem(str(path), where, f"unknown reason {entry['reason']!r}"))
    return len(lines)


def _validate_tar(path: Path, report: ValidationReport, seen_keys: dict[str, str], policy: str,
                  longer_side: int | None, decode_images: bool, checksums: dict[str, str] | None,
                  expected_count: int | None, facts_truncated: list[str]) -> ShardFacts:
    """Check one shard. A tar that ends early (cut mid-member or without its end blocks) is one problem with
    counts (`_truncation_problem`); the sample it cut is not checked member by member."""
    def problem(member: str | None, message: str) -> None:
        report.problems.append(Problem(str(path), member, message))

    facts = ShardFacts(path.name)
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    problem(member.name, "is not a regular file")
                    continue
                match = MEMBER_NAME.match(member.name)
                if not match:
                    problem(member.name, "name is not <key>.<jpg|png|txt|json> with key [A-Za-z0-9_-]+")
                    continue
                key, ext = match["key"], match["ext"]
                if not samples or samples[-1][0] != key:
                    if key in seen_keys:
                        where = "earlier in this shard" if seen_keys[key] == path.name else f"in {seen_keys[key]}"
                        problem(member.name, f"key {key} already appeared {where} (members of a sample must be "
                                             "adjacent and keys unique)")
                    seen_keys[key] = path.name
                    samples.append((key, {}))
                if ext in samples[-1][1]:
                    problem(member.name, f"second .{ext} member for key {key}")
                samples[-1][1][ext] = tar.extractfile(member).read()
        if not _has_end_blocks(path):  # cut at a member boundary: tarfile reads it as a shorter, whole archive
            raise EOFError("no end-of-archive blocks: cut at a member boundary")
    except (tarfile.TarError, OSError, EOFError) as exc:
        if not _is_truncation(exc):
            problem(None, f"unreadable tar: {exc}")
        else:
            report.problems.append(_truncation_problem(path, exc, samples, checksums, expected_count))
            facts_truncated.append(path.name)
    for key, members in samples:
        expected = None if checksums is None else checksums.get(key, "")
        document, found = check_sample(key, members, shard=str(path), policy=policy, checksum=expected,
                                       decode_images=decode_images, longer_side=longer_side)
        report.problems.extend(found)
        if document is not None and document.get("kind") in KINDS:
            with contextlib.suppress(KeyError, TypeError, AttributeError, UnicodeDecodeError):  # already reported
                facts.add(key, document, members)
        if not facts.keys or facts.keys[-1] != key:  # a sample whose facts could not be read still has a key
            facts.keys.append(key)
            facts.checksums.append(sample_checksum(members))
    return facts


def _has_end_blocks(path: Path) -> bool:
    """Whether the tar ends with the two zero 512-byte blocks every complete archive ends with."""
    size = path.stat().st_size
    if size < 1024:
        return False
    with open(path, "rb") as handle:
        handle.seek(size - 1024)
        return handle.read(1024) == bytes(1024)


def _is_truncation(exc: BaseException) -> bool:
    """A tar that ends before its data does (as opposed to bytes that are not a tar at all)."""
    return isinstance(exc, EOFError) or "unexpected end of data" in str(exc) or "truncated" in str(exc)


def _truncation_problem(path: Path, exc: BaseException, samples: list[tuple[str, dict[str, bytes]]],
                        checksums: dict[str, str] | None, expected: int | None) -> Problem:
    """The one problem of a truncated shard: what is readable and what is missing. The last sample read is
    dropped from `samples` unless the index's checksum shows it complete (the cut may have taken its later
    members)."""
    if samples:
        key, members = samples[-1]
        if checksums is None or checksums.get(key) != sample_checksum(members):
            samples.pop()
    if checksums is not None:
        expected = len(checksums)
        read = {key for key, _ in samples}
        missing = [key for key in checksums if key not in read]
        detail = (f"{len(samples)} complete samples readable, {len(missing)} of the {expected} samples the index "
                  f"lists are missing" + (f" (first missing: {missing[0]})" if missing else ""))
    elif expected is not None:
        detail = f"{len(samples)} complete samples readable of the {expected} sizes.json lists"
    else:
        detail = f"{len(samples)} complete samples readable"
    return Problem(str(path), None, f"truncated tar ({exc}; {path.stat().st_size} bytes): {detail}; restore the "
                                    "file or rebuild the shards (the index and sizes.json describe the whole shard)")


def _validate_image(member: str, ext: str, data: bytes, problem, longer_side: int | None, decode: bool) -> None:
    if not data.startswith(IMAGE_MAGIC[ext]):
        problem(member, f"bytes are not a {ext.upper()} file")
        return
    if not decode:
        return
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            found = decoded_image_problems(member, image, longer_side)
    except Exception as exc:  # any decoder failure is a broken member
        problem(member, f"does not decode: {type(exc).__name__}: {exc}")
        return
    for item in found:
        problem(item.member, item.message)


def decoded_image_problems(member: str, image, longer_side: int | None, *, shard: str = "") -> list[Problem]:
    """Problems of an image already decoded (a loaded PIL image): mode must be L, the longer side at most the
    build's `provenance.image.longer_side` (None: not checked).

    The checks that need pixels. `validate_shards` runs them after its decode and the training streams after
    theirs (one decode each), so both reject the same images with the same message.
    """
    found = []
    if image.mode != "L":
        found.append(Problem(shard, member, f"image mode is {image.mode}; the spec stores 8-bit grayscale (L)"))
    width, height = image.size
    if longer_side and max(width, height) > longer_side:
        found.append(Problem(shard, member, f"image is {width}x{height}, longer side above provenance "
                                            f"image.longer_side {longer_side}"))
    return found
