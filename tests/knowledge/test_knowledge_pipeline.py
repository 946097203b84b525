"""The spaCy side: registered, config-driven components; fast path == component path; rules as data; workers."""
from __future__ import annotations

import shutil

import pytest
import spacy

from open_clip_medclip.knowledge import Labeler, iter_reports, rules_hash
from open_clip_medclip.knowledge.components import PIPELINE
from open_clip_medclip.knowledge.factories import build_pipeline, pipeline_config
from open_clip_medclip.knowledge.rules import DEFAULT_RULES_DIR, RuleFileError, expand_alternatives


@pytest.fixture(scope="module")
def iu_texts(sample_dir):
    return [text for _, text in iter_reports(sample_dir / "iu_reports" / "NLMCXR_reports.tgz")]


def test_components_are_registered_factories_built_from_config():
    # In a fresh process spaCy finds the factories through the `spacy_factories` entry points (the labeler's
    # fast path never imports spaCy, so nothing registers them before spaCy asks).
    config = spacy.util.load_config_from_str(pipeline_config())
    nlp = spacy.util.load_model_from_config(config, auto_fill=True)
    for name in PIPELINE:
        assert spacy.registry.factories.get(name) is not None
    assert nlp.pipe_names == list(PIPELINE)
    assert nlp.config["components"]["medclip_sections"]["label_sections"] == ["findings", "impression"]


def test_doc_carries_spans_and_labels():
    nlp = build_pipeline()
    doc = nlp("FINDINGS: No pneumothorax. Heart size is mildly enlarged. May reflect atelectasis.")
    mentions = {(span.text, span.label_, span._.medclip_value) for span in doc.spans["medclip_mentions"]}
    assert ("pneumothorax", "Pneumothorax", 0.0) in mentions
    assert ("Heart size", "Cardiomegaly", 1.0) in mentions
    assert ("atelectasis", "Atelectasis", -1.0) in mentions
    assert [span.text for span in doc.spans["medclip_negation"]] == ["No"]
    assert [span.text for span in doc.spans["medclip_uncertainty"]] == ["May reflect"]
    assert [sentence.text for sentence in doc.sents][1:] == [
        "No pneumothorax.", "Heart size is mildly enlarged.", "May reflect atelectasis."]
    assert len(doc._.medclip_sentence_labels) == 3 and len(doc._.medclip_labels) == 14


def test_fast_path_equals_component_path_on_every_iu_report(labeler, iu_texts):
    for text in iu_texts:
        assert labeler.label_report(text) == labeler.label_report_with_pipeline(text), text


def test_workers_give_identical_output(labeler, iu_texts):
    texts = iu_texts[:400]
    assert labeler.label_reports(texts, workers=2) == labeler.label_reports(texts, workers=1)


def test_rule_phrase_syntax():
    assert expand_alternatives("pleural effusion(s|)") == ["pleural effusions", "pleural effusion"]
    assert expand_alternatives("(a|b (c|d))x") == ["ax", "b cx", "b dx"]
    with pytest.raises(RuleFileError, match="unclosed"):
        expand_alternatives("(a|b")


def test_rules_are_data_with_a_hash(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules)
    assert rules_hash(rules) == rules_hash(DEFAULT_RULES_DIR) == Labeler().rules_hash
    with (rules / "mentions_pneumothorax.txt").open("a", encoding="utf-8") as handle:
        handle.write("air in the pleural space\n")
    edited = Labeler(rules_dir=rules)
    assert edited.rules_hash != rules_hash(DEFAULT_RULES_DIR)
    assert "Pneumothorax" in _positive(edited, "Air in the pleural space on the left.")
    assert "Pneumothorax" not in _positive(Labeler(), "Air in the pleural space on the left.")


def test_bad_rule_files_are_reported_with_file_and_line(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules)
    with (rules / "negation_pre.txt").open("a", encoding="utf-8") as handle:
        handle.write("nothing of @bogus\n")
    with pytest.raises(RuleFileError, match=r"negation_pre\.txt:\d+: unknown option @bogus"):
        Labeler(rules_dir=rules)
    (rules / "negation_pre.txt").unlink()
    with pytest.raises(RuleFileError, match="negation_pre.txt: trigger file missing"):
        Labeler(rules_dir=rules)


def test_scispacy_switches_fail_clearly_when_not_installed():
    try:
        spacy.load("en_core_sci_sm")
    except OSError:
        with pytest.raises(RuntimeError, match="en_core_sci_sm.*not installed"):
            Labeler(scispacy_model="en_core_sci_sm")
    else:
        pytest.skip("en_core_sci_sm is installed here; the missing-model path cannot be exercised")


def _positive(labeler, text):
    from open_clip_medclip.labels import positive_findings

    return positive_findings(labeler.label_report(text).labels)
