"""Labels of single reports: the CheXpert samples, negation and uncertainty with scope, No Finding, sentences."""
from __future__ import annotations

import csv

import pytest

from open_clip_medclip.findings import CHEXPERT_FINDINGS, NUM_FINDINGS
from open_clip_medclip.knowledge import ReportLabels, SentenceLabels

SAMPLES = "open_clip_medclip/sample_data/chexpert_labeler"


def test_chexpert_labeler_samples_reproduced_exactly(labeler, sample_dir):
    with (sample_dir / "chexpert_labeler" / "sample_reports.csv").open(newline="") as handle:
        reports = [row[0] for row in csv.reader(handle) if row]
    with (sample_dir / "chexpert_labeler" / "labeled_reports.csv").open(newline="") as handle:
        expected = list(csv.DictReader(handle))
    assert len(reports) == len(expected) == 4
    for report, row in zip(reports, expected):
        assert row["Reports"] == report
        want = [float(row[name]) if row[name] else None for name in CHEXPERT_FINDINGS]
        assert labeler.label_report(report).labels == want, report


def test_result_types_and_sentences(labeler):
    result = labeler.label_report("FINDINGS: Mild cardiomegaly. No pneumothorax.\n\nIMPRESSION: Small left effusion.")
    assert isinstance(result, ReportLabels)
    assert len(result.labels) == NUM_FINDINGS
    assert all(isinstance(s, SentenceLabels) and len(s.labels) == NUM_FINDINGS for s in result.sentences)
    assert [s.text for s in result.sentences] == ["Mild cardiomegaly.", "No pneumothorax.", "Small left effusion."]
    by_name = dict(zip(CHEXPERT_FINDINGS, result.labels))
    assert by_name["Cardiomegaly"] == 1.0 and by_name["Pneumothorax"] == 0.0 and by_name["Pleural Effusion"] == 1.0
    assert result.sentences[1].labels[CHEXPERT_FINDINGS.index("No Finding")] == 1.0  # "No pneumothorax." alone


@pytest.mark.parametrize("text", [
    "No pneumothorax, pleural effusion or focal consolidation.",
    "There is no evidence of pneumothorax, pleural effusion, or focal airspace consolidation.",
    "Negative for pneumothorax, pleural effusion and consolidation.",
    "Without pneumothorax, pleural effusion or consolidation.",
])
def test_negation_reaches_every_item_of_a_list(label, text):
    assert label(text) == {"No Finding": 1.0, "Pneumothorax": 0.0, "Pleural Effusion": 0.0, "Consolidation": 0.0}


def test_negation_scope_stops_at_terminators_and_sentences(label):
    assert label("No pneumothorax, but there is a small left pleural effusion.")["Pleural Effusion"] == 1.0
    assert label("No pneumothorax. Small left pleural effusion.")["Pleural Effusion"] == 1.0
    assert label("No focal consolidation, there is mild atelectasis.")["Atelectasis"] == 1.0
    assert label("Cardiomegaly without overt edema.") == {"Cardiomegaly": 1.0, "Edema": 0.0}


def test_post_negations(label):
    assert label("Pneumothorax is not seen.")["Pneumothorax"] == 0.0
    assert label("Heart size normal.")["Cardiomegaly"] == 0.0
    assert label("The heart size and mediastinal contours are within normal limits.")["Cardiomegaly"] == 0.0
    # a post-posed negation does not reach back across a comma to another finding
    assert label("Mild cardiomegaly, pulmonary vascularity within normal limits.")["Cardiomegaly"] == 1.0


@pytest.mark.parametrize("text, finding", [
    ("Minimal patchy airspace disease, may reflect atelectasis.", "Atelectasis"),
    ("Possible small left pleural effusion.", "Pleural Effusion"),
    ("Pneumonia cannot be excluded.", "Pneumonia"),
    ("Cannot exclude pneumothorax.", "Pneumothorax"),
    ("Atelectasis versus pneumonia in the left base.", "Pneumonia"),
    ("Atelectasis versus pneumonia in the left base.", "Atelectasis"),
    ("Findings suspicious for pneumonia.", "Pneumonia"),
    ("Heart size is upper limits of normal.", "Cardiomegaly"),
])
def test_uncertainty(label, text, finding):
    assert label(text)[finding] == -1.0


def test_hedges_are_scoped(label):
    labels = label("Left basilar opacity which may represent atelectasis.")
    assert labels["Lung Opacity"] == 1.0 and labels["Atelectasis"] == -1.0
    labels = label("No pneumothorax, possible small effusion.")
    assert labels["Pneumothorax"] == 0.0 and labels["Pleural Effusion"] == -1.0


def test_negated_hedge_is_a_negation(label):
    assert label("No findings to suggest pneumonia.")["Pneumonia"] == 0.0
    assert label("No focal airspace disease to suggest pneumonia.") == {
        "No Finding": 1.0, "Lung Opacity": 0.0, "Pneumonia": 0.0}


