"""The uniform record every dataset adapter yields, the reject it yields instead, and CSV/label parsing.

Adapters never raise on one bad row: they yield a `Reject` with a reason code, so a shard build can account
for every input (`inputs = written + rejected`). A file that cannot be used at all (missing, no header, a
required column absent) raises `SourceError` naming the file, because then there are no rows to account for.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from open_clip_medclip.errors import UserError
from open_clip_medclip.findings import CHEXPERT_FINDINGS, FINDING_INDEX, NUM_FINDINGS
from open_clip_medclip.labels import parse_value_text, validate_values
from open_clip_medclip.sources.csvio import DEFAULT_ENCODING, iter_csv_rows

# Reason codes written to rejects.jsonl. Adapters use the row-level ones, the shard builder the rest.
REJECT_REASONS: dict[str, str] = {
    "missing_columns": "a required field of the row is empty or the row is short",
    "bad_label": "a label value is NaN, not a number or outside 1 / 0 / -1 / blank",
    "missing_labels": "no label row joins this image",
    "unknown_class": "the class name maps to no CheXpert finding",
    "duplicate_id": "another input already has this source and id",
    "missing_image": "the image file does not exist",
    "zero_byte_image": "the image file is empty",
    "truncated_image": "the image file ends before the image data does",
    "corrupt_image": "the image file cannot be decoded",
    "unreadable_dicom": "the DICOM file cannot be read or has no usable pixel data",
    "empty_report": "the report text is empty",
    "labeler_error": "the report labeler failed on this text",
}


class SourceError(UserError, ValueError):
    """A source file cannot be used at all; the message names the file and the problem."""


@dataclass
class Record:
    """One input of a dataset, in the project's common shape.

    `labels` are coded CheXpert values (1 / 0 / -1 / None = not mentioned) in `CHEXPERT_FINDINGS` order, or
    None when the labels still have to come from the report text. `sentences`, when set, are already-labelled
    text units [(text, labels)] so the builder need not call the labeler.
    """

    id: str
    source: str
    image_path: str | None = None
    labels: list[float | None] | None = None
    report_text: str | None = None
    meta: dict = field(default_factory=dict)
    sentences: list[tuple[str, list[float | None]]] | None = None


@dataclass
class Reject:
    """An input that will not be written, with the reason code (a key of `REJECT_REASONS`) and details."""

    source: str
    id: str | None
    reason: str
    detail: str
    input: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


SourceItem = Record | Reject


def read_csv(path: str | Path, required: Sequence[str] = (),
             encoding: str = DEFAULT_ENCODING) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """Open a CSV, check its header has `required` columns and return (header, iterator of (line, row)).

    Uses the stdlib reader so an empty cell stays '' (blank) and 'nan' stays visible as text, which the
    label parser rejects; pandas would silently merge both into NaN. Fields may be of any length (a long
    report, e.g. `medclip label`'s own output); bytes that are not valid `encoding` raise SourceError naming
    the row. `line` is the row's first line in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    reader = iter_csv_rows(path, encoding, error=SourceError)
    try:
        header = [name.strip() for name in next(reader)[2]]
    except StopIteration:
        raise SourceError(f"{path}: empty file, expected a CSV header") from None
    except BaseException:
        reader.close()
        raise
    missing = [name for name in required if name not in header]
    if missing:
        reader.close()
        raise SourceError(f"{path}: missing column(s) {', '.join(repr(m) for m in missing)}; "
                          f"header has {', '.join(header)}")

    def rows() -> Iterator[tuple[int, dict]]:
        with contextlib.closing(reader):
            for _, line, values in reader:
                if not values or all(not v.strip() for v in values):
                    continue
                row = dict(zip(header, (v.strip() for v in values), strict=False))
                if len(values) < len(header):
                    row["__short__"] = "1"
                yield line, row

    return header, rows()


def read_csv_header(path: str | Path) -> list[str]:
    """Only the header of a CSV, to tell formats apart."""
    header, rows = read_csv(path)
    rows.close()
    return header


def parse_number(text: str | float | None) -> float | None:
    """One numeric cell that is not a label (an RSNA box coordinate or Target): '' -> None; ValueError for text
    that is not a number and for NaN."""
    cell = "" if text is None else str(text).strip()
    try:
        value = float(cell) if cell else None
    except ValueError:
        raise ValueError(f"{cell!r} is not a number") from None
    if value is not None and math.isnan(value):
        raise ValueError("NaN is not a number here")
    return value


def labels_from_columns(row: Mapping[str, str], columns: Mapping[str, str], where: str) -> list[float | None]:
    """Build a 14-vector from `columns` = {csv column: CheXpert finding}; findings not named stay blank.

    Raises `labels.LabelError` (a ValueError; message starts with `where`) for NaN, non-numeric or
    out-of-range values.
    """
    labels: list[float | None] = [None] * NUM_FINDINGS
    for column, finding in columns.items():
        value = parse_value_text(row.get(column, ""), f"{where}: column {column!r}")
        if value is not None:
            labels[FINDING_INDEX[finding]] = value
    return validate_values(labels, where=where)


def chexpert_columns(header: Sequence[str]) -> dict[str, str]:
    """The identity column map for tables that use the 14 CheXpert names as headers."""
    return {name: name for name in CHEXPERT_FINDINGS if name in header}


def row_reject(source: str, row_id: str | None, reason: str, detail: str, where: str) -> Reject:
    """A Reject whose `input` names the file and line, e.g. 'train.csv:17'."""
    return Reject(source=source, id=row_id, reason=reason, detail=detail, input=where)


def resolve_image(root: Path, relative: str) -> str:
    """Join an image path from a table onto its root (absolute paths in the table are kept)."""
    path = Path(relative)
    return str(path if path.is_absolute() else root / path)
