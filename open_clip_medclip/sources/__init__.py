"""Image-label and report adapters: one small module per dataset family, each yielding uniform `Record`s
(or a `Reject` with a reason code for a row that cannot be used).

Labels stay coded as the dataset gives them (1 / 0 / -1 / None = blank, `findings.CHEXPERT_FINDINGS` order; the
coding is `labels.py`). Shards store these raw codes; the uncertainty policy is applied once, in the training
stream. CSV reading (fields of any length, strict encoding
that names the row) is `sources/csvio.py`. The names below are imported on first use, so importing one adapter
(or `sources.csvio`) does not import the others.
"""
from __future__ import annotations

from pathlib import Path

from open_clip_medclip.lazy import lazy_attributes

# The bundled sample data (small NIH / Kermany / IU / labeler sets): the one definition of its location.
SAMPLE_DATA_DIR = Path(__file__).resolve().parents[1] / "sample_data"

_NAMES = {
    "iter_chexpert": "chexpert",
    "iter_class_folders": "class_folders",
    "COVID_CLASS_LABELS": "covid", "iter_covid": "covid",
    "iter_generic_csv": "generic_csv", "labels_for_classes": "generic_csv", "parse_label_columns": "generic_csv",
    "iter_mimic": "mimic", "mimic_image_relpath": "mimic",
    "NIH_TO_CHEXPERT": "nih", "NIH_UNMAPPED": "nih", "iter_nih": "nih", "nih_labels": "nih",
    "PEDIATRIC_CLASS_LABELS": "pediatric", "iter_pediatric": "pediatric",
    "REJECT_REASONS": "records", "Record": "records", "Reject": "records", "SourceError": "records",
    "SourceItem": "records",
    "iter_rsna": "rsna", "rsna_labels": "rsna",
    "iter_labelled_csv": "text", "iter_report_texts": "text",
    "SOURCES": "registry", "get_source": "registry",
    "iter_suite_csv": "suite_csv", "read_suite_csv": "suite_csv",
}

__all__ = sorted([*_NAMES, "SAMPLE_DATA_DIR"])


# The public names are imported on first use.
__getattr__, __dir__ = lazy_attributes(__name__, _NAMES, __all__)
