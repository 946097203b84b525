"""The labeler as named, registered, config-driven spaCy components.

Pipeline (each a `@Language.factory` in `knowledge/factories.py`, each reading its own rule files from
`rules_dir`):

    medclip_sections     sections.json            -> Doc._.medclip_sections, Doc._.medclip_labelled_sections
    medclip_sentences    abbreviations.txt        -> Doc._.medclip_sentences (char spans), token.is_sent_start
    medclip_mentions     mentions_*.txt, ignore.txt, cues_*.txt   -> Doc.spans["medclip_mentions"]
    medclip_negation     negation_{pre,post,pseudo}.txt           -> Doc.spans["medclip_negation"]
    medclip_uncertainty  uncertainty_{pre,post}.txt               -> Doc.spans["medclip_uncertainty"]
    medclip_scope        terminators.txt, scope.json -> Doc._.medclip_assertions, Span._.medclip_value
    medclip_labels       (CheXpert aggregation)   -> Doc._.medclip_sentence_labels, Doc._.medclip_labels

Each phrase component compiles its files into one trie regex (`matching.TermMatcher`) over character offsets,
so the components run on a blank tokenizer-only `Language`; `Labeler` calls the same compiled matchers and the
same scope functions directly (its fast path) without building Docs. With `scispacy_model` / `umls_linker`
the pipeline starts from a scispaCy model and `medclip_mentions` also reads linked UMLS entities.

This module does not import spaCy: the component classes work on plain strings (the fast path) and on Docs
(their `__call__`); spaCy is imported by `knowledge/factories.py` (which also builds the pipeline).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from open_clip_medclip.findings import CHEXPERT_FINDINGS
from open_clip_medclip.knowledge.matching import (
    CUE,
    IGNORE,
    MENTION,
    NEG_POST,
    NEG_PRE,
    PSEUDO,
    TERMINATOR,
    UNC_POST,
    UNC_PRE,
    Assertion,
    Entry,
    ScopeSettings,
    Term,
    TermMatcher,
    aggregate_report,
    build_table,
    matching_text,
    merge_terms,
    resolve_sentence,
    sentence_vector,
)
from open_clip_medclip.knowledge.rules import (
    OTHER_ABNORMALITY_INDEX,
    SLUG_TO_INDEX,
    load_mention_rules,
    load_plain_list,
    load_trigger_rules,
    parse_phrase_file,
    read_json_rules,
    resolve_rules_dir,
)
from open_clip_medclip.knowledge.text import Section, SectionSplitter, SentenceSplitter

if TYPE_CHECKING:  # spaCy is imported only when a pipeline is built (`factories.build_pipeline`), never by the fast path
    from spacy.tokens import Doc, Span

PIPELINE = ("medclip_sections", "medclip_sentences", "medclip_mentions", "medclip_negation", "medclip_uncertainty",
            "medclip_scope", "medclip_labels")
DEFAULT_LABEL_SECTIONS = ("findings", "impression")
OTHER_ABNORMALITY_LABEL = "Other Abnormality"


def finding_label(index: int) -> str:
    return OTHER_ABNORMALITY_LABEL if index == OTHER_ABNORMALITY_INDEX else CHEXPERT_FINDINGS[index]


def _ensure_doc_state(doc: Doc) -> None:
    """Defaults for a Doc that skipped earlier components: the whole text is one section, no sentences yet."""
    if doc._.medclip_match_text is None:
        doc._.medclip_match_text = matching_text(doc.text)
    if doc._.medclip_labelled_sections is None:
        doc._.medclip_labelled_sections = [Section("preamble", 0, 0, len(doc.text))]
    if doc._.medclip_sentences is None:
        doc._.medclip_sentences = []
    if doc._.medclip_terms is None:
        doc._.medclip_terms = []


def _spans_for_terms(doc: Doc, terms: Iterable[Term], kinds: Sequence[int], label_of) -> list[Span]:
    spans = []
    for term in terms:
        for entry in term.entries:
            if entry.kind in kinds:
                span = doc.char_span(term.start, term.end, label=label_of(entry), alignment_mode="expand")
                if span is not None:
                    spans.append(span)
                break
    return spans


class SectionsComponent:
    """Splits the Doc into header sections and picks those to label."""

    def __init__(self, rules_dir: str | Path | None, label_sections: Sequence[str]):
        config = read_json_rules(resolve_rules_dir(rules_dir) / "sections.json")
        self.splitter = SectionSplitter(config["aliases"], config.get("skip", ()),
                                        label_sections or config.get("label", DEFAULT_LABEL_SECTIONS))

    def __call__(self, doc: Doc) -> Doc:
        sections = self.splitter.split(doc.text)
        doc._.medclip_sections = sections
        doc._.medclip_labelled_sections = self.splitter.select(sections)
        doc._.medclip_match_text = matching_text(doc.text)
        doc._.medclip_terms = []
        return doc


class SentencesComponent:
    """Sentence spans inside the labelled sections; also sets token.is_sent_start for doc.sents."""

    def __init__(self, rules_dir: str | Path | None):
        self.splitter = SentenceSplitter(load_plain_list(rules_dir, "abbreviations.txt"))

    def sentence_spans(self, text: str, sections: Sequence[Section]) -> list[tuple[int, int]]:
        """Sentence (start, end) offsets of the given sections, in text order."""
        if len(sections) == 1:
            return self.splitter.split(text, sections[0].start, sections[0].end)
        return [span for section in sections for span in self.splitter.split(text, section.start, section.end)]

    def __call__(self, doc: Doc) -> Doc:
        _ensure_doc_state(doc)
        doc._.medclip_sentences = self.sentence_spans(doc.text, doc._.medclip_labelled_sections)
        starts = {0}
        for start, end in doc._.medclip_sentences:
            starts.add(start)
            starts.add(end)
        if not doc.has_annotation("DEP"):  # a parsed Doc (scispaCy model) keeps its parser's sentences
            for token in doc:
                token.is_sent_start = token.i == 0 or token.idx in starts
        return doc


class _PhraseComponent:
    """A component owning one compiled phrase table; appends its terms to each labelled section."""

    span_key: str | None = None
    span_kinds: tuple[int, ...] = ()
    matcher: TermMatcher

    def find(self, match_text: str, sentences: Sequence[tuple[int, int]]) -> list[Term]:
        """Terms from the first sentence's start to the last one's end (terms between sentences are dropped
        later, when terms are assigned to sentences)."""
        if not sentences:
            return []
        return self.matcher.find(match_text, sentences[0][0], sentences[-1][1])

    def _label(self, entry: Entry) -> str:
        return {NEG_PRE: "NEG_PRE", NEG_POST: "NEG_POST", UNC_PRE: "UNC_PRE", UNC_POST: "UNC_POST",
                TERMINATOR: "TERMINATOR"}.get(entry.kind, "TERM")

    def __call__(self, doc: Doc) -> Doc:
        _ensure_doc_state(doc)
        found = self.find(doc._.medclip_match_text, doc._.medclip_sentences)
        doc._.medclip_terms.extend(found)
        if self.span_key:
            doc.spans[self.span_key] = _spans_for_terms(doc, found, self.span_kinds, self._label)
        return doc


class MentionsComponent(_PhraseComponent):
    """Mention phrases per finding (+ phrases to ignore, + size cues); optional UMLS-linked entities."""

    span_key = "medclip_mentions"
    span_kinds = (MENTION,)

    def __init__(self, rules_dir: str | Path | None, use_umls_entities: bool = False, umls_min_score: float = 0.85):
        rules = load_mention_rules(rules_dir)
        groups = [(phrases, Entry(MENTION, finding=index)) for index, phrases in rules.mentions.items()]
        groups.append((rules.ignore, Entry(IGNORE)))
        groups.extend((phrases, Entry(CUE, requires=name)) for name, phrases in rules.cues.items())
        self.matcher = TermMatcher(build_table(groups))
        self.use_umls_entities = use_umls_entities
        self.umls_min_score = umls_min_score
        self.cui_to_finding: dict[str, int] = {}
        if use_umls_entities:
            mapping = read_json_rules(resolve_rules_dir(rules_dir) / "umls_cuis.json")
            self.cui_to_finding = {cui: SLUG_TO_INDEX[slug] for cui, slug in mapping.items() if not cui.startswith("_")}

    def _label(self, entry: Entry) -> str:
        return finding_label(entry.finding)

    def entity_terms(self, doc: Doc) -> list[Term]:
        """Mentions from scispaCy entities whose best UMLS concept maps to a finding (umls_cuis.json)."""
        from spacy.tokens import Span

        terms = []
        for ent in doc.ents:
            if not Span.has_extension("kb_ents"):
                continue
            for cui, score in ent._.kb_ents[:1]:
                if score >= self.umls_min_score and cui in self.cui_to_finding:
                    terms.append(Term(ent.start_char, ent.end_char, (Entry(MENTION, finding=self.cui_to_finding[cui]),)))
        return terms

    def __call__(self, doc: Doc) -> Doc:
        if self.use_umls_entities:
            _ensure_doc_state(doc)
            doc._.medclip_terms.extend(self.entity_terms(doc))
        return super().__call__(doc)


class NegationComponent(_PhraseComponent):
    """Negation triggers before/after a finding, and pseudo-triggers that only look like negations."""

    span_key = "medclip_negation"
    span_kinds = (NEG_PRE, NEG_POST)

    def __init__(self, rules_dir: str | Path | None):
        rules = load_trigger_rules(rules_dir, "negation", ("pre", "post", "pseudo"))
        self.matcher = TermMatcher(build_table([(rules["pre"], Entry(NEG_PRE)), (rules["post"], Entry(NEG_POST)),
                                                (rules["pseudo"], Entry(PSEUDO))]))


class UncertaintyComponent(_PhraseComponent):
    """Uncertainty (hedge) triggers before/after a finding."""

    span_key = "medclip_uncertainty"
    span_kinds = (UNC_PRE, UNC_POST)

    def __init__(self, rules_dir: str | Path | None):
        rules = load_trigger_rules(rules_dir, "uncertainty", ("pre", "post"))
        self.matcher = TermMatcher(build_table([(rules["pre"], Entry(UNC_PRE)), (rules["post"], Entry(UNC_POST))]))


def assign_to_sentences(terms: Sequence[Term], spans: Sequence[tuple[int, int]]) -> list[list[Term]]:
    """Split sorted terms by sorted sentence spans; terms outside every sentence are dropped."""
    grouped: list[list[Term]] = [[] for _ in spans]
    index = 0
    for term in terms:
        while index < len(spans) and term.start >= spans[index][1]:
            index += 1
        if index == len(spans):
            break
        if term.start >= spans[index][0]:
            grouped[index].append(term)
    return grouped


class ScopeComponent(_PhraseComponent):
    """Scope terminators + scope settings; resolves every mention to positive / negative / uncertain."""

    span_key = None

    def __init__(self, rules_dir: str | Path | None):
        root = resolve_rules_dir(rules_dir)
        self.matcher = TermMatcher(build_table([(parse_phrase_file(root / "terminators.txt"), Entry(TERMINATOR))]))
        self.settings = ScopeSettings.from_dict(
            {k: v for k, v in read_json_rules(root / "scope.json").items() if not k.startswith("_")},
            where=str(root / "scope.json"))

    def resolve(self, match_text: str, sentences: Sequence[tuple[int, int]],
                terms: list[Term]) -> list[list[Assertion]]:
        """Assertions per sentence from all components' terms (leftmost-longest merged)."""
        grouped = assign_to_sentences(merge_terms(terms), sentences)
        settings = self.settings
        return [resolve_sentence(match_text, start, end, sentence_terms, settings) if sentence_terms else []
                for (start, end), sentence_terms in zip(sentences, grouped)]

    def __call__(self, doc: Doc) -> Doc:
        super().__call__(doc)  # adds the terminators
        doc._.medclip_assertions = self.resolve(doc._.medclip_match_text, doc._.medclip_sentences,
                                                doc._.medclip_terms)
        values = {(a.start, a.end, a.finding): a.value for sentence in doc._.medclip_assertions for a in sentence}
        if "medclip_mentions" in doc.spans:
            for span in doc.spans["medclip_mentions"]:
                for (start, end, finding), value in values.items():
                    if start >= span.start_char and end <= span.end_char and finding_label(finding) == span.label_:
                        span._.medclip_value = value
        return doc


class LabelsComponent:
    """CheXpert aggregation: sentence vectors, then the report vector (positive > uncertain > negative)."""

    def __call__(self, doc: Doc) -> Doc:
        sentence_labels = []
        for (start, end), assertions in zip(doc._.medclip_sentences or [], doc._.medclip_assertions or []):
            labels, other = sentence_vector(assertions)
            sentence_labels.append((doc.text[start:end], labels, other))
        doc._.medclip_sentence_labels = sentence_labels
        doc._.medclip_labels = aggregate_report([(labels, other) for _, labels, other in sentence_labels])
        return doc
