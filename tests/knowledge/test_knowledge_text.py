"""Section and sentence splitting on IU, MIMIC and CheXpert style reports."""
from __future__ import annotations

from open_clip_medclip.knowledge.text import normalize_report


def sections_of(labeler, text):
    splitter = labeler.nlp.get_pipe("medclip_sections").splitter
    normalized = normalize_report(text)
    return [(s.kind, normalized[s.start:s.end].strip()) for s in splitter.split(normalized)], splitter, normalized


def sentences_of(labeler, text):
    splitter = labeler.nlp.get_pipe("medclip_sentences").splitter
    normalized = normalize_report(text)
    return [normalized[start:end] for start, end in splitter.split(normalized)]


def test_iu_sections(labeler):
    text = ("COMPARISON: None.\n\nINDICATION: Positive TB test\n\nFINDINGS: The heart is normal. No effusion."
            "\n\nIMPRESSION: Normal chest x-XXXX.")
    sections, splitter, normalized = sections_of(labeler, text)
    assert sections == [("comparison", "None."), ("indication", "Positive TB test"),
                        ("findings", "The heart is normal. No effusion."), ("impression", "Normal chest x-XXXX.")]
    assert [s.kind for s in splitter.select(splitter.split(normalized))] == ["findings", "impression"]


def test_mimic_sections_with_wrapped_lines(labeler):
    text = ("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n"
            " INDICATION:  ___F with new onset ascites  // eval for infection\n \n TECHNIQUE:  Chest PA and lateral\n"
            " \n COMPARISON:  None.\n \n FINDINGS: \n \n There is no focal consolidation, pleural effusion or\n"
            " pneumothorax.  Bilateral nodular opacities that most likely represent nipple\n shadows.\n \n"
            " IMPRESSION: \n \n No acute cardiopulmonary process.\n")
    sections, splitter, normalized = sections_of(labeler, text)
    kinds = [kind for kind, _ in sections]
    assert kinds == ["preamble", "technique", "indication", "technique", "comparison", "findings", "impression"]
    findings = dict(sections)["findings"]
    assert findings.startswith("There is no focal consolidation, pleural effusion or pneumothorax.")
    assert "\n" not in findings  # wrapped lines joined


def test_chexpert_style_headers_and_fallback(labeler):
    sections, splitter, normalized = sections_of(labeler, "NARRATIVE: Two views.\n\nSUMMARY: Mild cardiomegaly.")
    assert [kind for kind, _ in sections] == ["findings", "impression"]
    # without any findings/impression header, all but the skipped kinds are labelled
    sections, splitter, normalized = sections_of(labeler, "HISTORY: cough.\n\nThe lungs are clear.")
    chosen = splitter.select(splitter.split(normalized))
    assert [normalized[s.start:s.end].strip() for s in chosen] == ["The lungs are clear."]
    # no header at all: the whole text is one section
    sections, _, _ = sections_of(labeler, "Heart size normal. Lungs clear.")
    assert sections == [("preamble", "Heart size normal. Lungs clear.")]


def test_header_words_inside_sentences_are_not_headers(labeler):
    sections, _, _ = sections_of(labeler, "FINDINGS: No change in findings since the prior exam: lungs clear.")
    assert [kind for kind, _ in sections] == ["findings"]


def test_sentence_splitting(labeler):
    assert sentences_of(labeler, "Heart size normal. Lungs clear! Effusion? No.") == [
        "Heart size normal.", "Lungs clear!", "Effusion?", "No."]
    # decimals and abbreviations do not split; list markers are cut off; fragments without letters vanish
    assert sentences_of(labeler, "A 1.5 cm nodule, e.g. a granuloma. Dr. Smith was called.") == [
        "A 1.5 cm nodule, e.g. a granuloma.", "Dr. Smith was called."]
    assert sentences_of(labeler, "1. Left pleural effusion. 2. Cardiomegaly.") == [
        "Left pleural effusion.", "Cardiomegaly."]
    assert sentences_of(labeler, "IMPRESSION:\n1. Small effusion\n2. Atelectasis") == [
        "IMPRESSION:", "Small effusion", "Atelectasis"]
    assert sentences_of(labeler, "No effusion\n\nMild cardiomegaly") == ["No effusion", "Mild cardiomegaly"]
    assert sentences_of(labeler, "   ") == []
    assert sentences_of(labeler, "Stable.\n.\n2.") == ["Stable."]


def test_normalize_report():
    assert normalize_report("a\r\nb  c\n\n\n d\n1. e") == "a b c\n\nd\n\n1. e"
    assert normalize_report("   \n ") == ""
