"""The 14 CheXpert findings, their value coding and label-vector helpers.

Every stage (labeler, shards, streams, loss, eval) shares this order, so a label vector means the same
thing from the report to the loss.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

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

# Value coding of the CheXpert labeler: positive, negative, uncertain; None = not mentioned (blank).
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
BLANK = None
VALID_VALUES = (POSITIVE, NEGATIVE, UNCERTAIN)

# How uncertain (-1) and blank values become training targets.
UNCERTAINTY_POLICIES = ("zeros", "ones", "keep")  # MedCLIP default: "zeros" (-1 -> 0, blank -> 0)

LabelVector = list  # list[float | None] of length NUM_FINDINGS


def empty_labels() -> list[float | None]:
    """A label vector with every finding unmentioned."""
    return [BLANK] * NUM_FINDINGS


def is_blank(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def validate_labels(values: Sequence[float | None], where: str = "labels") -> list[float | None]:
    """Check length and coding; return a clean list (NaN -> None). Raises ValueError naming `where`."""
    if len(values) != NUM_FINDINGS:
        raise ValueError(f"{where}: expected {NUM_FINDINGS} label values, got {len(values)}")
    out: list[float | None] = []
    for name, value in zip(CHEXPERT_FINDINGS, values):
        if is_blank(value):
            out.append(BLANK)
            continue
        value = float(value)
        if value not in VALID_VALUES:
            raise ValueError(f"{where}: {name!r} has value {value!r}; allowed are 1, 0, -1 or blank")
        out.append(value)
    return out


def apply_uncertainty_policy(values: Iterable[float | None], policy: str = "zeros") -> list[float]:
    """Turn coded labels into numeric targets: blank -> 0; -1 -> 0 ("zeros"), 1 ("ones") or -1 ("keep")."""
    if policy not in UNCERTAINTY_POLICIES:
        raise ValueError(f"unknown uncertainty policy {policy!r}; choose one of {UNCERTAINTY_POLICIES}")
    uncertain_to = {"zeros": 0.0, "ones": 1.0, "keep": -1.0}[policy]
    out = []
    for value in values:
        if is_blank(value):
            out.append(0.0)
        elif value == UNCERTAIN:
            out.append(uncertain_to)
        else:
            out.append(float(value))
    return out


def positive_findings(values: Iterable[float | None]) -> list[str]:
    """Names of the findings coded positive."""
    return [name for name, value in zip(CHEXPERT_FINDINGS, values) if value == POSITIVE]


def labels_from_names(names: Iterable[str], value: float = POSITIVE) -> list[float | None]:
    """A vector with the named findings set to `value` and the rest blank."""
    labels = empty_labels()
    for name in names:
        if name not in FINDING_INDEX:
            raise ValueError(f"unknown finding {name!r}; known: {', '.join(CHEXPERT_FINDINGS)}")
        labels[FINDING_INDEX[name]] = value
    return labels
