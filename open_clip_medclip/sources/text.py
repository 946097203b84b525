"""Text-only inputs: raw reports (labelled by the builder) and tables already labelled by a CheXpert-compatible
labeler (`Reports` + 14 finding columns, as `medclip label` or the CheXpert labeler write them)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from open_clip_medclip.findings import CHEXPERT_FINDINGS
from open_clip_medclip.sources.records import Record, SourceItem, labels_from_columns, read_csv, row_reject
from open_clip_medclip.sources.reports import iter_reports

REPORTS_SOURCE = "reports"
LABELLED_SOURCE = "labelled"


def iter_report_texts(path: str | Path, text_column: str = "Reports", id_column: str | None = None,
                      source: str = REPORTS_SOURCE) -> Iterator[SourceItem]:
    """Reports from a CSV, IU/OpenI XML (folder or .tgz) or a folder of .txt files (`sources/reports.py`).

    Records carry no labels; the builder labels each text. Reports without an id get `report<N>` (1-based).
    """
    for number, (report_id, text) in enumerate(iter_reports(path, text_column, id_column), start=1):
        yield Record(id=str(report_id) if report_id else f"report{number}", source=source, report_text=text or "")


def iter_labelled_csv(csv_path: str | Path, text_column: str = "Reports", id_column: str | None = None,
                      source: str = LABELLED_SOURCE) -> Iterator[SourceItem]:
    """One text Record per row, with the row's labels as the text's labels and as its single labelled unit."""
    csv_path = Path(csv_path)
    _, rows = read_csv(csv_path, required=[text_column, *CHEXPERT_FINDINGS, *([id_column] if id_column else [])])
    columns = {name: name for name in CHEXPERT_FINDINGS}
    for number, (line, row) in enumerate(rows, start=1):
        where = f"{csv_path}:{line}"
        record_id = row.get(id_column, "") if id_column else f"row{number}"
        if not record_id or "__short__" in row:
            yield row_reject(source, record_id or None, "missing_columns", "empty id or short row", where)
            continue
        try:
            labels = labels_from_columns(row, columns, where)
        except ValueError as exc:
            yield row_reject(source, record_id, "bad_label", str(exc), where)
            continue
        text = row.get(text_column, "")
        yield Record(id=record_id, source=source, labels=labels, report_text=text, sentences=[(text, labels)],
                     meta={"row": line})
