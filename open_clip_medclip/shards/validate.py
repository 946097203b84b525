"""Check a shard folder against the spec (`tarballs_spec/SPEC.md`, version 1) and say exactly what is wrong.

Every problem names the file, the tar member when there is one, and the rule broken. The per-sample JSON and
provenance checks are hand-written to agree with `tarballs_spec/schema.json` (a test runs both on the same
documents when `jsonschema` is installed), so validation needs no extra dependency.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from open_clip_medclip.findings import CHEXPERT_FINDINGS, NUM_FINDINGS, UNCERTAINTY_POLICIES
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
    sample_key,
)
from open_clip_medclip.sources.records import REJECT_REASONS

MEMBER_NAME = re.compile(r"^(?P<key>[A-Za-z0-9_-]+)\.(?P<ext>jpg|png|txt|json)$")
LABEL_POLICIES = (*UNCERTAINTY_POLICIES, "raw")
ALLOWED_VALUES = {"zeros": {0.0, 1.0}, "ones": {0.0, 1.0}, "keep": {0.0, 1.0, -1.0}, "raw": {0.0, 1.0, -1.0, None}}
SAMPLE_KEYS = {"kind", "id", "source", "labels", "sentences", "meta"}
PROVENANCE_KEYS = {"spec_version", "label_order", "uncertainty_policy", "sources", "labeler", "kinds", "image",
                   "text_unit", "samples_per_shard", "shards", "counts", "reject_reasons", "build_fingerprint",
                   "builder"}
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

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"folder": self.folder, "ok": self.ok, "shards": self.shards, "samples": self.samples,
                "kinds": self.kinds, "problems": [p.__dict__ for p in self.problems]}


def _is_label(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and float(value) in (1.0, 0.0, -1.0))


def check_label_vector(values: object, where: str) -> list[str]:
    if not isinstance(values, list) or len(values) != NUM_FINDINGS:
        return [f"{where} must be a list of {NUM_FINDINGS} values"]
    return [f"{where}[{i}] ({CHEXPERT_FINDINGS[i]}) is {value!r}; allowed are 1, 0, -1, null"
            for i, value in enumerate(values) if not _is_label(value)]


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
    if "uncertainty_policy" in document and document["uncertainty_policy"] not in LABEL_POLICIES:
        problems.append(f"uncertainty_policy {document['uncertainty_policy']!r} is not one of {LABEL_POLICIES}")
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


def validate_shards(folder: str | Path, decode_images: bool = True) -> ValidationReport:
    """Validate every shard, `sizes.json`, `provenance.json` and `rejects.jsonl` in `folder`."""
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
            policy = provenance.get("uncertainty_policy") if provenance.get("uncertainty_policy") in ALLOWED_VALUES \
                else "raw"
            longer_side = (provenance.get("image") or {}).get("longer_side")
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
    for name in tars:
        count = _validate_tar(folder / name, report, seen_keys, kinds, policy, longer_side, decode_images)
        report.shards += 1
        report.samples += count
        if sizes is not None and name in sizes and sizes[name] != count:
            report.problems.append(Problem(str(folder / SIZES_FILE), None,
                                           f"{name}: says {sizes[name]} samples, the tar has {count}"))
    report.kinds = dict(sorted(kinds.items()))
    rejected = _validate_rejects(folder / REJECTS_FILE, report)
    if isinstance(provenance, dict) and isinstance(provenance.get("counts"), dict):
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


def _validate_tar(path: Path, report: ValidationReport, seen_keys: dict[str, str], kinds: Counter, policy: str,
                  longer_side: int | None, decode_images: bool) -> int:
    def problem(member: str | None, message: str) -> None:
        report.problems.append(Problem(str(path), member, message))

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
    except (tarfile.TarError, OSError, EOFError) as exc:
        problem(None, f"unreadable tar: {exc}")
        return len(samples)
    for key, members in samples:
        _validate_sample(key, members, problem, kinds, policy, longer_side, decode_images)
    return len(samples)


def _validate_sample(key: str, members: dict[str, bytes], problem, kinds: Counter, policy: str,
                     longer_side: int | None, decode_images: bool) -> None:
    if "json" not in members:
        problem(f"{key}.*", "sample has no .json member")
        return
    member = f"{key}.json"
    try:
        document = json.loads(members["json"].decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        problem(member, f"not valid UTF-8 JSON: {exc}")
        return
    messages = check_sample_json(document)
    for message in messages:
        problem(member, message)
    if messages:
        return
    kind = document["kind"]
    kinds[kind] += 1
    allowed = ALLOWED_VALUES[policy]
    vectors = [("labels", document["labels"])] + [(f"sentences[{i}].labels", s["labels"])
                                                   for i, s in enumerate(document["sentences"])]
    for where, vector in vectors:
        bad = [CHEXPERT_FINDINGS[i] for i, v in enumerate(vector) if (None if v is None else float(v)) not in allowed]
        if bad:
            problem(member, f"{where}: {', '.join(bad)} not allowed under uncertainty policy {policy!r} "
                            f"(allowed: {sorted(allowed, key=str)})")
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
            if not members["txt"].decode("utf-8").strip():
                problem(f"{key}.txt", "text is empty")
        except UnicodeDecodeError as exc:
            problem(f"{key}.txt", f"not UTF-8: {exc}")
    for ext in images:
        _validate_image(f"{key}.{ext}", ext, members[ext], problem, longer_side, decode_images)


def _validate_image(member: str, ext: str, data: bytes, problem, longer_side: int | None, decode: bool) -> None:
    if not data.startswith(IMAGE_MAGIC[ext]):
        problem(member, f"bytes are not a {ext.upper()} file")
        return
    if not decode:
        return
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode, size = image.mode, image.size
    except Exception as exc:  # any decoder failure is a broken member
        problem(member, f"does not decode: {type(exc).__name__}: {exc}")
        return
    if mode != "L":
        problem(member, f"image mode is {mode}; the spec stores 8-bit grayscale (L)")
    if longer_side and max(size) > longer_side:
        problem(member, f"image is {size[0]}x{size[1]}, longer side above provenance image.longer_side "
                        f"{longer_side}")
