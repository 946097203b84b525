"""CheXpert `train.csv` / `valid.csv`: the labeler output shipped with the dataset, one row per image.

Columns: `Path,Sex,Age,Frontal/Lateral,AP/PA,<14 findings>` (the 14 in CheXpert's own column order, which
differs from ours: Lung Opacity comes before Lung Lesion; columns are matched by name). `Path` starts with the
dataset folder (`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`), so the default image root is
the folder above the CSV's folder.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from open_clip_medclip.findings import CHEXPERT_FINDINGS
from open_clip_medclip.sources.records import (
    Record,
    SourceItem,
    labels_from_columns,
    read_csv,
    resolve_image,
    row_reject,
)

SOURCE = "chexpert"
CHEXPERT_META_COLUMNS = ("Sex", "Age", "Frontal/Lateral", "AP/PA")


def iter_chexpert(csv_path: str | Path, root: str | Path | None = None, source: str = SOURCE) -> Iterator[SourceItem]:
    """Yield a Record per row (coded labels, uncertain -1 and blank kept) or a Reject for a bad row."""
    csv_path = Path(csv_path)
    header, rows = read_csv(csv_path, required=("Path", *CHEXPERT_FINDINGS))
    root = Path(root) if root is not None else csv_path.parent.parent
    columns = {name: name for name in CHEXPERT_FINDINGS}
    for line, row in rows:
        where = f"{csv_path}:{line}"
        relative = row.get("Path", "")
        if not relative or "__short__" in row:
            yield row_reject(source, relative or None, "missing_columns", "row has an empty Path or too few fields",
                             where)
            continue
        parts = PurePosixPath(relative).with_suffix("").parts
        record_id = "/".join(parts[1:] if parts[0].lower().startswith("chexpert") else parts)
        try:
            labels = labels_from_columns(row, columns, where)
        except ValueError as exc:
            yield row_reject(source, record_id, "bad_label", str(exc), where)
            continue
        meta = {"path": relative, "split": parts[1] if len(parts) > 2 else None}
        meta.update({key.lower().replace("/", "_"): row.get(key) or None for key in CHEXPERT_META_COLUMNS})
        yield Record(id=record_id, source=source, image_path=resolve_image(root, relative), labels=labels, meta=meta)
