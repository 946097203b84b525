"""Evaluation suites: declarative definitions, builders that pin a test set, and the loader the harness uses.

A suite definition (`eval_suites/<name>.json`) names its classes, the rule that puts an image in a class,
the split recipe and seed, the prompt set and the metrics. `build_suite` reads the user's raw dataset through
the `open_clip_medclip.sources` adapters, applies the recipe, copies the chosen images into the output folder
and writes a manifest (ids + sha256, hashed itself) plus the CLIP_benchmark `wds` layout. Building twice from
the same raw data gives the same manifest hash. `load_suite` opens a built folder, a definition-free CSV
(`image,label[,split]` or `image,labels` with `|`-separated names) or a packaged suite name under a root.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from open_clip_medclip.eval.prompts import (
    eval_suites_dir,
    load_prompt_set,
    prompts_hash,
    sample_prompts,
    select_classes,
)
from open_clip_medclip.findings import FINDING_INDEX, apply_uncertainty_policy
from open_clip_medclip.sources.records import Record, Reject, read_csv, read_csv_header, resolve_image

SUITES_ROOT_ENV = "MEDCLIP_SUITES_ROOT"
MANIFEST_NAME = "manifest.csv"
SUITE_FILE = "suite.json"
MANIFEST_COLUMNS = ("id", "split", "label", "image", "sha256")
SPLITS = ("test", "train")
WDS_SHARD_SIZE = 1000
SAMPLE_DATA_DIR = Path(__file__).resolve().parents[1] / "sample_data"


class SuiteError(ValueError):
    """A suite definition, raw dataset or manifest cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------------------------
# Definitions


def suites_root() -> Path:
    """Where `--suite NAME` looks for built suites: $MEDCLIP_SUITES_ROOT or ~/.cache/open_clip_medclip/suites."""
    return Path(os.environ.get(SUITES_ROOT_ENV, Path.home() / ".cache" / "open_clip_medclip" / "suites"))


def available_suites() -> list[str]:
    """Names of the packaged suite definitions."""
    return sorted(p.stem for p in eval_suites_dir().glob("*.json"))


