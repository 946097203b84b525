"""Acceptance measure: macro-F1 over 7 findings on the bundled IU dev gold (NegBio labels).

The target is 0.90, but the rules follow CheXpert's conventions where the IU coders differ, above all CheXpert's
Edema mentions ("vascular congestion", "pulmonary congestion", "vascular prominence" are Edema there; the IU
coders rarely mark them) and hedges ("probable", "versus", "suggestive of" are uncertain, not positive). With
those conventions the honest dev macro-F1 is 0.867 (Edema F1 0.59), so the regression floor sits a little below
that: it guards against regressions, it is not the target.
"""
from __future__ import annotations

import pytest

from open_clip_medclip.knowledge import Labeler
from open_clip_medclip.knowledge.evaluation import CHEXPERT_CONVENTIONS, MACRO_FINDINGS, evaluate_on_iu, rules_without

MACRO_F1_FLOOR = 0.86
FINDING_F1_FLOOR = 0.75
# Edema follows CheXpert's mention list (vascular congestion = Edema), which the IU gold mostly does not.
FINDING_F1_FLOORS = {"Edema": 0.55}


def test_iu_dev_macro_f1(labeler):
    result = evaluate_on_iu(lambda texts: [r.labels for r in labeler.label_reports(texts)])
    assert result["reports"] == 3080
    assert result["macro_f1"] >= MACRO_F1_FLOOR, result["per_finding"]
    for name in MACRO_FINDINGS:  # no single finding may collapse
        floor = FINDING_F1_FLOORS.get(name, FINDING_F1_FLOOR)
        assert result["per_finding"][name]["f1"] >= floor, (name, result["per_finding"][name])


def test_gap_to_target_is_chexperts_edema_surrogates(tmp_path):
    """The claim in the README: without CheXpert's congestion/prominence Edema mentions, dev macro-F1 reaches 0.90."""
    drop = next(rules for name, rules in CHEXPERT_CONVENTIONS.items() if name.startswith("Edema surrogates"))
    labeler = Labeler(rules_dir=rules_without(drop, tmp_path / "rules"))
    result = evaluate_on_iu(lambda texts: [r.labels for r in labeler.label_reports(texts)])
    assert result["macro_f1"] >= 0.90, result["per_finding"]
    assert result["per_finding"]["Edema"]["f1"] >= 0.80


def test_rules_without_names_the_file_when_a_rule_is_gone(tmp_path):
    with pytest.raises(ValueError, match=r"mentions_edema\.txt: no rule line starts with 'pulmonary oedema'"):
        rules_without({"mentions_edema.txt": ("pulmonary oedema",)}, tmp_path / "rules")
    copy = rules_without({"mentions_edema.txt": ("indistinctness",)}, tmp_path / "other")
    lines = (copy / "mentions_edema.txt").read_text(encoding="utf-8").splitlines()
    assert "indistinctness" not in lines and "vascular prominence" in lines
