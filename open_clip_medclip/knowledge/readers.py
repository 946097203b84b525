"""Report readers: CSV, IU/OpenI XML (a folder, one file, or a .tgz/.tar), a folder of MIMIC-style .txt files.

Every reader yields `(report_id, text)` in a deterministic order (natural sort of file names). IU XML reports
become "COMPARISON: ...\\n\\nINDICATION: ...\\n\\nFINDINGS: ...\\n\\nIMPRESSION: ..." so the labeler's section
splitter labels findings + impression and skips the rest.
"""
from __future__ import annotations

import csv
import re
import tarfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

TAR_SUFFIXES = (".tgz", ".tar.gz", ".tar")


class ReportInputError(ValueError):
    """Bad report input; the message names the file and the problem."""


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def iter_reports(path: str | Path, text_column: str = "Reports", id_column: str | None = None,
                 header: bool = True) -> Iterator[tuple[str | None, str]]:
    """Yield (id, report text) from a CSV, IU XML (folder/.xml/.tgz) or a folder of .txt reports.

    CSV: `text_column` holds the report, `id_column` (optional) the id; `header=False` reads a headerless
    single-column file such as the CheXpert labeler's sample_reports.csv. Raises ReportInputError naming the
    file for a missing column, unreadable XML, or an input without any report.
    """
    path = Path(path)
    if not path.exists():
        raise ReportInputError(f"{path}: input not found")
    if path.is_dir():
        iterator = _iter_folder(path)
    elif path.name.lower().endswith(TAR_SUFFIXES):
        iterator = _iter_tar(path)
    elif path.suffix.lower() == ".xml":
        iterator = iter([_iu_record(_read_bytes(path), path, path.stem)])
    elif path.suffix.lower() == ".txt":
        iterator = iter([(path.stem, _read_text(path))])
    elif path.suffix.lower() in (".csv", ".tsv"):
        iterator = _iter_csv(path, text_column, id_column, header)
    else:
        raise ReportInputError(f"{path}: unsupported input (expected a .csv, .xml, .txt, .tgz or a folder of "
                               f".xml/.txt reports)")
    count = 0
    for item in iterator:
        count += 1
        yield item
    if count == 0:
        raise ReportInputError(f"{path}: no reports found (empty input)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        raise ReportInputError(f"{path}: cannot read ({exc})") from exc


def _iter_csv(path: Path, text_column: str, id_column: str | None,
              header: bool) -> Iterator[tuple[str | None, str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        if not header:
            for row in reader:
                if row:
                    yield None, row[0]
            return
        columns = next(reader, None)
        if columns is None:
            return
        if text_column not in columns:
            hint = " (a headerless file? use header=False / --no-header)" if len(columns) == 1 else ""
            raise ReportInputError(f"{path}: text column {text_column!r} not found; columns are {columns}{hint}")
        if id_column is not None and id_column not in columns:
            raise ReportInputError(f"{path}: id column {id_column!r} not found; columns are {columns}")
        text_index = columns.index(text_column)
        id_index = columns.index(id_column) if id_column is not None else None
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(text_index, id_index or 0):
                raise ReportInputError(f"{path}:{line_number}: row has {len(row)} fields, fewer than the header's "
                                       f"{len(columns)}")
            yield (row[id_index] if id_index is not None else None), row[text_index]


def _iter_folder(folder: Path) -> Iterator[tuple[str | None, str]]:
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: _natural_key(p.relative_to(folder)
                                                                                               .as_posix()))
    xml_files = [p for p in files if p.suffix.lower() == ".xml"]
    txt_files = [p for p in files if p.suffix.lower() == ".txt"]
    if xml_files and txt_files:
        raise ReportInputError(f"{folder}: holds both .xml and .txt reports; point at one kind")
    for path in xml_files:
        yield _iu_record(_read_bytes(path), path, path.stem)
    for path in txt_files:
        yield path.stem, _read_text(path)


def _iter_tar(path: Path) -> Iterator[tuple[str | None, str]]:
    try:
        with tarfile.open(path) as archive:
            members = sorted((m for m in archive.getmembers() if m.isfile() and m.name.lower().endswith(
                (".xml", ".txt"))), key=lambda m: _natural_key(m.name))
            for member in members:
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                data = handle.read()
                where = f"{path}!{member.name}"
                stem = Path(member.name).stem
                if member.name.lower().endswith(".xml"):
                    yield _iu_record(data, where, stem)
                else:
                    yield stem, data.decode("utf-8-sig", errors="replace")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ReportInputError(f"{path}: cannot read archive ({exc})") from exc


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ReportInputError(f"{path}: cannot read ({exc})") from exc


def _iu_record(data: bytes, where, fallback_id: str) -> tuple[str, str]:
    """(uid, text) of one IU/OpenI XML report; the uid (CXR<n>) falls back to the file name."""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise ReportInputError(f"{where}: unreadable XML ({exc})") from exc
    uid = root.find("uId")
    report_id = uid.get("id") if uid is not None and uid.get("id") else fallback_id
    return report_id, _iu_text(root)


def _iu_text(root: ElementTree.Element) -> str:
    """The report's AbstractText sections as 'LABEL: text' paragraphs (empty sections dropped)."""
    parts = []
    for element in root.iter("AbstractText"):
        text = " ".join("".join(element.itertext()).split())
        if text:
            label = (element.get("Label") or "").strip().upper()
            parts.append(f"{label}: {text}" if label else text)
    return "\n\n".join(parts)