def load_definition(name_or_path: str | Path) -> dict:
    """A suite definition dict from a packaged name or a JSON path; checks the fields the builder needs."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = eval_suites_dir() / f"{name_or_path}.json"
    if not path.is_file():
        raise SuiteError(f"suite {str(name_or_path)!r}: no such definition (packaged: {', '.join(available_suites())})")
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("name", "classes", "source", "recipe"):
        if key not in definition:
            raise SuiteError(f"{path}: missing field {key!r}")
    definition.setdefault("task", "multiclass")
    definition.setdefault("prompts", {"set": None})
    definition.setdefault("ensemble", "logit")
    definition["_path"] = str(path)
    return definition


def csv_definition(csv_path: str | Path) -> dict:
    """The definition of a no-code CSV suite: classes from the CSV (sorted), class names as prompts, its own splits."""
    path = Path(csv_path)
    task = "multilabel" if "labels" in read_csv_header(path) else "multiclass"
    return {"name": _safe_id(path.stem), "classes": [], "task": task, "source": {"format": "csv"},
            "recipe": {"kind": "all"}, "prompts": {"set": None}, "ensemble": "embed", "_path": str(path)}


def suite_prompts(definition: Mapping, prompt_set: str | None = None, per_class: int | None | str = "default",
                  seed: int | None = None) -> dict[str, list[str]]:
    """The prompts per suite class: the definition's set (or `prompt_set`), sampled as it says (or as overridden).

    Without a prompt set every class is prompted by its own name (CLIP_benchmark's `{c}`).
    """
    spec = dict(definition.get("prompts") or {})
    name = prompt_set or spec.get("set")
    classes = list(definition["classes"])
    if not name:
        return {cls: [cls] for cls in classes}
    full = select_classes(load_prompt_set(name), classes, spec.get("class_map"), where=f"prompt set {name!r}")
    n = spec.get("per_class") if per_class == "default" else per_class
    return sample_prompts(full, n, spec.get("seed", 42) if seed is None else seed)


# ---------------------------------------------------------------------------------------------------------------
# Reading raw data through the source adapters


@dataclass
class Candidate:
    """One raw image that a class rule accepted, before the recipe decides whether it is in the suite."""

    id: str
    image_path: str
    label: str
    split: str | None = None  # from the raw data (a split column), when it has one
    frontal: bool | None = None
    where: str = ""


def _first_existing(raw: Path, names: Sequence[str], what: str) -> Path:
    if raw.is_file():
        return raw
    for name in names:
        if (raw / name).is_file():
            return raw / name
        found = sorted(raw.rglob(name))
        if found:
            return found[0]
    raise SuiteError(f"{raw}: no {what} found (looked for {', '.join(names)})")


def _kermany_records(raw: Path, source: Mapping) -> Iterator[Record | Reject]:
    """Kermany pediatric: `labels.csv` (`image,label[,split]`) when present, else `<class>/` folders."""
    labels_csv = raw / source.get("labels", "labels.csv") if raw.is_dir() else raw
    if labels_csv.is_file():
        _, rows = read_csv(labels_csv, required=("image", "label"))
        for line, row in rows:
            yield Record(id=row["image"].rsplit(".", 1)[0], source="kermany",
                         image_path=resolve_image(labels_csv.parent, row["image"]),
                         meta={"class": row["label"], "split": row.get("split") or None, "where": f"{labels_csv}:{line}"})
        return
    from open_clip_medclip.sources.class_folders import iter_class_folders

    yield from iter_class_folders(raw, {"NORMAL": [], "PNEUMONIA": []}, "kermany")


def _covid_records(raw: Path, source: Mapping) -> Iterator[Record | Reject]:
    from open_clip_medclip.sources.class_folders import iter_class_folders

    folders = source.get("folders", ["COVID", "Normal"])
    yield from iter_class_folders(raw, {name: [] for name in folders}, "covid",
                                  image_dir=lambda folder: folder / "images" if (folder / "images").is_dir() else folder)


def _csv_records(raw: Path, source: Mapping) -> Iterator[Record | Reject]:
    """The no-code format: `image,label[,split]` (or `labels` with `|`-separated names); paths relative to the CSV."""
    header, rows = read_csv(raw)
    label_column = "labels" if "labels" in header else "label"
    if "image" not in header or label_column not in header:
        raise SuiteError(f"{raw}: a suite CSV needs columns 'image' and 'label' (or 'labels'); header has {header}")
    for line, row in rows:
        yield Record(id=_safe_id(row["image"].rsplit(".", 1)[0]), source="csv",
                     image_path=resolve_image(raw.parent, row["image"]),
                     meta={"class": row[label_column], "split": row.get("split") or None, "where": f"{raw}:{line}"})


def iter_raw_records(definition: Mapping, raw: str | Path) -> Iterator[Record | Reject]:
    """Records of the raw dataset named by the definition's `source.format`, read by the project's adapters."""
    source = definition["source"]
    fmt = source["format"]
    raw = Path(raw)
    if str(raw) == "sample":
        if "sample_data" not in source:
            raise SuiteError(f"suite {definition['name']!r} has no bundled sample; pass --raw PATH")
        raw = SAMPLE_DATA_DIR / source["sample_data"]
    if not raw.exists():
        raise SuiteError(f"{raw}: raw dataset path does not exist")
    if fmt == "chexpert":
        from open_clip_medclip.sources.chexpert import iter_chexpert

        csv_path = _first_existing(raw, [source.get("labels", "train.csv")], "CheXpert label CSV")
        yield from iter_chexpert(csv_path, root=Path(source["image_root"]) if "image_root" in source else None)
    elif fmt == "mimic":
        from open_clip_medclip.sources.mimic import iter_mimic

        labels = _first_existing(raw, [source.get("labels", "mimic-cxr-2.0.0-chexpert.csv")], "MIMIC label CSV")
        metadata = _first_existing(raw, [source.get("metadata", "mimic-cxr-2.0.0-metadata.csv")], "MIMIC metadata CSV")
        yield from iter_mimic(labels, metadata, root=raw if raw.is_dir() else raw.parent)
    elif fmt == "nih_cxr14":
        from open_clip_medclip.sources.nih import iter_nih

        csv_path = _first_existing(raw, [source.get("labels", "labels.csv"), "Data_Entry_2017.csv"], "NIH label CSV")
        yield from iter_nih(csv_path)
    elif fmt == "rsna":
        from open_clip_medclip.sources.rsna import iter_rsna

        labels = _first_existing(raw, [source.get("labels", "stage_2_train_labels.csv")], "RSNA label CSV")
        image_dir = labels.parent / source.get("images", "stage_2_train_images")
        yield from iter_rsna(labels, image_dir if image_dir.is_dir() else labels.parent)
    elif fmt == "kermany":
        yield from _kermany_records(raw, source)
    elif fmt == "covid":
        yield from _covid_records(raw, source)
    elif fmt == "csv":
        yield from _csv_records(_first_existing(raw, ["suite.csv"], "suite CSV"), source)
    else:
        raise SuiteError(f"suite {definition['name']!r}: unknown source format {fmt!r}")


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
            labels = apply_uncertainty_policy(item.labels, policy) if item.labels else [0.0] * len(FINDING_INDEX)
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
        record_id = _safe_id(item.id)
        if record_id in seen:
            rejects.append({"id": item.id, "reason": "duplicate_id", "detail": "id already used", "input": item.image_path})
            continue
        seen.add(record_id)
        split = meta.get("split")
        candidates.append(Candidate(id=record_id, image_path=str(item.image_path), label=label,
                                    split=str(split).lower() if split else None, frontal=_is_frontal(meta),
                                    where=str(meta.get("where", item.image_path))))
    return candidates, rejects


def _safe_id(text: str) -> str:
    """An id usable as a file name and a WebDataset key (no dots, no slashes)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")


# ---------------------------------------------------------------------------------------------------------------
# Recipes: which candidates form the test (and train) split. All randomness comes from one seeded RandomState,
# consumed in a fixed order, so a recipe is a pure function of (raw table order, definition).


def _by_class(candidates: Sequence[Candidate], classes: Sequence[str]) -> dict[str, list[Candidate]]:
    groups: dict[str, list[Candidate]] = {cls: [] for cls in classes}
    for cand in candidates:
        groups.setdefault(cand.label, []).append(cand)
    return groups


def _sample(rng: np.random.RandomState, items: Sequence, n: int | None) -> list:
    """Like `DataFrame.sample(n, random_state=rng)`: a permutation prefix (all items, shuffled, when n is None)."""
    if n is None or n >= len(items):
        n = len(items)
    order = rng.permutation(len(items))[:n]
    return [items[i] for i in order]


def _recipe_medclip_5x200(cands: list[Candidate], classes: Sequence[str], recipe: Mapping,
                          rng: np.random.RandomState) -> tuple[list[Candidate], list[Candidate]]:
    """MedCLIP's CheXpert/MIMIC-5x200 (reference §4.4): `per_class` per class, half of the pool to test."""
    if recipe.get("frontal_only"):
        cands = [c for c in cands if c.frontal]
    groups = _by_class(cands, classes)
    pool = [c for cls in classes for c in _sample(rng, groups[cls], recipe.get("per_class", 400))]
    shuffled = _sample(rng, pool, None)
    n_test = int(round(len(pool) * recipe.get("test_fraction", 0.5)))
    return shuffled[:n_test], shuffled[n_test:]


def _recipe_split_column(cands: list[Candidate], classes: Sequence[str], recipe: Mapping,
                         rng: np.random.RandomState) -> tuple[list[Candidate], list[Candidate]]:
    """Use the raw data's split column when it has one, else a seeded stratified hold-out."""
    test_value, train_value = recipe.get("test_value", "heldout"), recipe.get("train_value", "train")
    if any(c.split for c in cands):
        test = [c for c in cands if c.split == test_value]
        train = [c for c in cands if c.split == train_value]
    else:
        test, train = [], []
        for group in _by_class(cands, classes).values():
            shuffled = _sample(rng, group, None)
            n_test = int(round(len(group) * recipe.get("test_fraction", 0.3)))
            test += shuffled[:n_test]
            train += shuffled[n_test:]
    return test, train


def _recipe_balanced(cands: list[Candidate], classes: Sequence[str], recipe: Mapping,
                     rng: np.random.RandomState) -> tuple[list[Candidate], list[Candidate]]:
    """COVID / RSNA (reference §4.4): optional random hold-out, then all positives + as many negatives."""
    positive, negative = recipe.get("positive_class", classes[-1]), recipe.get("negative_class", classes[0])
    holdout = recipe.get("holdout_fraction")
    if holdout:
        shuffled = _sample(rng, cands, None)
        n_pool = int(round(len(shuffled) * holdout))
        pool, train = shuffled[:n_pool], shuffled[n_pool:]
    else:
        pool, train = list(cands), []
    groups = _by_class(pool, classes)
    test = groups[positive] + _sample(rng, groups[negative], len(groups[positive]))
    if recipe.get("max_test"):
        test = _sample(rng, test, recipe["max_test"])
    test_ids = {c.id for c in test}
    if not holdout:
        train = [c for c in pool if c.id not in test_ids]
    return test, train


def _recipe_all(cands: list[Candidate], classes: Sequence[str], recipe: Mapping,
                rng: np.random.RandomState) -> tuple[list[Candidate], list[Candidate]]:
    """Every candidate, split by its own `split` value (test when absent) - the no-code CSV default."""
    return [c for c in cands if (c.split or "test") == "test"], [c for c in cands if c.split == "train"]


RECIPES = {
    "medclip-5x200": _recipe_medclip_5x200,
    "split-column": _recipe_split_column,
    "balanced": _recipe_balanced,
    "all": _recipe_all,
}


def _cap_per_class(rng: np.random.RandomState, items: list[Candidate], classes: Sequence[str],
                   cap: int | None) -> list[Candidate]:
    if not cap:
        return items
    return [c for cls, group in _by_class(items, classes).items() for c in _sample(rng, group, cap)]


def select_split(definition: Mapping, candidates: list[Candidate]) -> dict[str, list[Candidate]]:
    """Run the definition's recipe; returns {"test": [...], "train": [...]} in recipe order."""
    recipe = definition["recipe"]
    kind = recipe.get("kind", "all")
    if kind not in RECIPES:
        raise SuiteError(f"suite {definition['name']!r}: unknown recipe {kind!r}; known: {', '.join(RECIPES)}")
    classes = list(definition["classes"])
    rng = np.random.RandomState(int(recipe.get("seed", definition.get("seed", 42))))
    test, train = RECIPES[kind](candidates, classes, recipe, rng)
    test = _cap_per_class(rng, test, classes, recipe.get("max_test_per_class"))
    train = _cap_per_class(rng, train, classes, recipe.get("max_train_per_class"))
    return {"test": test, "train": train}


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


def _write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """A reproducible tar (fixed mtime/owner), written to a temp name and renamed so it is never half-written."""
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def write_wds(out: Path, name: str, classes: Sequence[str], rows: Sequence[dict], prompts: Mapping[str, list[str]],
              multilabel: bool = False) -> Path:
    """The CLIP_benchmark `wds/<name>` layout under `out/wds` from manifest rows, plus a per-class template JSON."""
    wds = out / "wds"
    wds.mkdir(parents=True, exist_ok=True)
    (wds / "classnames.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    (wds / "zeroshot_classification_templates.txt").write_text("{c}\n", encoding="utf-8")
    if multilabel:
        (wds / "dataset_type.txt").write_text("multilabel\n", encoding="utf-8")
    templates = {f"wds/{name}": dict(prompts), name: dict(prompts)}
    (wds / "custom_templates.json").write_text(json.dumps(templates, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    index = {cls: i for i, cls in enumerate(classes)}
    for split in SPLITS:
        split_rows = [r for r in rows if r["split"] == split]
        if not split_rows:
            continue
        (wds / split).mkdir(exist_ok=True)
        shards = [split_rows[i:i + WDS_SHARD_SIZE] for i in range(0, len(split_rows), WDS_SHARD_SIZE)]
        for number, shard in enumerate(shards):
            members = []
            for row in shard:
                data = (out / row["image"]).read_bytes()
                ext = row["image"].rsplit(".", 1)[1]
                members.append((f"{row['id']}.{ext}", data))
                names = row["label"].split("|")
                if multilabel:
                    vector = np.zeros(len(classes), dtype=np.float32)
                    vector[[index[n] for n in names]] = 1
                    buffer = io.BytesIO()
                    np.save(buffer, vector)
                    members.append((f"{row['id']}.npy", buffer.getvalue()))
                else:
                    members.append((f"{row['id']}.cls", str(index[names[0]]).encode()))
            _write_tar(wds / split / f"{number}.tar", members)
        (wds / split / "nshards.txt").write_text(f"{len(shards)}\n", encoding="utf-8")
    return wds


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
    manifest = out / MANIFEST_NAME
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
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
    record["build"] = {"manifest_sha256": manifest_sha256(manifest), "counts": counts,
                       "num_candidates": len(candidates), "num_rejected": len(rejects),
                       "prompts_sha256": prompts_hash(prompts), "definition_file": definition.get("_path")}
    (out / SUITE_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return BuildResult(out=out, manifest_sha256=record["build"]["manifest_sha256"], counts=counts,
                       num_rejected=len(rejects), rejects_path=rejects_path)


# ---------------------------------------------------------------------------------------------------------------
# Loading a suite for evaluation


@dataclass
class SuiteEntry:
    id: str
    image_path: Path
    label: str
    split: str
    sha256: str | None = None


@dataclass
class Suite:
    """What the harness needs: classes, task, prompts spec, and entries with resolved image paths."""

    name: str
    classes: list[str]
    task: str
    definition: dict
    entries: list[SuiteEntry]
    source: Path
    manifest_sha256: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def split(self, name: str = "test") -> list[SuiteEntry]:
        return [e for e in self.entries if e.split == name]

    def label_index(self, entries: Sequence[SuiteEntry]) -> np.ndarray:
        """(n,) class ids for multiclass suites, (n, C) 0/1 targets for multilabel ones."""
        index = {cls: i for i, cls in enumerate(self.classes)}
        if self.multilabel:
            targets = np.zeros((len(entries), len(self.classes)), dtype=np.int64)
            for row, entry in enumerate(entries):
                targets[row, [index[n] for n in entry.label.split("|")]] = 1
            return targets
        return np.array([index[e.label] for e in entries], dtype=np.int64)

    def check_images(self, entries: Sequence[SuiteEntry] | None = None, verify_hashes: bool = False) -> None:
        """Raise a clear error naming any missing image (and, with `verify_hashes`, any changed one)."""
        entries = self.entries if entries is None else entries
        missing = [e for e in entries if not e.image_path.is_file()]
        if missing:
            shown = ", ".join(f"{e.id} ({e.image_path})" for e in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{self.source}: {len(missing)} image(s) listed in the manifest are missing: "
                                    f"{shown}{more}")
        if verify_hashes:
            for e in entries:
                if e.sha256 and sha256_bytes(e.image_path.read_bytes()) != e.sha256:
                    raise SuiteError(f"{self.source}: image {e.id} ({e.image_path}) does not match its manifest sha256")


def _suite_from_csv(path: Path) -> tuple[list[SuiteEntry], str]:
    header, rows = read_csv(path)
    label_column = "labels" if "labels" in header else "label"
    if "image" not in header or label_column not in header:
        raise SuiteError(f"{path}: a suite CSV needs columns 'image' and 'label' (or 'labels'); header has {header}")
    entries = []
    for line, row in rows:
        if not row.get("image") or not row.get(label_column):
            raise SuiteError(f"{path}:{line}: empty image or {label_column}")
        image = Path(resolve_image(path.parent, row["image"]))
        split = (row.get("split") or "test").lower()
        entries.append(SuiteEntry(id=row.get("id") or _safe_id(row["image"].rsplit(".", 1)[0]), image_path=image,
                                  label=row[label_column], split=split, sha256=row.get("sha256") or None))
    return entries, label_column


def load_suite(suite: str | Path) -> Suite:
    """A built suite folder, a manifest/no-code CSV, or a name under `suites_root()`."""
    path = Path(suite)
    if not path.exists() and not path.suffix:
        path = suites_root() / str(suite)
        if not path.exists():
            hint = (f"build it with `medclip eval build-suite {suite} --raw PATH --out {path}`"
                    if str(suite) in available_suites() else f"packaged suites: {', '.join(available_suites())}")
            raise SuiteError(f"suite {str(suite)!r}: not a folder or CSV and not built under {suites_root()}; {hint}")
    if path.is_dir():
        manifest, suite_file = path / MANIFEST_NAME, path / SUITE_FILE
        if not manifest.is_file():
            raise SuiteError(f"{path}: no {MANIFEST_NAME}; is this a built suite folder?")
        definition = json.loads(suite_file.read_text(encoding="utf-8")) if suite_file.is_file() else {}
    elif path.is_file():
        manifest, definition = path, {}
    else:
        raise SuiteError(f"{path}: suite not found")
    entries, label_column = _suite_from_csv(manifest)
    if not entries:
        raise SuiteError(f"{manifest}: no rows")
    names = sorted({n for e in entries for n in e.label.split("|")})
    classes = list(definition.get("classes") or names)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise SuiteError(f"{manifest}: labels {unknown} are not classes of the suite ({classes})")
    task = definition.get("task") or ("multilabel" if label_column == "labels" else "multiclass")
    definition = {"name": definition.get("name") or (path.stem if path.is_file() else path.name),
                  "classes": classes, "task": task, **{k: v for k, v in definition.items() if k not in ("classes", "task", "name")}}
    return Suite(name=definition["name"], classes=classes, task=task, definition=definition, entries=entries,
                 source=manifest, manifest_sha256=manifest_sha256(manifest))
