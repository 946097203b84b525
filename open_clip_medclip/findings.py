"""The 14 CheXpert findings: names and order (nothing else).

Every stage (labeler, shards, streams, loss, eval) shares this order, so a label vector means the same
thing from the report to the loss. Values, codes, policies, validation and batch transport: `labels.py`.
"""
from __future__ import annotations

CHEXPERT_FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NUM_FINDINGS = len(CHEXPERT_FINDINGS)
FINDING_INDEX = {name: i for i, name in enumerate(CHEXPERT_FINDINGS)}

# The 5 classes of CheXpert-5x200 / MIMIC-5x200, in MedCLIP's zero-shot order.
CHEXPERT_COMPETITION_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)

# Transitional: value helpers that lived here before `labels.py` owned the coding. Importing them from here
# still works (lazily, so importing this module stays free of numpy) until every caller imports `labels`.
_MOVED = {
    "POSITIVE": "POSITIVE", "NEGATIVE": "NEGATIVE", "UNCERTAIN": "UNCERTAIN", "BLANK": "BLANK",
    "VALID_VALUES": "VALID_VALUES", "UNCERTAINTY_POLICIES": "TRAINING_POLICIES", "empty_labels": "empty_values",
    "validate_labels": "validate_values", "labels_from_names": "values_from_names",
    "positive_findings": "positive_findings",
}


def _apply_uncertainty_policy(values, policy: str = "zeros") -> list[float]:
    from open_clip_medclip import labels

    return [float(x) for x in labels.apply_policy(values, labels.check_policy_name(policy,
                                                                                   labels.TRAINING_POLICIES))]


def __getattr__(name: str):
    if name == "apply_uncertainty_policy":
        return _apply_uncertainty_policy
    if name in _MOVED:
        from open_clip_medclip import labels

        return getattr(labels, _MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
