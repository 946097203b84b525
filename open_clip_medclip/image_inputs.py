"""Image inputs named on a command line or in a Python call: files, folders (recursive) and CSV/TXT lists of paths.

Shared by `medclip predict` and the zero-shot API's `predict`, so both accept the same inputs in the same order.
"""
from __future__ import annotations

import csv
from pathlib import Path

from open_clip_medclip.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"})
LIST_SUFFIXES = frozenset({".csv", ".txt"})
LIST_COLUMNS = ("path", "image", "file", "filename")


def _read_list(path: Path) -> list[Path]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        column = next((header.index(c) for c in LIST_COLUMNS if c in header), None)
        body = rows[1:] if column is not None else rows
        entries = [row[column or 0].strip() for row in body if row and len(row) > (column or 0)]
    else:
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [p if p.is_absolute() else path.parent / p for p in map(Path, filter(None, entries))]


def _folder_images(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES or (not path.suffix and _is_dicom_file(path)):
            found.append(path)
    return found


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Image paths from files, folders (recursive) and CSV/TXT lists, in the order given, without duplicates.
    A path named here that does not exist is a `UserError`; files listed inside a list are checked when decoded."""
    paths: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            paths += _folder_images(path)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            paths += _read_list(path)
        elif path.exists():
            paths.append(path)
        else:
            raise UserError(f"{raw}: no such file or folder")
    seen: set[Path] = set()
    return [p for p in paths if not (p in seen or seen.add(p))]
