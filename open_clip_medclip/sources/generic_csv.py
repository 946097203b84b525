"""Any CSV of images (and/or report texts) with labels, for datasets without their own adapter.

Labels come from either label columns (coded 1 / 0 / -1 / blank; `label_columns` maps CSV column → CheXpert
finding, by default every column named like a CheXpert finding) or one class column whose value names a finding
(case-insensitive; "normal" means No Finding; several classes may be joined with "|"). A class row sets its
findings to 1 and No Finding to 0, leaving the rest blank; a "No Finding" / "normal" row sets every other
finding to 0. With a report column and no labels, the builder labels the report text.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from open_clip_medclip.findings import CHEXPERT_FINDINGS, FINDING_INDEX, NUM_FINDINGS
from open_clip_medclip.labels import NEGATIVE, POSITIVE
from open_clip_medclip.sources.records import (
    Record,
    SourceError,
    SourceItem,
    chexpert_columns,
    labels_from_columns,
    read_csv,
    resolve_image,
    row_reject,
)

SOURCE = "csv"
CLASS_ALIASES = {"normal": "No Finding", "no finding": "No Finding", "effusion": "Pleural Effusion"}


def finding_for_class(name: str) -> str:
    """The CheXpert finding a class name means. Raises ValueError for unknown names."""
    lowered = name.strip().lower()
    for finding in CHEXPERT_FINDINGS:
        if finding.lower() == lowered:
            return finding
    if lowered in CLASS_ALIASES:
        return CLASS_ALIASES[lowered]
    raise ValueError(f"class {name!r} names no CheXpert finding (known: {', '.join(CHEXPERT_FINDINGS)}, normal)")


def labels_for_classes(names: Sequence[str]) -> list[float | None]:
    """Coded labels for a row whose classes are `names` (see the module docstring)."""
    findings = {finding_for_class(name) for name in names if name.strip()}
    if not findings:
        raise ValueError("empty class")
    if findings == {"No Finding"}:
        labels: list[float | None] = [NEGATIVE] * NUM_FINDINGS
    else:
        labels = [None] * NUM_FINDINGS
        labels[FINDING_INDEX["No Finding"]] = NEGATIVE
        findings.discard("No Finding")
    for finding in findings:
        labels[FINDING_INDEX[finding]] = POSITIVE
    return labels


def parse_label_columns(spec: Sequence[str]) -> dict[str, str]:
    """['Effusion=Pleural Effusion', 'Edema'] → {'Effusion': 'Pleural Effusion', 'Edema': 'Edema'}."""
    columns = {}
    for item in spec:
        column, _, finding = item.partition("=")
        columns[column.strip()] = finding_for_class(finding or column)
    return columns


def iter_generic_csv(csv_path: str | Path, image_column: str | None = None,
                     label_columns: Mapping[str, str] | None = None, class_column: str | None = None,
                     id_column: str | None = None, report_column: str | None = None,
                     root: str | Path | None = None, source: str = SOURCE) -> Iterator[SourceItem]:
    """Yield a Record per row; image paths are relative to `root` (default: the CSV's folder)."""
    csv_path = Path(csv_path)
    if image_column is None and report_column is None:
        raise SourceError(f"{csv_path}: give an image column, a report column or both")
    if label_columns is not None and class_column is not None:
        raise SourceError(f"{csv_path}: give label columns or a class column, not both")
    required = [c for c in (image_column, class_column, id_column, report_column) if c]
    header, rows = read_csv(csv_path, required=[*required, *(label_columns or {})])
    if label_columns is None and class_column is None:
        label_columns = chexpert_columns(header)
    if not label_columns and class_column is None and report_column is None:
        raise SourceError(f"{csv_path}: no label columns (none named like a CheXpert finding) and no class column")
    root = Path(root) if root is not None else csv_path.parent
    for number, (line, row) in enumerate(rows, start=1):
        where = f"{csv_path}:{line}"
        image = row.get(image_column, "") if image_column else None
        record_id = row.get(id_column, "") if id_column else (image.rsplit(".", 1)[0] if image else f"row{number}")
        if (image_column and not image) or not record_id or "__short__" in row:
            yield row_reject(source, record_id or None, "missing_columns", "empty image/id field or short row", where)
            continue
        try:
            if class_column:
                labels = labels_for_classes(row.get(class_column, "").split("|"))
            elif label_columns:
                labels = labels_from_columns(row, label_columns, where)
            else:
                labels = None
        except ValueError as exc:
            reason = "unknown_class" if class_column else "bad_label"
            yield row_reject(source, record_id, reason, str(exc) if not class_column else f"{where}: {exc}", where)
            continue
        meta = {key: value for key, value in row.items()
                if key not in (image_column, report_column, class_column, *(label_columns or {})) and key != "__short__"}
        if image:
            meta["path"] = image
        yield Record(id=record_id, source=source, image_path=resolve_image(root, image) if image else None,
                     labels=labels, report_text=row.get(report_column) if report_column else None, meta=meta)
