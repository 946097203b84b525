"""Acceptance measure: macro-F1 over 7 findings on the bundled IU dev gold (NegBio labels) must be >= 0.90."""
from __future__ import annotations

from open_clip_medclip.knowledge.evaluation import MACRO_FINDINGS, evaluate_on_iu


def test_iu_dev_macro_f1(labeler):
    result = evaluate_on_iu(lambda texts: [r.labels for r in labeler.label_reports(texts)])
    assert result["reports"] == 3080
    assert result["macro_f1"] >= 0.90, result["per_finding"]
    for name in MACRO_FINDINGS:  # no single finding may collapse
        assert result["per_finding"][name]["f1"] >= 0.75, (name, result["per_finding"][name])
