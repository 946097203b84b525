"""RSNA Pneumonia Detection Challenge: `stage_2_train_labels.csv` (`patientId,x,y,width,height,Target`, one row
per box, one row with empty box for negatives) and DICOMs `<root>/<patientId>.dcm`.

Mapping: Target 1 → Pneumonia = 1 and Lung Opacity = 1, because RSNA's positives are by definition boxed lung
opacities judged typical of pneumonia; Target 0 → Pneumonia = 0, Lung Opacity = 0 (other findings blank: a
negative may still be abnormal). With `stage_2_detailed_class_info.csv` (`patientId,class`), class "Normal" also
sets No Finding = 1 and every other finding 0, and "No Lung Opacity / Not Normal" sets No Finding = 0.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from open_clip_medclip.findings import FINDING_INDEX, NUM_FINDINGS
from open_clip_medclip.labels import NEGATIVE, POSITIVE
from open_clip_medclip.sources.records import Record, SourceItem, parse_number, read_csv, row_reject

SOURCE = "rsna"
RSNA_NORMAL_CLASS = "Normal"
RSNA_ABNORMAL_CLASS = "No Lung Opacity / Not Normal"


def rsna_labels(target: float, detailed_class: str | None = None) -> list[float | None]:
    """Coded CheXpert labels for one RSNA patient (see the module docstring for the mapping)."""
    labels: list[float | None] = [None] * NUM_FINDINGS
    value = POSITIVE if target == 1.0 else NEGATIVE
    labels[FINDING_INDEX["Pneumonia"]] = value
    labels[FINDING_INDEX["Lung Opacity"]] = value
    if detailed_class == RSNA_NORMAL_CLASS and value == NEGATIVE:
        labels = [NEGATIVE] * NUM_FINDINGS
        labels[FINDING_INDEX["No Finding"]] = POSITIVE
    elif value == POSITIVE or detailed_class == RSNA_ABNORMAL_CLASS:
        labels[FINDING_INDEX["No Finding"]] = NEGATIVE
    return labels


def iter_rsna(labels_csv: str | Path, root: str | Path, class_info_csv: str | Path | None = None,
              source: str = SOURCE) -> Iterator[SourceItem]:
    """Yield one Record per patient (rows grouped by `patientId`; boxes kept in `meta["boxes"]`)."""
    labels_csv, root = Path(labels_csv), Path(root)
    _, rows = read_csv(labels_csv, required=("patientId", "Target"))
    classes: dict[str, str] = {}
    if class_info_csv is not None:
        _, class_rows = read_csv(class_info_csv, required=("patientId", "class"))
        classes = {row["patientId"]: row["class"] for _, row in class_rows}
    patients: dict[str, dict] = {}
    for line, row in rows:
        where = f"{labels_csv}:{line}"
        patient = row.get("patientId", "")
        if not patient or "__short__" in row:
            yield row_reject(source, patient or None, "missing_columns",
                             "empty patientId or too few fields", where)
            continue
        entry = patients.setdefault(patient, {"where": where, "targets": set(), "boxes": [], "error": None})
        try:
            target = parse_number(row.get("Target", ""))
            if target not in (0.0, 1.0):
                raise ValueError(f"Target {row.get('Target')!r} is not 0 or 1")
            entry["targets"].add(target)
            if target == 1.0:
                entry["boxes"].append([parse_number(row.get(k, "")) for k in ("x", "y", "width", "height")])
        except ValueError as exc:
            entry["error"] = entry["error"] or f"{where}: {exc}"
    for patient, entry in patients.items():
        if entry["error"] or len(entry["targets"]) != 1:
            detail = entry["error"] or f"{entry['where']}: rows disagree on Target ({sorted(entry['targets'])})"
            yield row_reject(source, patient, "bad_label", detail, entry["where"])
            continue
        target = next(iter(entry["targets"]))
        detailed = classes.get(patient)
        meta = {"path": f"{patient}.dcm", "target": int(target), "boxes": entry["boxes"], "class": detailed}
        yield Record(id=patient, source=source, image_path=str(root / f"{patient}.dcm"),
                     labels=rsna_labels(target, detailed), meta=meta)

