"""Kermany et al. pediatric pneumonia: `<root>/[train|test|val/]{NORMAL,PNEUMONIA}/*.jpeg` as released, or a
`labels.csv` (`image,label,pneumonia_type[,split]`, label normal|pneumonia) as in the bundled sample.

Mapping: normal → No Finding = 1, every other finding 0 (a normal pediatric film was read as showing nothing);
pneumonia → Pneumonia = 1, No Finding = 0, the rest blank. The bacterial / viral type (from the CSV, or from
release file names like `person1_bacteria_1.jpeg`) is kept in `meta["pneumonia_type"]`.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from open_clip_medclip.sources.class_folders import iter_class_folders
from open_clip_medclip.sources.covid import COVID_CLASS_LABELS
from open_clip_medclip.sources.records import Record, SourceItem, read_csv, resolve_image, row_reject

SOURCE = "pediatric"
PEDIATRIC_CLASS_LABELS: dict[str, list[float | None]] = {
    "NORMAL": COVID_CLASS_LABELS["Normal"],
    "PNEUMONIA": COVID_CLASS_LABELS["Viral Pneumonia"],
}
SPLIT_FOLDERS = ("train", "test", "val")


def _type_from_name(name: str) -> str:
    lowered = name.lower()
    return "bacteria" if "bacteria" in lowered else "virus" if "virus" in lowered else "normal"


def _folder_meta(relative: Path, class_name: str) -> dict:
    split = next((part for part in relative.parts[:-1] if part.lower() in SPLIT_FOLDERS), None)
    return {"split": split, "pneumonia_type": _type_from_name(relative.name)}


def iter_pediatric(root: str | Path, labels_csv: str | Path | None = None,
                   source: str = SOURCE) -> Iterator[SourceItem]:
    """Read `labels_csv` (default `<root>/labels.csv` when present), else walk the class folders."""
    root = Path(root)
    csv_path = Path(labels_csv) if labels_csv is not None else root / "labels.csv"
    if labels_csv is None and not csv_path.is_file():
        yield from iter_class_folders(root, PEDIATRIC_CLASS_LABELS, source, meta_for=_folder_meta)
        return
    _, rows = read_csv(csv_path, required=("image", "label"))
    for line, row in rows:
        where = f"{csv_path}:{line}"
        image, label = row.get("image", ""), row.get("label", "").upper()
        record_id = image.rsplit(".", 1)[0] if image else None
        if not image or not label or "__short__" in row:
            yield row_reject(source, record_id, "missing_columns", "empty image or label", where)
            continue
        if label not in PEDIATRIC_CLASS_LABELS:
            yield row_reject(source, record_id, "unknown_class",
                             f"label {row['label']!r} is not normal or pneumonia", where)
            continue
        meta = {"path": image, "class": label, "pneumonia_type": row.get("pneumonia_type") or None,
                "split": row.get("split") or None}
        yield Record(id=record_id, source=source, image_path=resolve_image(root, image),
                     labels=list(PEDIATRIC_CLASS_LABELS[label]), meta=meta)
