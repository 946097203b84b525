"""The fast path's per-sentence labelling and its bounded cache give the same labels as whole-report matching."""
from __future__ import annotations

import shutil

import pytest

from open_clip_medclip.findings import FINDING_INDEX
from open_clip_medclip.knowledge import Labeler, iter_reports
from open_clip_medclip.knowledge.rules import DEFAULT_RULES_DIR
from open_clip_medclip.knowledge.text import may_cross_sentences

# Sentence boundaries of every kind: punctuation, paragraph breaks, headers (with a skipped section between two
# labelled ones), list markers, abbreviations, a period before a quote or a parenthesis, a colon without space.
TRICKY = [
    "FINDINGS: Mild cardiomegaly. No pneumothorax.\n\nIMPRESSION: Small left effusion.",
    "FINDINGS: No effusion. COMPARISON: chest x-ray, no pneumothorax. IMPRESSION:Mild edema vs. atelectasis.",
    "FINDINGS:\n1. Heart size is enlarged.\n2) No focal consolidation.\n- Possible pneumonia.\n* Lungs clear.",
    "The heart is normal. (Dr. Smith was notified.) \"No pneumothorax.\" Atelectasis versus scarring!",
    "IMPRESSION: 1. No acute disease. 2. Stable cardiomegaly? 3. Left PICC line in place.",
    "HISTORY: cough.\n\nThe lungs are clear. No effusion, no edema. e.g. no pneumonia. Heart size normal.",
    "No findings to suggest pneumonia. Cardiomediastinal silhouette is within normal limits.",
    "No acute disease. No acute disease. No acute disease.",
]


@pytest.fixture(scope="module")
def reports(sample_dir) -> list[str]:
    iu = [text for _, text in iter_reports(sample_dir / "iu_reports" / "NLMCXR_reports.tgz")]
    return TRICKY + iu[:300]


def whole_report_labels(labeler: Labeler, text: str):
    """`label_report` through whole-report matching (the path for rules whose phrases may cross sentences)."""
    per_sentence = labeler._per_sentence
    labeler._per_sentence = False
    try:
        return labeler.label_report(text)
    finally:
        labeler._per_sentence = per_sentence


def test_bundled_rules_are_matched_per_sentence(labeler):
    assert labeler._per_sentence
    assert not may_cross_sentences("vs.") and not may_cross_sentences("r/o")
    assert may_cross_sentences("clear. heart") and may_cross_sentences("findings: no") and may_cross_sentences(" x")


def test_cached_equals_uncached_and_whole_report(reports):
    cached, uncached = Labeler(), Labeler()
    uncached.sentence_cache_size = 0
    for _ in range(2):  # the second pass reads every sentence from the cache
        for text in reports:
            result = cached.label_report(text)
            assert result == uncached.label_report(text) == whole_report_labels(uncached, text), text
    assert not uncached._sentence_cache and cached._sentence_cache


def test_cache_is_bounded_and_results_are_unshared(reports):
    small, reference = Labeler(), Labeler()
    small.sentence_cache_size = 5
    for text in reports:
        assert small.label_report(text) == reference.label_report(text), text
        assert len(small._sentence_cache) <= 5
    first = small.label_report("No acute disease.")
    first.labels[0] = first.sentences[0].labels[0] = "changed"  # callers own their lists
    assert small.label_report("No acute disease.") == reference.label_report("No acute disease.")


def test_rules_that_cross_sentences_use_whole_report_matching(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules)
    with (rules / "mentions_cardiomegaly.txt").open("a", encoding="utf-8") as handle:
        handle.write("\nclear. heart\n")
    labeler = Labeler(rules_dir=rules)
    assert not labeler._per_sentence
    labels = labeler.label_report("FINDINGS: Lungs are clear. Heart is normal.").labels
    assert labels[FINDING_INDEX["Cardiomegaly"]] == 1.0  # the phrase spans both sentences, as whole-report matching finds it
