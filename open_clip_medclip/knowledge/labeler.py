"""`Labeler`: report text -> 14 CheXpert labels per sentence and per report.

`label_report` is the fast path: it calls the registered components' compiled matchers and the shared scope and
aggregation functions directly on strings, skipping Doc construction (about 5x faster than the blank-tokenizer
Doc pipeline, with identical labels; `label_report_with_pipeline` runs the spaCy pipeline and is what the tests
compare against). With the scispaCy switches on, only the pipeline path can use the extra entities, so
`label_report` then runs the pipeline.

Reports repeat sentences heavily ("The lungs are clear."), and with the bundled rules a sentence's labels depend
only on its own text (no phrase can match across a sentence boundary, `text.may_cross_sentences`), so the fast
path labels each sentence on its own and keeps the labels of recently seen sentences in a bounded dict.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from open_clip_medclip.knowledge import components
from open_clip_medclip.knowledge.matching import (
    aggregate_report,
    matching_text,
    merge_terms,
    resolve_sentence,
    sentence_vector,
)
from open_clip_medclip.knowledge.rules import resolve_rules_dir, rules_hash
from open_clip_medclip.knowledge.text import may_cross_sentences, normalize_report

LABELER_NAME = "medclip-rules"
LABELER_VERSION = "1.0.0"
# Distinct sentences whose labels a Labeler keeps (~400 bytes each, ~25 MB at most); emptied when full.
SENTENCE_CACHE_SIZE = 1 << 16
T = TypeVar("T")
SentenceVector = tuple[list[float | None], bool]  # a sentence's 14 labels and whether it blocks No Finding


@dataclass
class SentenceLabels:
    """One labelled sentence: its text (whitespace-normalized) and its 14 labels (1 / 0 / -1 / None)."""

    text: str
    labels: list[float | None]
    other_abnormality: bool = False  # asserts an abnormality outside the 14 (so No Finding stays blank)


@dataclass
class ReportLabels:
    """A report's 14 labels (CheXpert aggregation over its sentences) and its labelled sentences."""

    labels: list[float | None]
    sentences: list[SentenceLabels] = field(default_factory=list)


