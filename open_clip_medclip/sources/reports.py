"""Report readers: CSV, IU/OpenI XML (a folder, one file, or a .tgz/.tar), a folder of MIMIC-style .txt files.

Every reader yields `(report_id, text)` in a deterministic order (natural sort of file names). IU XML reports
become "COMPARISON: ...\\n\\nINDICATION: ...\\n\\nFINDINGS: ...\\n\\nIMPRESSION: ..." so the labeler's section
splitter labels findings + impression and skips the rest.

Text files (CSV/TSV, .txt, .txt archive members) are decoded strictly with `encoding` (default UTF-8; a BOM is
skipped): a byte that is not valid in that encoding is an error naming the file and row/line, never a silent
U+FFFD. XML files are decoded as their XML declaration says. CSV fields may be of any length. An XML file that
is not an IU/OpenI report (no <AbstractText> element) is an error naming the file.
"""
from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

from open_clip_medclip.errors import UserError
from open_clip_medclip.sources.csvio import DEFAULT_ENCODING, check_encoding, decode_text, iter_csv_rows

TAR_SUFFIXES = (".tgz", ".tar.gz", ".tar")


class ReportInputError(UserError, ValueError):
    """Bad report input; the message names the file (and row or member) and the problem."""


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def iter_reports(path: str | Path, text_column: str = "Reports", id_column: str | None = None,
                 header: bool = True, encoding: str = DEFAULT_ENCODING) -> Iterator[tuple[str | None, str]]:
    """Yield (id, report text) from a CSV, IU XML (folder/.xml/.tgz) or a folder of .txt reports.

    CSV: `text_column` holds the report, `id_column` (optional) the id; `header=False` reads a headerless
    single-column file such as the CheXpert labeler's sample_reports.csv. `encoding` applies to CSV and .txt
    input (strict). Raises ReportInputError naming the file (and row or member) for a missing column, bytes
    that are not valid `encoding`, unreadable or non-IU XML, or an input without any report.
    """
    path = Path(path)
    try:
        check_encoding(encoding)
    except LookupError:
        raise ReportInputError(f"--encoding {encoding}: unknown text encoding (e.g. utf-8, latin-1, cp1252)") \
            from None
    if not path.exists():
        raise ReportInputError(f"{path}: input not found")
    if path.is_dir():
        iterator = _iter_folder(path, encoding)
    elif path.name.lower().endswith(TAR_SUFFIXES):
        iterator = _iter_tar(path, encoding)
    elif path.suffix.lower() == ".xml":
        iterator = iter([_iu_record(_read_bytes(path), path, path.stem)])
    elif path.suffix.lower() == ".txt":
        iterator = iter([(path.stem, _read_text(path, encoding))])
    elif path.suffix.lower() in (".csv", ".tsv"):
        iterator = _iter_csv(path, text_column, id_column, header, encoding)
    else:
        raise ReportInputError(f"{path}: unsupported input (expected a .csv, .xml, .txt, .tgz or a folder of "
                               f".xml/.txt reports)")
    count = 0
    for item in iterator:
        count += 1
        yield item
    if count == 0:
        raise ReportInputError(f"{path}: no reports found (empty input)")


def _read_text(path: Path, encoding: str) -> str:
    return decode_text(_read_bytes(path), str(path), encoding, ReportInputError)


def _iter_csv(path: Path, text_column: str, id_column: str | None, header: bool,
              encoding: str) -> Iterator[tuple[str | None, str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        rows = iter_csv_rows(path, encoding, delimiter, ReportInputError)
        if not header:
            for _, _, row in rows:
                if row:
                    yield None, row[0]
            return
        first = next(rows, None)
        if first is None:
            return
        columns = first[2]
        if text_column not in columns:
            hint = " (a headerless file? use header=False / --no-header)" if len(columns) == 1 else ""
            raise ReportInputError(f"{path}: text column {text_column!r} not found; columns are {columns}{hint}")
        if id_column is not None and id_column not in columns:
            raise ReportInputError(f"{path}: id column {id_column!r} not found; columns are {columns}")
        text_index = columns.index(text_column)
        id_index = columns.index(id_column) if id_column is not None else None
        needed = max(text_index, id_index or 0)
        for row_number, line_number, row in rows:
            if not row:
                continue
            if len(row) <= needed:
                raise ReportInputError(f"{path}: row {row_number} (line {line_number}) has {len(row)} fields, fewer "
                                       f"than the header's {len(columns)}")
            yield (row[id_index] if id_index is not None else None), row[text_index]
    except OSError as exc:
        raise ReportInputError(f"{path}: cannot read ({exc})") from exc


def _iter_folder(folder: Path, encoding: str) -> Iterator[tuple[str | None, str]]:
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: _natural_key(p.relative_to(folder)
                                                                                               .as_posix()))
    xml_files = [p for p in files if p.suffix.lower() == ".xml"]
    txt_files = [p for p in files if p.suffix.lower() == ".txt"]
    if xml_files and txt_files:
        raise ReportInputError(f"{folder}: holds both .xml and .txt reports; point at one kind")
    for path in xml_files:
        yield _iu_record(_read_bytes(path), path, path.stem)
    for path in txt_files:
        yield path.stem, _read_text(path, encoding)


def _iter_tar(path: Path, encoding: str) -> Iterator[tuple[str | None, str]]:
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
                    yield stem, decode_text(data, where, encoding, ReportInputError)
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
    if root.find(".//AbstractText") is None:
        raise ReportInputError(f"{where}: not an IU/OpenI report (root <{root.tag}> has no <AbstractText> element); "
                               f"give IU/OpenI XML, a CSV with a report column, or .txt reports")
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
