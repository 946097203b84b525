"""NIH ChestX-ray14: `Data_Entry_2017.csv` (official release) or the bundled sample's `labels.csv`.

NIH → CheXpert mapping (`NIH_TO_CHEXPERT`). The rule: give an NIH finding the CheXpert column that the CheXpert
labeler itself would set for that finding's name in a report, so image labels from NIH and text labels from the
labeler mean the same thing in MedCLIP's label-similarity targets.

- Atelectasis, Cardiomegaly, Consolidation, Edema, Pneumonia, Pneumothorax → the CheXpert column of that name.
- Effusion → Pleural Effusion.
- Mass, Nodule → Lung Lesion (the labeler's Lung Lesion mentions are mass / nodule / lesion).
- Infiltration → Lung Opacity (the labeler lists "infiltrate" under Lung Opacity).
- Pleural_Thickening → Pleural Other (the labeler lists "pleural thickening" under Pleural Other).
- Pneumonia → Pneumonia only, not also Lung Opacity: the labeler does not set Lung Opacity for the word
  "pneumonia", so adding it would make NIH pneumonia images disagree with "pneumonia" sentences.
- No Finding → No Finding.
- No CheXpert column: Emphysema, Fibrosis, Hernia (`NIH_UNMAPPED`). They are kept in `meta["unmapped_findings"]`
  and otherwise ignored; an image whose only finding is one of them gets No Finding = 0, not 1.

Negatives: NIH lists present findings only. A CheXpert column that some NIH finding maps to is 0 when none of its
NIH findings is listed; the three columns NIH never labels (Enlarged Cardiomediastinum, Fracture, Support Devices)
stay blank. With the default uncertainty policy ("zeros") blank becomes 0 as well; with "raw" the difference
between "NIH says absent" and "NIH cannot say" is kept.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from open_clip_medclip.findings import FINDING_INDEX, NUM_FINDINGS
from open_clip_medclip.labels import NEGATIVE, POSITIVE, validate_values
from open_clip_medclip.sources.records import (
    Record,
    SourceItem,
    read_csv,
    read_csv_header,
    resolve_image,
    row_reject,
)

SOURCE = "nih"

NIH_TO_CHEXPERT: dict[str, str] = {
    "No Finding": "No Finding",
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pleural_Thickening": "Pleural Other",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
NIH_UNMAPPED: tuple[str, ...] = ("Emphysema", "Fibrosis", "Hernia")
NIH_FINDINGS: tuple[str, ...] = tuple(sorted({*NIH_TO_CHEXPERT, *NIH_UNMAPPED}))


def nih_labels(nih_findings: Iterable[str]) -> tuple[list[float | None], list[str]]:
    """Map NIH finding names to a coded CheXpert vector; return (labels, unmapped names). Raises ValueError."""
    names = [name.strip() for name in nih_findings if name.strip()]
    unknown = [name for name in names if name not in NIH_TO_CHEXPERT and name not in NIH_UNMAPPED]
    if unknown:
        raise ValueError(f"unknown NIH finding(s) {', '.join(map(repr, unknown))}; known: {', '.join(NIH_FINDINGS)}")
    labels: list[float | None] = [None] * NUM_FINDINGS
    for finding in set(NIH_TO_CHEXPERT.values()):
        labels[FINDING_INDEX[finding]] = NEGATIVE
    for name in names:
        if name in NIH_TO_CHEXPERT:
            labels[FINDING_INDEX[NIH_TO_CHEXPERT[name]]] = POSITIVE
    return validate_values(labels), [name for name in names if name in NIH_UNMAPPED]


def _find_image(root: Path, name: str, index: dict[str, Path]) -> str:
    """Images sit in `root`, `root/images` or the Kaggle layout `root/images_0NN/images`."""
    for candidate in (root / name, root / "images" / name):
        if candidate.exists():
            return str(candidate)
    if not index:
        index.update({path.name: path for path in root.glob("images_*/images/*")})
        index.setdefault("", root)  # mark the index as built even when empty
    return str(index.get(name, root / "images" / name))


def iter_nih(csv_path: str | Path, root: str | Path | None = None, source: str = SOURCE) -> Iterator[SourceItem]:
    """Read either NIH format; the header decides (`Finding Labels` = official, `finding_labels` = bundled)."""
    csv_path = Path(csv_path)
    image_root = Path(root) if root is not None else csv_path.parent
    reader = _iter_bundled if "finding_labels" in read_csv_header(csv_path) else _iter_official
    yield from reader(csv_path, image_root, source)


def _iter_official(csv_path: Path, root: Path, source: str) -> Iterator[SourceItem]:
    _, rows = read_csv(csv_path, required=("Image Index", "Finding Labels"))
    index: dict[str, Path] = {}
    for line, row in rows:
        where = f"{csv_path}:{line}"
        name = row.get("Image Index", "")
        if not name or not row.get("Finding Labels"):
            yield row_reject(source, name or None, "missing_columns", "empty Image Index or Finding Labels", where)
            continue
        record_id = Path(name).stem
        try:
            labels, unmapped = nih_labels(row["Finding Labels"].split("|"))
        except ValueError as exc:
            yield row_reject(source, record_id, "unknown_class", str(exc), where)
            continue
        meta = {"path": name, "finding_labels": row["Finding Labels"], "unmapped_findings": unmapped,
                "patient_id": row.get("Patient ID") or None, "age": row.get("Patient Age") or None,
                "sex": row.get("Patient Gender") or None, "view": row.get("View Position") or None}
        yield Record(id=record_id, source=source, image_path=_find_image(root, name, index), labels=labels, meta=meta)


def _iter_bundled(csv_path: Path, root: Path, source: str) -> Iterator[SourceItem]:
    """The bundled sample: `image,nih_image_index,finding_labels,patient_id,view,age,sex,...,split`."""
    _, rows = read_csv(csv_path, required=("image", "nih_image_index", "finding_labels"))
    for line, row in rows:
        where = f"{csv_path}:{line}"
        image, index_name = row.get("image", ""), row.get("nih_image_index", "")
        if not image or not index_name or not row.get("finding_labels") or "__short__" in row:
            yield row_reject(source, index_name or None, "missing_columns",
                             "empty image, nih_image_index or finding_labels", where)
            continue
        record_id = Path(index_name).stem
        try:
            labels, unmapped = nih_labels(row["finding_labels"].split("|"))
        except ValueError as exc:
            yield row_reject(source, record_id, "unknown_class", str(exc), where)
            continue
        radiologist = {key[len("radiologist_"):]: row[key] for key in row
                       if key.startswith("radiologist_") and row[key]}
        meta = {"path": image, "finding_labels": row["finding_labels"], "unmapped_findings": unmapped,
                "patient_id": row.get("patient_id") or None, "age": row.get("age") or None,
                "sex": row.get("sex") or None, "view": row.get("view") or None, "split": row.get("split") or None}
        if radiologist:
            meta["radiologist_labels"] = radiologist
        yield Record(id=record_id, source=source, image_path=resolve_image(root, image), labels=labels, meta=meta)
