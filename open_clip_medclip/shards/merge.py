"""Index an existing build (`medclip shards index DIR`) and merge part builds (`medclip shards merge`).

A part build (`medclip shards build --part I/N`) is a complete, valid build of the inputs of part I (see
`open_clip_medclip.parts`) whose shard names carry `partIIIofNNN`, so N part folders never share a shard name.
`merge_builds` checks that the parts belong together (same spec, label policy, image settings, text unit, labeler
and shard size; parts 1..N each exactly once; no sample key twice), then puts every shard into one folder (hard
links where possible, else copies; the part folders stay as they are) and writes one `sizes.json`,
`rejects.jsonl`, index and `provenance.json` (last). The result holds exactly the samples, rejects, counts and
sentence bank of a single build of the same inputs; only shard boundaries and names differ.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from open_clip_medclip.errors import UserError
from open_clip_medclip.shards.format import (
    PROVENANCE_FILE,
    REJECTS_FILE,
    SIZES_FILE,
    WORK_DIR,
    Provenance,
    dump_json,
    write_atomic,
)
from open_clip_medclip.shards.index import (
    INDEX_FILE,
    ShardFacts,
    ShardIndex,
    ShardIndexError,
    index_files,
    parse_index,
    write_index_files,
)
from open_clip_medclip.shards.validate import validate_shards

# provenance keys that must agree between the parts of one build
SAME_IN_EVERY_PART = ("spec_version", "label_order", "uncertainty_policy", "labeler", "image", "text_unit",
                      "samples_per_shard")


def write_index(folder: str | Path) -> ShardIndex:
    """Read every shard of a finished build and write its index (for builds made before the index existed).

    Refuses a folder that does not validate (an index would vouch for broken shards); images are not decoded.
    """
    folder = Path(folder)
    report = validate_shards(folder, decode_images=False, check_index=False)
    if not report.ok:
        raise ShardIndexError(f"{folder}: not indexed, the build has {len(report.problems)} problem(s), first: "
                              f"{report.problems[0]}; see 'medclip shards validate {folder}'")
    provenance = Provenance.from_json(json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8")))
    files = index_files(report.facts, provenance.uncertainty_policy, provenance.spec_version)
    write_index_files(folder, files, write_atomic)
    return parse_index(files[INDEX_FILE], str(folder / INDEX_FILE))


@dataclasses.dataclass
class MergeSummary:
    out_dir: str
    parts: int
    shards: int
    inputs: int
    written: int
    rejected: int
    linked: int
    copied: int

    def line(self) -> str:
        return (f"{self.inputs} inputs = {self.written} written + {self.rejected} rejected in {self.shards} shard(s) "
                f"from {self.parts} part folder(s) at {self.out_dir}")

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _load_part(folder: Path) -> tuple[Provenance, ShardIndex]:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    if (folder / WORK_DIR).exists():
        raise UserError(f"{folder}: unfinished build ({WORK_DIR} present); rerun its build command first")
    if not (folder / PROVENANCE_FILE).exists():
        raise UserError(f"{folder}: no {PROVENANCE_FILE}, so not a finished shard build")
    if not (folder / INDEX_FILE).exists():
        raise UserError(f"{folder}: has no {INDEX_FILE}; write it with 'medclip shards index {folder}'")
    try:
        provenance = Provenance.from_json(json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8")))
    except ValueError as exc:
        raise UserError(f"{folder / PROVENANCE_FILE}: not valid JSON ({exc})") from None
    index = parse_index((folder / INDEX_FILE).read_bytes(), str(folder / INDEX_FILE))
    index.sample_checksums()
    index.bank_arrays()
    return provenance, index


def _check_parts(folders: list[Path], provenances: list[Provenance]) -> None:
    first = provenances[0]
    for folder, provenance in zip(folders[1:], provenances[1:]):
        for key in SAME_IN_EVERY_PART:
            if getattr(provenance, key) != getattr(first, key):
                raise UserError(f"{folder}: {key} is {getattr(provenance, key)!r} but {folders[0]} has "
                                f"{getattr(first, key)!r}; only parts of one build can be merged")
    parts = [provenance.part for provenance in provenances]
    if all(part is None for part in parts):
        return  # independent builds of the same settings: allowed as long as names and keys do not collide
    if any(part is None for part in parts):
        whole = folders[parts.index(None)]
        raise UserError(f"{whole}: is not a part build (no provenance part) but other folders are")
    counts = {count for _, count in parts}
    if len(counts) > 1:
        raise UserError(f"the folders are parts of different splits (N = {', '.join(map(str, sorted(counts)))})")
    count = counts.pop()
    seen: dict[int, Path] = {}
    for folder, (index, _) in zip(folders, parts):
        if index in seen:
            raise UserError(f"{folder}: part {index}/{count} is also {seen[index]}")
        seen[index] = folder
    missing = [f"{i}/{count}" for i in range(1, count + 1) if i not in seen]
    if missing:
        raise UserError(f"missing part(s) {', '.join(missing)}; build them with --part, or merge all {count}")


def _place(source: Path, target: Path) -> bool:
    """Hard-link `source` at `target` (True), or copy it when linking is impossible (False)."""
    try:
        os.link(source, target)
        return True
    except OSError:
        temp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(source, temp)
        os.replace(temp, target)
        return False


def merge_builds(part_dirs: list[str | Path], out_dir: str | Path) -> MergeSummary:
    """Combine the part folders of one build into `out_dir` (a new or empty folder) with one index."""
    folders = [Path(p) for p in part_dirs]
    if not folders:
        raise UserError("merge needs at least one part folder")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: not empty; merge into a new folder")
    loaded = [_load_part(folder) for folder in folders]
    provenances = [p for p, _ in loaded]
    _check_parts(folders, provenances)
    owner: dict[str, Path] = {}
    key_owner: dict[str, tuple[Path, str]] = {}
    facts: list[ShardFacts] = []
    bank: dict = {}
    for folder, (_, index) in zip(folders, loaded):
        for name, keys in index.sample_checksums().items():
            if name in owner:
                raise UserError(f"{folder}: shard {name} is also in {owner[name]}; part builds get distinct names "
                                "(build with --part I/N)")
            owner[name] = folder
            for key in keys:
                if key in key_owner:
                    raise UserError(f"{folder / name}: sample {key} is also in {key_owner[key][0] / key_owner[key][1]}")
                key_owner[key] = (folder, name)
            info = index.shards[name]
            facts.append(ShardFacts(name, list(keys), list(keys.values()), Counter(info.kinds)))
        arrays = index.bank_arrays()
        for text, codes, bits, count in arrays.entries():
            value = bank.setdefault((text, codes), [0, 0])
            value[0] |= bits
            value[1] += count
    out.mkdir(parents=True, exist_ok=True)
    linked = copied = 0
    sizes: dict[str, int] = {}
    rejects: list[str] = []
    for folder in folders:
        part_sizes = json.loads((folder / SIZES_FILE).read_text(encoding="utf-8"))
        for name in sorted(part_sizes):
            if _place(folder / name, out / name):
                linked += 1
            else:
                copied += 1
            sizes[name] = part_sizes[name]
        rejects.extend(line for line in (folder / REJECTS_FILE).read_text(encoding="utf-8").splitlines() if line)
    provenance = _merged_provenance(provenances, len(sizes))
    write_atomic(out / REJECTS_FILE, "".join(line + "\n" for line in rejects).encode())
    write_atomic(out / SIZES_FILE, (dump_json(dict(sorted(sizes.items())), indent=2) + "\n").encode())
    write_index_files(out, index_files(facts, provenance.uncertainty_policy, provenance.spec_version,
                                       bank_entries_map=bank), write_atomic)
    write_atomic(out / PROVENANCE_FILE, (dump_json(provenance.to_json(), indent=2) + "\n").encode())
    counts = provenance.counts
    return MergeSummary(str(out), len(folders), len(sizes), counts["inputs"], counts["written"], counts["rejected"],
                        linked, copied)


def _merged_provenance(provenances: list[Provenance], shards: int) -> Provenance:
    sources: dict[str, dict] = {}
    kinds: Counter = Counter()
    reasons: Counter = Counter()
    counts: Counter = Counter()
    for provenance in provenances:
        for source in provenance.sources:
            entry = sources.setdefault(source["name"], {**source, "samples": 0})
            entry["samples"] += source["samples"]
        kinds.update(provenance.kinds)
        reasons.update(provenance.reject_reasons)
        counts.update(provenance.counts)
    fingerprints = sorted(p.build_fingerprint for p in provenances)
    return dataclasses.replace(
        provenances[0], part=None, sources=[sources[name] for name in sorted(sources)],
        kinds=dict(sorted(kinds.items())), reject_reasons=dict(sorted(reasons.items())),
        counts={key: counts[key] for key in ("inputs", "written", "rejected")}, shards=shards,
        build_fingerprint=hashlib.sha256("\n".join(fingerprints).encode()).hexdigest(), merged_from=len(provenances))
