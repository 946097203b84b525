"""COVID-19 Radiography Database (Kaggle): `<root>/{COVID,Normal,Lung_Opacity,Viral Pneumonia}/images/*.png`.

Mapping (no CheXpert column for COVID-19 itself): COVID → Pneumonia = 1 (COVID-19 pneumonia; MedCLIP's COVID
prompts describe it as ground-glass opacity / consolidation, but RT-PCR positives need not show either, so
neither is set); Viral Pneumonia → Pneumonia = 1; Lung_Opacity (the set's "non-COVID lung infection") →
Lung Opacity = 1; all three set No Finding = 0 and leave the rest blank. Normal → No Finding = 1 and every other
finding 0. The class name is kept in `meta["class"]` for COVID-vs-Normal tasks.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from open_clip_medclip.findings import NUM_FINDINGS
from open_clip_medclip.labels import NEGATIVE, POSITIVE, values_from_names
from open_clip_medclip.sources.class_folders import iter_class_folders
from open_clip_medclip.sources.records import SourceItem

SOURCE = "covid"


def _abnormal(*findings: str) -> list[float | None]:
    labels = values_from_names(findings)
    labels[0] = NEGATIVE  # No Finding
    return labels


def _normal() -> list[float | None]:
    labels = [NEGATIVE] * NUM_FINDINGS
    labels[0] = POSITIVE
    return labels


COVID_CLASS_LABELS: dict[str, list[float | None]] = {
    "COVID": _abnormal("Pneumonia"),
    "Viral Pneumonia": _abnormal("Pneumonia"),
    "Lung_Opacity": _abnormal("Lung Opacity"),
    "Normal": _normal(),
}


def iter_covid(root: str | Path, source: str = SOURCE) -> Iterator[SourceItem]:
    """One Record per image of the four class folders (images in `<class>/images`, or directly in `<class>`)."""

    def image_dir(folder: Path) -> Path:
        return folder / "images" if (folder / "images").is_dir() else folder

    yield from iter_class_folders(root, COVID_CLASS_LABELS, source, image_dir=image_dir)
