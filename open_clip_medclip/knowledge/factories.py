"""The `medclip_*` spaCy factories and the Doc/Span extensions the components fill.

Imported (with spaCy) only when a spaCy pipeline is built: `build_pipeline` here, or spaCy loading the
`spacy_factories` entry points (setup.cfg names these `make_*`). The labeler's fast path uses the component
classes in `components` without spaCy, so `medclip label` starts without importing spaCy (or, via thinc, torch).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from spacy.language import Language
from spacy.tokens import Doc, Span

from open_clip_medclip.knowledge import components

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


@Language.factory("medclip_sections",
                  default_config={"rules_dir": None, "label_sections": list(components.DEFAULT_LABEL_SECTIONS)})
def make_sections(nlp: Language, name: str, rules_dir: str | None,
                  label_sections: list[str]) -> components.SectionsComponent:
    return components.SectionsComponent(rules_dir, label_sections)


@Language.factory("medclip_sentences", default_config={"rules_dir": None})
def make_sentences(nlp: Language, name: str, rules_dir: str | None) -> components.SentencesComponent:
    return components.SentencesComponent(rules_dir)


@Language.factory("medclip_mentions",
                  default_config={"rules_dir": None, "use_umls_entities": False, "umls_min_score": 0.85})
def make_mentions(nlp: Language, name: str, rules_dir: str | None, use_umls_entities: bool,
                  umls_min_score: float) -> components.MentionsComponent:
    return components.MentionsComponent(rules_dir, use_umls_entities, umls_min_score)


@Language.factory("medclip_negation", default_config={"rules_dir": None})
def make_negation(nlp: Language, name: str, rules_dir: str | None) -> components.NegationComponent:
    return components.NegationComponent(rules_dir)


@Language.factory("medclip_uncertainty", default_config={"rules_dir": None})
def make_uncertainty(nlp: Language, name: str, rules_dir: str | None) -> components.UncertaintyComponent:
    return components.UncertaintyComponent(rules_dir)


@Language.factory("medclip_scope", default_config={"rules_dir": None})
def make_scope(nlp: Language, name: str, rules_dir: str | None) -> components.ScopeComponent:
    return components.ScopeComponent(rules_dir)


@Language.factory("medclip_labels", default_config={})
def make_labels(nlp: Language, name: str) -> components.LabelsComponent:
    return components.LabelsComponent()


def pipeline_config(rules_dir: str | Path | None = None,
                    label_sections: Sequence[str] = components.DEFAULT_LABEL_SECTIONS) -> str:
    """The default pipeline as a spaCy config string (blank English tokenizer + the 7 components)."""
    rules = "null" if rules_dir is None else '"' + str(rules_dir).replace("\\", "\\\\").replace('"', '\\"') + '"'
    sections = "[" + ", ".join(f'"{name}"' for name in label_sections) + "]"
    pipeline = ", ".join(f'"{name}"' for name in components.PIPELINE)
    lines = ["[nlp]", 'lang = "en"', f"pipeline = [{pipeline}]", "", "[components]", ""]
    for name in components.PIPELINE:
        lines.append(f"[components.{name}]")
        lines.append(f'factory = "{name}"')
        if name != "medclip_labels":
            lines.append(f"rules_dir = {rules}")
        if name == "medclip_sections":
            lines.append(f"label_sections = {sections}")
        lines.append("")
    return "\n".join(lines)


def build_pipeline(rules_dir: str | Path | None = None,
                   label_sections: Sequence[str] = components.DEFAULT_LABEL_SECTIONS, scispacy_model: str | None = None,
                   umls_linker: bool = False) -> Language:
    """The labeling pipeline: from `pipeline_config` (blank English), or on top of an installed scispaCy model.

    `scispacy_model` (e.g. "en_core_sci_sm") and `umls_linker` need those packages/models installed; they are
    never downloaded here. Raises a clear error when they are missing.
    """
    import spacy

    if scispacy_model is None and not umls_linker:
        config = spacy.util.load_config_from_str(pipeline_config(rules_dir, label_sections))
        return spacy.util.load_model_from_config(config, auto_fill=True, validate=True)
    model = scispacy_model or "en_core_sci_sm"
    try:
        nlp = spacy.load(model)
    except OSError as exc:
        raise RuntimeError(f"scispaCy model {model!r} is not installed (pip install 'open_clip_medclip[scispacy]', "
                           f"then the model from the scispaCy releases page); the default labeler does not need "
                           f"it") from exc
    if umls_linker:
        try:
            import scispacy.linking  # noqa: F401  (registers the 'scispacy_linker' factory)
        except ImportError as exc:
            raise RuntimeError("scispaCy's UMLS linker needs scispaCy, an optional extra: pip install "
                               "'open_clip_medclip[scispacy]'") from exc
        try:
            nlp.add_pipe("scispacy_linker", config={"resolve_abbreviations": False, "linker_name": "umls"})
        except Exception as exc:  # the linker downloads its index on first use; offline this fails
            raise RuntimeError(f"cannot load scispacy's UMLS linker (its knowledge base must be cached locally): "
                               f"{exc}") from exc
    for name in components.PIPELINE:
        config: dict = {}
        if name != "medclip_labels":
            config["rules_dir"] = None if rules_dir is None else str(rules_dir)
        if name == "medclip_sections":
            config["label_sections"] = list(label_sections)
        if name == "medclip_mentions":
            config["use_umls_entities"] = umls_linker
        nlp.add_pipe(name, config=config)
    return nlp
