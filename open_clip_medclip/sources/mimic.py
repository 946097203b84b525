"""MIMIC-CXR-JPG: a label table (`mimic-cxr-2.0.0-chexpert.csv` or `-negbio.csv`) joined by study to the
metadata table, optionally with the free-text reports.

Label tables have `subject_id,study_id,<14 findings>` (one row per study, labels coded 1 / 0 / -1 / blank);
the metadata has one row per image (`dicom_id,subject_id,study_id,ViewPosition,...`). Images live at
`files/p<first 2 digits of subject>/p<subject>/s<study>/<dicom_id>.jpg` under the root; reports (from
mimic-cxr-reports) at `files/p10/p10000032/s50414267.txt` under the reports folder (the leading `files/` may
be absent). Every image of a study gets the study's labels, as MedCLIP's `process_mimic_cxr` did.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from open_clip_medclip.findings import CHEXPERT_FINDINGS
from open_clip_medclip.sources.records import Record, SourceItem, labels_from_columns, read_csv, row_reject

SOURCE = "mimic"


def mimic_image_relpath(subject_id: str, study_id: str, dicom_id: str) -> str:
    """The image path inside MIMIC-CXR-JPG for one DICOM id."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def _read_report(reports_dir: Path, subject_id: str, study_id: str) -> str | None:
    relative = Path(f"p{subject_id[:2]}") / f"p{subject_id}" / f"s{study_id}.txt"
    for candidate in (reports_dir / "files" / relative, reports_dir / relative):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace")
    return None


def iter_mimic(labels_csv: str | Path, metadata_csv: str | Path, root: str | Path,
               reports_dir: str | Path | None = None, source: str = SOURCE) -> Iterator[SourceItem]:
    """Yield one Record per metadata row (image), labelled with its study's row of `labels_csv`."""
    labels_csv, metadata_csv, root = Path(labels_csv), Path(metadata_csv), Path(root)
    _, label_rows = read_csv(labels_csv, required=("subject_id", "study_id", *CHEXPERT_FINDINGS))
    columns = {name: name for name in CHEXPERT_FINDINGS}
    study_labels: dict[str, list[float | None] | str] = {}
    for line, row in label_rows:
        where = f"{labels_csv}:{line}"
        try:
            study_labels[row["study_id"]] = labels_from_columns(row, columns, where)
        except ValueError as exc:
            study_labels[row["study_id"]] = str(exc)  # reported on each image of the study
    _, meta_rows = read_csv(metadata_csv, required=("dicom_id", "subject_id", "study_id"))
    reports = Path(reports_dir) if reports_dir is not None else None
    for line, row in meta_rows:
        where = f"{metadata_csv}:{line}"
        dicom_id, subject_id, study_id = row.get("dicom_id", ""), row.get("subject_id", ""), row.get("study_id", "")
        if not (dicom_id and subject_id and study_id) or "__short__" in row:
            yield row_reject(source, dicom_id or None, "missing_columns",
                             "row lacks dicom_id, subject_id or study_id", where)
            continue
        labels = study_labels.get(study_id)
        if labels is None:
            yield row_reject(source, dicom_id, "missing_labels", f"study {study_id} has no row in {labels_csv}", where)
            continue
        if isinstance(labels, str):
            yield row_reject(source, dicom_id, "bad_label", labels, where)
            continue
        relative = mimic_image_relpath(subject_id, study_id, dicom_id)
        report = None
        meta = {"path": relative, "subject_id": subject_id, "study_id": study_id,
                "view": row.get("ViewPosition") or None}
        if reports is not None:  # a missing report file becomes "" so paired/text samples reject it as empty
            report = _read_report(reports, subject_id, study_id)
            meta["report_found"] = report is not None
            report = report or ""
        yield Record(id=dicom_id, source=source, image_path=str(root / relative), labels=list(labels),
                     report_text=report, meta=meta)
