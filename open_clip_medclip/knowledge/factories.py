"""The `medclip_*` spaCy factories and the Doc/Span extensions the components fill.

Imported (with spaCy) only when a spaCy pipeline is built: `components.build_pipeline`, or spaCy loading the
`spacy_factories` entry points (setup.cfg names these `make_*`). The labeler's fast path uses the component
classes in `components` without spaCy, so `medclip label` starts without importing spaCy (or, via thinc, torch).
"""
from __future__ import annotations

from spacy.language import Language
from spacy.tokens import Doc, Span

from open_clip_medclip.knowledge.components import (
    DEFAULT_LABEL_SECTIONS,
    LabelsComponent,
    MentionsComponent,
    NegationComponent,
    ScopeComponent,
    SectionsComponent,
    SentencesComponent,
    UncertaintyComponent,
)

DOC_EXTENSIONS = ("medclip_match_text", "medclip_sections", "medclip_labelled_sections", "medclip_sentences",
                  "medclip_terms", "medclip_assertions", "medclip_sentence_labels", "medclip_labels")


def register_extensions() -> None:
    """Doc/Span attributes the components fill (idempotent)."""
    for name in DOC_EXTENSIONS:
        if not Doc.has_extension(name):
            Doc.set_extension(name, default=None)
    if not Span.has_extension("medclip_value"):
        Span.set_extension("medclip_value", default=None)


register_extensions()


@Language.factory("medclip_sections", default_config={"rules_dir": None, "label_sections": list(DEFAULT_LABEL_SECTIONS)})
def make_sections(nlp: Language, name: str, rules_dir: str | None, label_sections: list[str]) -> SectionsComponent:
    return SectionsComponent(rules_dir, label_sections)


@Language.factory("medclip_sentences", default_config={"rules_dir": None})
def make_sentences(nlp: Language, name: str, rules_dir: str | None) -> SentencesComponent:
    return SentencesComponent(rules_dir)


@Language.factory("medclip_mentions",
                  default_config={"rules_dir": None, "use_umls_entities": False, "umls_min_score": 0.85})
def make_mentions(nlp: Language, name: str, rules_dir: str | None, use_umls_entities: bool,
                  umls_min_score: float) -> MentionsComponent:
    return MentionsComponent(rules_dir, use_umls_entities, umls_min_score)


@Language.factory("medclip_negation", default_config={"rules_dir": None})
def make_negation(nlp: Language, name: str, rules_dir: str | None) -> NegationComponent:
    return NegationComponent(rules_dir)


@Language.factory("medclip_uncertainty", default_config={"rules_dir": None})
def make_uncertainty(nlp: Language, name: str, rules_dir: str | None) -> UncertaintyComponent:
    return UncertaintyComponent(rules_dir)


@Language.factory("medclip_scope", default_config={"rules_dir": None})
def make_scope(nlp: Language, name: str, rules_dir: str | None) -> ScopeComponent:
    return ScopeComponent(rules_dir)


@Language.factory("medclip_labels", default_config={})
def make_labels(nlp: Language, name: str) -> LabelsComponent:
    return LabelsComponent()
