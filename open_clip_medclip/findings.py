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