class Labeler:
    """Rule-based CheXpert-style labeler built from the `medclip_*` spaCy components.

    Args:
        rules_dir: folder of rule files (default: the bundled `knowledge/rules/`).
        sections: section kinds to label when a report has them (default findings + impression); reports
            without those headers are labelled whole, minus indication/history/comparison/technique sections.
        scispacy_model: name of an installed scispaCy model (e.g. "en_core_sci_sm") to build the pipeline on.
        umls_linker: add scispaCy's UMLS linker; linked entities listed in rules/umls_cuis.json become mentions.

    `sentence_cache_size` (attribute, default `SENTENCE_CACHE_SIZE`; 0 turns the cache off) bounds the fast
    path's cache of sentence labels, keyed by the sentence's matching text.
    """

    def __init__(self, rules_dir: str | Path | None = None,
                 sections: Sequence[str] = components.DEFAULT_LABEL_SECTIONS, scispacy_model: str | None = None,
                 umls_linker: bool = False):
        self.rules_dir = resolve_rules_dir(rules_dir)
        self.options = {"rules_dir": None if rules_dir is None else str(rules_dir), "sections": list(sections),
                        "scispacy_model": scispacy_model, "umls_linker": umls_linker}
        self._rules_dir_arg = rules_dir
        self._nlp = None
        self.version = LABELER_VERSION
        self.rules_hash = rules_hash(self.rules_dir)
        self._uses_extra_models = bool(scispacy_model or umls_linker)
        if self._uses_extra_models:  # only the spaCy pipeline uses the extra entities: build it now (fail early)
            _ = self.nlp
        # The fast path: the same component classes the pipeline registers, built without spaCy.
        self._sections = components.SectionsComponent(rules_dir, sections).splitter
        self._sentences = components.SentencesComponent(rules_dir)
        self._scope = components.ScopeComponent(rules_dir)
        self._phrase_components = [components.MentionsComponent(rules_dir), components.NegationComponent(rules_dir),
                                   components.UncertaintyComponent(rules_dir), self._scope]
        self._matchers = [component.matcher for component in self._phrase_components]
        # Rules whose phrases cannot match across sentences let each sentence be labelled (and cached) alone.
        self._per_sentence = not any(may_cross_sentences(phrase) for matcher in self._matchers
                                     for phrase in matcher.table)
        self.sentence_cache_size = SENTENCE_CACHE_SIZE
        self._sentence_cache: dict[str, SentenceVector] = {}

    @property
    def nlp(self):
        """The spaCy pipeline (built on first use: importing spaCy also imports torch through thinc)."""
        if self._nlp is None:
            from open_clip_medclip.knowledge.factories import build_pipeline

            self._nlp = build_pipeline(self._rules_dir_arg, self.options["sections"], self.options["scispacy_model"],
                                       self.options["umls_linker"])
        return self._nlp

    @property
    def name(self) -> str:
        return LABELER_NAME

    def provenance(self) -> dict:
        """What produced the labels: labeler name/version, rules hash and options (JSON-ready)."""
        return {"labeler": LABELER_NAME, "version": self.version, "rules_hash": self.rules_hash,
                "rules_dir": str(self.rules_dir), **{k: v for k, v in self.options.items() if k != "rules_dir"}}

    def clear_sentence_cache(self) -> None:
        """Forget cached sentence labels (benchmarks time a cold pass with it)."""
        self._sentence_cache.clear()

    def label_report(self, text: str | None, with_sentences: bool = True) -> ReportLabels:
        """Labels for one report (fast path; same result as `label_report_with_pipeline`).

        `with_sentences=False` leaves `sentences` empty on the fast path (building them is a fifth of its time
        when only the report labels are wanted).
        """
        if self._uses_extra_models:
            return self.label_report_with_pipeline(text)
        normalized = normalize_report(text or "")
        if not normalized:
            return ReportLabels(aggregate_report([]), [])
        spans = self._sentences.sentence_spans(normalized, self._sections.select(self._sections.split(normalized)))
        if not spans:
            return ReportLabels(aggregate_report([]), [])
        match_text = matching_text(normalized)
        if self._per_sentence:
            vectors = self._cached_sentence_vectors(match_text, spans)
        else:
            vectors = self._report_sentence_vectors(match_text, spans)
        sentences = [SentenceLabels(normalized[start:end], labels[:], other)
                     for (start, end), (labels, other) in zip(spans, vectors)] if with_sentences else []
        return ReportLabels(aggregate_report(vectors), sentences)

    def _cached_sentence_vectors(self, match_text: str, spans: Sequence[tuple[int, int]]) -> list[SentenceVector]:
        """Each sentence's vector from the cache, or labelled alone and cached (vectors are shared: read only)."""
        cache = self._sentence_cache
        vectors = []
        for start, end in spans:
            sentence = match_text[start:end]
            vector = cache.get(sentence)
            if vector is None:
                vector = self._label_sentence(sentence)
                if self.sentence_cache_size > 0:
                    if len(cache) >= self.sentence_cache_size:
                        cache.clear()
                    cache[sentence] = vector
            vectors.append(vector)
        return vectors

    def _label_sentence(self, sentence: str) -> SentenceVector:
        """The vector of one sentence's matching text, matched and resolved on that text alone."""
        terms = merge_terms(*(matcher.find(sentence) for matcher in self._matchers))
        return sentence_vector(resolve_sentence(sentence, 0, len(sentence), terms, self._scope.settings)
                               if terms else [])

    def _report_sentence_vectors(self, match_text: str, spans: Sequence[tuple[int, int]]) -> list[SentenceVector]:
        """Sentence vectors from matching the whole report (rules with phrases that may cross sentences)."""
        terms: list = []
        for component in self._phrase_components:
            terms.extend(component.find(match_text, spans))
        return [sentence_vector(assertions) for assertions in self._scope.resolve(match_text, spans, terms)]

    def label_report_with_pipeline(self, text: str | None) -> ReportLabels:
        """Labels for one report by running the spaCy pipeline (Doc, spans and extensions)."""
        normalized = normalize_report(text or "")
        if not normalized:
            return ReportLabels(aggregate_report([]), [])
        doc = self.nlp(normalized)
        sentences = [SentenceLabels(sentence_text, labels, other)
                     for sentence_text, labels, other in doc._.medclip_sentence_labels]
        return ReportLabels(doc._.medclip_labels, sentences)

    def label_reports(self, texts: Iterable[str | None], workers: int = 1) -> list[ReportLabels]:
        """Labels for many reports, in input order; `workers > 1` labels in that many processes."""
        return list(self.imap(texts, workers=workers))

    def imap(self, texts: Iterable[str | None], workers: int = 1, chunk_size: int = 256) -> Iterator[ReportLabels]:
        """Lazily label reports in input order (streams; bounded memory with workers)."""
        for labelled in self.map_chunks(_label_texts, chunked(texts, chunk_size), workers=workers):
            yield from labelled

    def map_chunks(self, function: Callable[[Labeler, list], T], chunks: Iterable[list], workers: int = 1,
                   in_flight_per_worker: int = 4) -> Iterator[T]:
        """`function(labeler, chunk)` for every chunk, results in input order.

        `workers > 1` runs chunks in that many processes (`function` must be a module-level function); at most
        `in_flight_per_worker` chunks per worker are queued, so memory stays bounded on any input. Workers die
        with this process (Linux: the kernel kills them when it dies, even by SIGKILL) and are terminated when
        the iteration stops early (an error, Ctrl-C, SIGTERM turned into an exception, the generator closed).
        Returning compact results (e.g. CSV text) rather than objects keeps the parent from being the
        bottleneck.
        """
        if workers <= 1:
            for chunk in chunks:
                yield function(self, chunk)
            return
        global _WORKER_LABELER
        context = _pool_context()
        _WORKER_LABELER = self  # a forked worker inherits it instead of compiling the rules again
        try:
            pool = context.Pool(workers, initializer=_init_worker, initargs=(self.options, os.getpid()))
        finally:
            _WORKER_LABELER = None
        try:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_run_chunk, (function, chunk)))
                if len(pending) >= in_flight_per_worker * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
            pool.close()
            pool.join()
        finally:
            pool.terminate()  # no-op after a clean join; kills the workers on any early exit


def _pool_context():
    """'fork' when this process runs a single thread (fast: nothing re-imported), else 'spawn' (safe)."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items (the last one shorter), for `map_chunks`."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_WORKER_LABELER: Labeler | None = None
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """In a worker process: be killed when the parent dies (Linux prctl PR_SET_PDEATHSIG), and exit now if
    the parent is already gone. Elsewhere the parent's own cleanup (terminate on exit or SIGTERM) applies."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _init_worker(options: dict, parent_pid: int) -> None:
    global _WORKER_LABELER
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool, no traceback per worker
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (inherited through fork)
    if _WORKER_LABELER is None or _WORKER_LABELER.options != options:
        _WORKER_LABELER = Labeler(rules_dir=options["rules_dir"], sections=options["sections"],
                                  scispacy_model=options["scispacy_model"], umls_linker=options["umls_linker"])


def _run_chunk(function: Callable[[Labeler, list], T], chunk: list) -> T:
    assert _WORKER_LABELER is not None, "worker not initialized"
    return function(_WORKER_LABELER, chunk)


def _label_texts(labeler: Labeler, texts: list[str | None]) -> list[ReportLabels]:
    return [labeler.label_report(text) for text in texts]
