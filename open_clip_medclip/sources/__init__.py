"""Image-label and report adapters: one small module per dataset family, each yielding uniform `Record`s
(or a `Reject` with a reason code for a row that cannot be used).

Labels stay coded as the dataset gives them (1 / 0 / -1 / None = blank, `findings.CHEXPERT_FINDINGS` order); the
uncertainty policy (`findings.apply_uncertainty_policy`) is applied once, when shards are written.
"""
from open_clip_medclip.sources.chexpert import iter_chexpert
from open_clip_medclip.sources.class_folders import iter_class_folders
from open_clip_medclip.sources.covid import COVID_CLASS_LABELS, iter_covid
from open_clip_medclip.sources.generic_csv import iter_generic_csv, labels_for_classes, parse_label_columns
from open_clip_medclip.sources.mimic import iter_mimic, mimic_image_relpath
from open_clip_medclip.sources.nih import NIH_TO_CHEXPERT, NIH_UNMAPPED, iter_nih, nih_labels
from open_clip_medclip.sources.pediatric import PEDIATRIC_CLASS_LABELS, iter_pediatric
from open_clip_medclip.sources.records import REJECT_REASONS, Record, Reject, SourceError, SourceItem
from open_clip_medclip.sources.rsna import iter_rsna, rsna_labels
from open_clip_medclip.sources.text import iter_labelled_csv, iter_report_texts

__all__ = [
    "COVID_CLASS_LABELS", "NIH_TO_CHEXPERT", "NIH_UNMAPPED", "PEDIATRIC_CLASS_LABELS", "REJECT_REASONS", "Record",
    "Reject", "SourceError", "SourceItem", "iter_chexpert", "iter_class_folders", "iter_covid", "iter_generic_csv",
    "iter_labelled_csv", "iter_mimic", "iter_nih", "iter_pediatric", "iter_report_texts", "iter_rsna",
    "labels_for_classes", "mimic_image_relpath", "nih_labels", "parse_label_columns", "rsna_labels",
]
