"""A built suite opened for evaluation: `Suite` / `SuiteEntry` and `load_suite` (a built folder, a
definition-free CSV (`image,label[,split]` or `image,labels` with `|`-separated names) or a packaged suite name
under a root)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from open_clip_medclip.eval.suites.build import manifest_sha256, sha256_bytes
from open_clip_medclip.eval.suites.definitions import (
    MANIFEST_NAME,
    SUITE_FILE,
    MissingImagesError,
    SuiteError,
    available_suites,
    suites_root,
)
from open_clip_medclip.sources.suite_csv import read_suite_csv


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
            if len(missing) == 1:
                raise MissingImagesError(f"{missing[0].image_path}: image {missing[0].id} listed in {self.source} is "
                                         "missing; restore it or rebuild the suite")
            raise MissingImagesError(f"{len(missing)} images listed in {self.source} are missing: {shown}{more}")
        if verify_hashes:
            for e in entries:
                if e.sha256 and sha256_bytes(e.image_path.read_bytes()) != e.sha256:
                    raise SuiteError(f"{self.source}: image {e.id} ({e.image_path}) does not match its manifest sha256")


def _suite_from_csv(path: Path) -> tuple[list[SuiteEntry], str]:
    label_column, rows = read_suite_csv(path, error=SuiteError)
    return [SuiteEntry(id=row.id, image_path=Path(row.image_path), label=row.label, split=row.split or "test",
                       sha256=row.sha256) for row in rows], label_column


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
