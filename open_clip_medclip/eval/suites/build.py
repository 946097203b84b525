"""Building and pinning a suite: read the raw dataset through the source adapters, apply the class rules and the
recipe, copy the chosen images (8-bit, decoded once) and write the manifest (ids + sha256, hashed itself), the
rejects, `suite.json` and the CLIP_benchmark export. Building twice from the same raw data gives the same manifest
hash."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from open_clip_medclip.errors import UserError, WorkNotDone
from open_clip_medclip.eval.prompts import prompts_hash
from open_clip_medclip.eval.suites.definitions import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    SPLITS,
    SUITE_FILE,
    SuiteError,
    load_definition,
    suite_prompts,
)
from open_clip_medclip.eval.suites.export import write_wds
from open_clip_medclip.eval.suites.recipes import Candidate, select_split
from open_clip_medclip.findings import FINDING_INDEX
from open_clip_medclip.labels import apply_policy
from open_clip_medclip.sources import SAMPLE_DATA_DIR
from open_clip_medclip.sources.records import Record, Reject, SourceError
from open_clip_medclip.sources.registry import get_source
from open_clip_medclip.sources.suite_csv import safe_id


def iter_raw_records(definition: Mapping, raw: str | Path) -> Iterator[Record | Reject]:
    """Records of the raw dataset named by the definition's `source.format`: the `sources.registry` adapter."""
    source = definition["source"]
    fmt = source["format"]
    raw = Path(raw)
    if str(raw) == "sample":
        if "sample_data" not in source:
            raise SuiteError(f"suite {definition['name']!r} has no bundled sample; pass --raw PATH")
        raw = SAMPLE_DATA_DIR / source["sample_data"]
    if not raw.exists():
        raise SuiteError(f"{raw}: raw dataset path does not exist")
    try:
        adapter = get_source(fmt)
    except UserError as exc:
        raise SuiteError(f"suite {definition['name']!r}: {exc}") from None
    try:
        yield from adapter.suite_items(raw, source)
    except SourceError as exc:
        raise SuiteError(str(exc)) from None


def _matches(rule: Mapping, labels: Sequence[float], meta: Mapping) -> bool:
    """A class rule: every `positive` finding is 1, every `negative` finding is 0, every `meta` value equal."""
    if any(labels[FINDING_INDEX[name]] != 1.0 for name in rule.get("positive", ())):
        return False
    if any(labels[FINDING_INDEX[name]] != 0.0 for name in rule.get("negative", ())):
        return False
    return all(str(meta.get(key, "")).lower() == str(value).lower() for key, value in rule.get("meta", {}).items())


def _is_frontal(meta: Mapping) -> bool | None:
    if meta.get("frontal_lateral"):
        return str(meta["frontal_lateral"]).lower() == "frontal"
    if meta.get("view"):
        return str(meta["view"]).upper() in ("PA", "AP")
    return None


def collect_candidates(definition: Mapping, raw: str | Path) -> tuple[list[Candidate], list[dict]]:
    """Apply the class rules to every raw record; return (candidates in raw order, rejects as dicts).

    Labels are read with the definition's uncertainty policy (MedCLIP: blank and uncertain -> 0). An image is a
    candidate only when exactly one class rule accepts it. No-code CSV suites take the class from the CSV.
    """
    rules = definition.get("class_rules") or {}
    policy = definition.get("uncertainty_policy", "zeros")
    classes = list(definition["classes"])
    candidates: list[Candidate] = []
    rejects: list[dict] = []
    seen: set[str] = set()
    for item in iter_raw_records(definition, raw):
        if isinstance(item, Reject):
            rejects.append(item.to_json())
            continue
        meta = item.meta or {}
        if rules:
            labels = apply_policy(item.labels, policy).tolist() if item.labels else [0.0] * len(FINDING_INDEX)
            matched = [cls for cls in classes if _matches(rules[cls], labels, meta)]
            if len(matched) != 1:
                continue
            label = matched[0]
        else:
            label = str(meta.get("class", ""))
            names = [name.strip() for name in label.split("|") if name.strip()]
            if not names or (classes and any(name not in classes for name in names)):
                rejects.append({"id": item.id, "reason": "unknown_class", "detail": f"label {label!r} is not one of {classes}",
                                "input": meta.get("where", "")})
                continue
        record_id = safe_id(item.id)
        if record_id in seen:
            rejects.append({"id": item.id, "reason": "duplicate_id", "detail": "id already used", "input": item.image_path})
            continue
        seen.add(record_id)
        split = meta.get("split")
        candidates.append(Candidate(id=record_id, image_path=str(item.image_path), label=label,
                                    split=str(split).lower() if split else None, frontal=_is_frontal(meta),
                                    where=str(meta.get("where", item.image_path))))
    return candidates, rejects


# ---------------------------------------------------------------------------------------------------------------
# Images


PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
PASSTHROUGH_MODES = ("L", "RGB")


