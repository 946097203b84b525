"""Knowledge extraction: radiology report -> sections -> sentences -> 14 CheXpert labels (1 / 0 / -1 / blank).

A rule-based labeler following the CheXpert labeler's conventions (mention phrases per finding, negation and
uncertainty triggers with scope, aggregation positive > uncertain > negative, No Finding only when nothing but
Support Devices is positive or uncertain), built as named, registered spaCy components (`medclip_sections`,
`medclip_sentences`, `medclip_mentions`, `medclip_negation`, `medclip_uncertainty`, `medclip_scope`,
`medclip_labels`) whose phrase lists are data files in `knowledge/rules/`. `Labeler.label_report` runs the same
compiled matchers without building spaCy Docs, for thousands of reports per second on one core.

    from open_clip_medclip.knowledge import Labeler, iter_reports
    lab = Labeler()
    result = lab.label_report("FINDINGS: No pneumothorax or effusion. IMPRESSION: Mild cardiomegaly.")
    result.labels                  # 14 values in findings.CHEXPERT_FINDINGS order
    [(s.text, s.labels) for s in result.sentences]

Command line: `medclip label INPUT --out labels.csv` (see `knowledge/cli.py`).

Nothing here imports spaCy (nor, through thinc, torch): the fast path uses the component classes directly, and
`Labeler.nlp` builds the spaCy pipeline on first use (`knowledge/factories.py` registers the factories then).
"""
from __future__ import annotations

from open_clip_medclip.lazy import lazy_attributes

_NAMES = {
    "LABELER_NAME": "labeler", "LABELER_VERSION": "labeler", "Labeler": "labeler", "ReportLabels": "labeler",
    "SentenceLabels": "labeler", "iter_reports": ".sources.reports", "DEFAULT_RULES_DIR": "rules", "rules_hash": "rules",
}

__all__ = list(_NAMES)


# The public names, imported on first use (so `medclip label --help` imports none of the labeler).
__getattr__, __dir__ = lazy_attributes(__name__, _NAMES, __all__)