def test_pseudo_negations_do_not_negate(label):
    assert label("No change in the small left pleural effusion.")["Pleural Effusion"] == 1.0
    assert label("No significant change in cardiomegaly.")["Cardiomegaly"] == 1.0
    assert label("Redemonstration without significant interval change of mild atelectasis.")["Atelectasis"] == 1.0


def test_hedge_reaches_the_members_of_a_coordination(label):
    # "may represent A versus B or C": C is in the hedge's scope although beyond its word window
    labels = label("Findings are nonspecific, but may represent subsegmental atelectasis versus mild "
                   "interstitial edema or an atypical infectious process.")
    assert labels["Atelectasis"] == labels["Edema"] == labels["Pneumonia"] == -1.0
    assert label("Normal heart size and mediastinal contours.")["Enlarged Cardiomediastinum"] == 0.0
    # a bare comma does not link two statements
    assert label("Heart size within normal limits, stable mediastinal contours, mediastinal surgical clips.")[
        "Support Devices"] == 1.0


def test_anatomy_mentions_need_a_size_cue(label):
    assert "Cardiomegaly" not in label("The heart and lungs have not changed in the interval.")
    assert label("The heart is enlarged.")["Cardiomegaly"] == 1.0
    assert label("The heart is not enlarged.")["Cardiomegaly"] == 0.0
    assert label("Normal heart size.")["Cardiomegaly"] == 0.0
    assert label("The cardiac silhouette is mildly enlarged.")["Cardiomegaly"] == 1.0
    assert label("Widened mediastinum.")["Enlarged Cardiomediastinum"] == 1.0


def test_ignored_look_alikes(label):
    assert "Pleural Effusion" not in label("Small pericardial effusion.")
    assert "Lung Lesion" not in label("Soft tissue mass of the chest wall.")


def test_chexpert_edema_and_pneumothorax_mentions(label):
    # CheXpert's Edema list includes vascular/pulmonary congestion, vascular prominence and indistinctness
    assert label("Mild pulmonary vascular congestion.")["Edema"] == 1.0
    assert label("Cardiomegaly and mild vascular prominence.")["Edema"] == 1.0
    assert label("No vascular congestion.")["Edema"] == 0.0
    # CheXpert matches substrings: a hydropneumothorax is a pneumothorax (and pleural fluid)
    labels = label("Large left hydropneumothorax.")
    assert labels["Pneumothorax"] == labels["Pleural Effusion"] == 1.0
    assert label("Borderline cardiomegaly.")["Cardiomegaly"] == 1.0  # a degree, not a hedge


def test_chf_makes_cardiomegaly_uncertain(label):
    labels = label("Findings consistent with congestive heart failure.")
    assert labels["Edema"] == 1.0 and labels["Cardiomegaly"] == -1.0
    assert label("Cardiomegaly with congestive heart failure.")["Cardiomegaly"] == 1.0  # positive wins


def test_no_finding_rule(label):
    assert label("Lungs are clear. No acute cardiopulmonary abnormality.") == {"No Finding": 1.0}
    assert label("No pneumothorax. Right PICC line in place.") == {
        "No Finding": 1.0, "Pneumothorax": 0.0, "Support Devices": 1.0}  # devices do not count
    assert "No Finding" not in label("Possible small effusion.")  # uncertain blocks it
    assert "No Finding" not in label("Emphysema. No pneumothorax.")  # an abnormality outside the 14 blocks it
    assert label("No emphysema.") == {"No Finding": 1.0}


def test_aggregation_prefers_positive_then_uncertain(label):
    assert label("No effusion on the right. Small left effusion.")["Pleural Effusion"] == 1.0
    assert label("No effusion on the right. Possible small left effusion.")["Pleural Effusion"] == -1.0


def test_empty_and_unlabelled_reports(labeler):
    empty = labeler.label_report("")
    assert empty.labels == [None] * NUM_FINDINGS and empty.sentences == []
    assert labeler.label_report(None).labels == [None] * NUM_FINDINGS
    # only sections that are never labelled: nothing to label
    assert labeler.label_report("INDICATION: rule out pneumonia.").labels == [None] * NUM_FINDINGS


def test_only_findings_and_impression_are_labelled(labeler):
    text = "INDICATION: Pneumonia?\n\nCOMPARISON: None.\n\nFINDINGS: Lungs are clear.\n\nIMPRESSION: Normal chest."
    result = labeler.label_report(text)
    assert [s.text for s in result.sentences] == ["Lungs are clear.", "Normal chest."]
    assert result.labels[CHEXPERT_FINDINGS.index("Pneumonia")] is None
    assert result.labels[CHEXPERT_FINDINGS.index("No Finding")] == 1.0


def test_label_reports_keeps_order(labeler):
    texts = ["Mild cardiomegaly.", "No pneumothorax.", "", "Small effusion."]
    assert [r.labels for r in labeler.label_reports(texts)] == [labeler.label_report(t).labels for t in texts]
