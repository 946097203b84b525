"""The no-code suite CSV: `image,label[,split]` (or `image,labels` with `|`-separated class names), image paths
relative to the CSV; a built suite's `manifest.csv` has the same layout plus `id` and `sha256`.

The one parser of that layout: `medclip eval build-suite` reads raw suite CSVs through it (registry source
`generic-csv`) and `eval.suites.load_suite` reads manifests and no-code CSVs through it.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from open_clip_medclip.sources.records import Record, SourceError, read_csv, resolve_image

SOURCE = "csv"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_id(text: str) -> str:
    """An id usable as a file name and a WebDataset key (no dots, no slashes)."""
    return _UNSAFE.sub("_", text).strip("_")


@dataclass
class SuiteRow:
    id: str
    image_path: str
    label: str
    split: str | None
    sha256: str | None
    where: str


def read_suite_csv(path: str | Path, error: type[Exception] = SourceError,
                   strict: bool = True) -> tuple[str, list[SuiteRow]]:
    """(label column, rows) of a suite CSV; `error` (naming the file and line) for a bad header, and with `strict`
    for an empty image or label cell (a suite build keeps such rows and rejects them by reason instead)."""
    path = Path(path)
    header, rows = read_csv(path)
    label_column = "labels" if "labels" in header else "label"
    if "image" not in header or label_column not in header:
        rows.close()
        raise error(f"{path}: a suite CSV needs columns 'image' and 'label' (or 'labels'); header has {header}")
    out = []
    for line, row in rows:
        if strict and (not row.get("image") or not row.get(label_column)):
            raise error(f"{path}:{line}: empty image or {label_column}")
        out.append(SuiteRow(id=row.get("id") or safe_id(row["image"].rsplit(".", 1)[0]),
                            image_path=resolve_image(path.parent, row["image"]), label=row[label_column],
                            split=(row.get("split") or "").lower() or None, sha256=row.get("sha256") or None,
                            where=f"{path}:{line}"))
    return label_column, out


def iter_suite_csv(path: str | Path, source: str = SOURCE) -> Iterator[Record]:
    """One Record per row; the class name(s) go to `meta["class"]` (suite CSV labels are class names, not findings)."""
    for row in read_suite_csv(path, strict=False)[1]:
        yield Record(id=row.id, source=source, image_path=row.image_path,
                     meta={"class": row.label, "split": row.split, "where": row.where})