def read_image_bytes(path: str | Path) -> tuple[bytes, str]:
    """(bytes, extension) of an image as the suite stores it, decoded once so a corrupt file raises here.

    8-bit JPEG/PNG/WebP files are kept byte for byte; DICOM, 16-bit and other formats become an 8-bit grayscale
    PNG through the shard writer's decoder (`shards.images.load_grayscale`: VOI LUT, MONOCHROME1), so
    CLIP_benchmark's plain PIL decoding sees the same pixels as our harness.
    """
    from open_clip_medclip.shards.images import ImageRejected, load_grayscale

    path = Path(path)
    try:
        image = load_grayscale(path)
    except ImageRejected as exc:
        raise OSError(str(exc)) from None
    try:
        with Image.open(path) as original:
            fmt, mode = original.format, original.mode
    except Exception:  # DICOM and other files Pillow cannot open directly: re-encoded below
        fmt = mode = None
    if fmt in PASSTHROUGH_FORMATS and mode in PASSTHROUGH_MODES:
        return path.read_bytes(), PASSTHROUGH_FORMATS[fmt]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def load_image(path: str | Path) -> Image.Image:
    """An RGB PIL image of an X-ray (8-bit grayscale first, as MedCLIP's `convert('L')`), for OpenCLIP transforms."""
    from open_clip_medclip.shards.images import load_grayscale

    return load_grayscale(path).convert("RGB")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Building


@dataclass
class BuildResult:
    out: Path
    manifest_sha256: str
    counts: dict
    num_rejected: int
    rejects_path: Path


def manifest_sha256(path: str | Path) -> str:
    """sha256 of the manifest file's bytes (ids, splits, labels, image names and image hashes)."""
    return sha256_bytes(Path(path).read_bytes())


def build_suite(name_or_definition: str | Path | Mapping, raw: str | Path, out: str | Path,
                skip_missing: bool = False, progress: bool = True) -> BuildResult:
    """Turn a raw dataset into a pinned suite folder: images, manifest (+ sha256), rejects, suite.json, wds.

    A corrupt image is excluded, logged in `rejects.jsonl` and counted; a missing image is an error naming
    it (or a reject with `skip_missing`).
    """
    from tqdm import tqdm

    definition = dict(name_or_definition) if isinstance(name_or_definition, Mapping) else load_definition(name_or_definition)
    out = Path(out)
    candidates, rejects = collect_candidates(definition, raw)
    if not definition["classes"]:
        definition["classes"] = sorted({n for c in candidates for n in c.label.split("|")})
    selected = select_split(definition, candidates)
    if not selected["test"]:
        raise SuiteError(f"suite {definition['name']!r}: no test images selected from {raw} "
                         f"({len(candidates)} candidates, {len(rejects)} rejected rows)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    listed_rejects = len(rejects)  # rejects from here on are selected images that could not be used
    todo = [(split, cand) for split in SPLITS for cand in selected[split]]
    for split, cand in tqdm(todo, desc=f"build {definition['name']}", disable=not progress, unit="img"):
        source = Path(cand.image_path)
        if not source.is_file():
            if not skip_missing:
                raise SuiteError(f"{source}: image file not found (listed at {cand.where}); "
                                 "pass --skip-missing to leave it out")
            rejects.append({"id": cand.id, "reason": "missing_image", "detail": "file not found", "input": str(source)})
            continue
        try:
            data, ext = read_image_bytes(source)
        except Exception as exc:  # any decoder failure means the image is unusable
            rejects.append({"id": cand.id, "reason": "corrupt_image", "detail": f"{type(exc).__name__}: {exc}",
                            "input": str(source)})
            continue
        relative = f"images/{cand.id}.{ext}"
        target = out / relative
        if not target.is_file() or target.read_bytes() != data:
            target.write_bytes(data)
        rows.append({"id": cand.id, "split": split, "label": cand.label, "image": relative, "sha256": sha256_bytes(data)})
    if not any(row["split"] == "test" for row in rows):  # before the manifest: a previous good suite stays
        reasons = Counter(reject["reason"] for reject in rejects[listed_rejects:])
        raise WorkNotDone(f"build-suite: suite {definition['name']!r} not written: all {len(selected['test'])} "
                          f"selected test image(s) were rejected ({', '.join(f'{n} {r}' for r, n in reasons.items())})")
    manifest = out / MANIFEST_NAME
    staged = manifest.with_name(f".{MANIFEST_NAME}.tmp")  # renamed into place last: a failed build keeps the old one
    with open(staged, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    rejects_path = out / "rejects.jsonl"
    rejects_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects), encoding="utf-8")
    prompts = suite_prompts(definition)
    write_wds(out, definition["name"], definition["classes"], rows, prompts, definition["task"] == "multilabel")
    counts = {split: {cls: sum(1 for r in rows if r["split"] == split and cls in r["label"].split("|"))
                      for cls in definition["classes"]} for split in SPLITS}
    record = {key: value for key, value in definition.items() if not key.startswith("_")}
    record["build"] = {"manifest_sha256": manifest_sha256(staged), "counts": counts,
                       "num_candidates": len(candidates), "num_rejected": len(rejects),
                       "prompts_sha256": prompts_hash(prompts), "definition_file": definition.get("_path")}
    suite_tmp = out / f".{SUITE_FILE}.tmp"
    suite_tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(suite_tmp, out / SUITE_FILE)
    os.replace(staged, manifest)
    return BuildResult(out=out, manifest_sha256=record["build"]["manifest_sha256"], counts=counts,
                       num_rejected=len(rejects), rejects_path=rejects_path)
