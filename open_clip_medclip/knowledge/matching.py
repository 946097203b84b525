"""Compiled phrase matchers, negation/uncertainty scope and CheXpert-style aggregation.

Everything here works on character offsets in one "matching text" (the normalized report, lower-cased, '-' read
as a space), so the spaCy components and the fast path run the very same functions: the components store the
results on the Doc, the fast path keeps them in local lists. Each phrase table is compiled into one regex whose
alternation is a character trie, which Python's regex engine walks in about the time of a single keyword search.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from open_clip_medclip.findings import FINDING_INDEX, NUM_FINDINGS
from open_clip_medclip.knowledge.rules import OTHER_ABNORMALITY_INDEX, PhraseRule
from open_clip_medclip.labels import NEGATIVE, POSITIVE, UNCERTAIN

# Term kinds.
MENTION, CUE, NEG_PRE, NEG_POST, UNC_PRE, UNC_POST, PSEUDO, TERMINATOR, IGNORE = range(9)
NEGATION, UNCERTAINTY = "negation", "uncertainty"

NO_FINDING_INDEX = FINDING_INDEX["No Finding"]
SUPPORT_DEVICES_INDEX = FINDING_INDEX["Support Devices"]
# Aggregation priority of a value: positive > uncertain > negative > blank.
_RANK = {None: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}


class Entry(NamedTuple):
    """What a matched literal means (a literal may carry several entries, e.g. a cue that is also a hedge)."""

    kind: int
    finding: int = 0  # finding index for mentions; OTHER_ABNORMALITY_INDEX for the no-finding blockers
    window: int | None = None
    requires: str | None = None  # cue set a mention needs, or the cue set a CUE belongs to
    implies: tuple[int, float] | None = None
    negatable: bool = False


class Term(NamedTuple):
    start: int
    end: int
    entries: tuple[Entry, ...]


class Assertion(NamedTuple):
    """A resolved mention: which finding, what value, where (character offsets in the matching text)."""

    start: int
    end: int
    finding: int
    value: float
    implies: tuple[int, float] | None = None


def matching_text(normalized: str) -> str:
    """The string all matchers read: same length and offsets as `normalized`."""
    return normalized.lower().replace("-", " ")


def trie_regex(phrases: Iterable[str]) -> re.Pattern:
    """One regex matching any phrase on word boundaries, longest phrase first at each position."""
    trie: dict = {}
    for phrase in phrases:
        node = trie
        for char in phrase:
            node = node.setdefault(char, {})
        node[""] = True
    if not trie:
        return re.compile(r"(?!x)x")  # matches nothing
    return re.compile(r"(?<![a-z0-9])(?:" + _trie_pattern(trie) + r")(?![a-z0-9])")


def _trie_pattern(node: dict) -> str:
    ends_here = "" in node
    branches = [re.escape(char) + _trie_pattern(child) for char, child in sorted(node.items()) if char]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    if ends_here:  # the phrase may stop here: try the longer continuation first (greedy '?')
        return "(?:" + body + ")?"
    return body


_new_term = tuple.__new__  # builds a Term without NamedTuple's keyword handling (hot loop)


class TermMatcher:
    """A phrase table (literal -> entries) compiled into one trie regex."""

    def __init__(self, table: dict[str, list[Entry]]):
        self.table = {phrase: tuple(entries) for phrase, entries in table.items()}
        self.regex = trie_regex(self.table)

    def __len__(self) -> int:
        return len(self.table)

    def find(self, text: str, start: int = 0, end: int | None = None) -> list[Term]:
        table = self.table
        end = len(text) if end is None else end
        return [_new_term(Term, (m.start(), m.end(), table[m.group()])) for m in self.regex.finditer(text, start, end)]


def build_table(groups: Iterable[tuple[Sequence[PhraseRule], Entry]]) -> dict[str, list[Entry]]:
    """Phrase table from (rules, entry template) groups; per-rule options override the template."""
    table: dict[str, list[Entry]] = {}
    for rules, template in groups:
        for rule in rules:
            entry = template._replace(
                window=rule.window if rule.window is not None else template.window,
                requires=rule.requires if rule.requires is not None else template.requires,
                implies=rule.implies, negatable=rule.negatable)
            entries = table.setdefault(rule.phrase, [])
            if entry not in entries:
                entries.append(entry)
    return table


def merge_terms(*term_lists: list[Term]) -> list[Term]:
    """Leftmost-longest over several matchers' terms: drop terms overlapping an earlier/longer one.

    Terms with identical spans from different matchers are combined (e.g. a size cue that is also a hedge).
    """
    terms = [term for terms in term_lists for term in terms]
    if len(terms) < 2:
        return terms
    terms.sort(key=lambda term: (term.start, -term.end))
    merged = [terms[0]]
    for term in terms[1:]:
        last = merged[-1]
        if term.start == last.start and term.end == last.end:
            merged[-1] = Term(last.start, last.end, last.entries + term.entries)
        elif term.start >= last.end:
            merged.append(term)
    return merged


class ScopeSettings(NamedTuple):
    """Scope defaults (rules/scope.json); a trigger's own @window overrides its default."""

    negation_pre_window: int = 10
    negation_post_window: int = 6
    uncertainty_pre_window: int = 8
    uncertainty_post_window: int = 6
    cue_window: int = 3
    pre_scope_stop_chars: str = ";:"
    post_scope_stop_chars: str = ";:,"
    tie: str = UNCERTAINTY  # which wins when a negation and a hedge are equally near

    @classmethod
    def from_dict(cls, values: dict, where: str = "scope.json") -> ScopeSettings:
        unknown = set(values) - set(cls._fields)
        if unknown:
            raise ValueError(f"{where}: unknown scope settings {sorted(unknown)}; known: {list(cls._fields)}")
        settings = cls(**values)
        if settings.tie not in (NEGATION, UNCERTAINTY):
            raise ValueError(f"{where}: tie must be {NEGATION!r} or {UNCERTAINTY!r}")
        return settings


class _Trigger(NamedTuple):
    polarity: str  # NEGATION | UNCERTAINTY
    is_pre: bool
    start: int
    end: int
    first_word: int
    last_word: int
    window: int
    negatable: bool


def resolve_sentence(text: str, start: int, end: int, terms: Sequence[Term], scope: ScopeSettings) -> list[Assertion]:
    """Assertions for the mentions of one sentence: positive, negated (0) or uncertain (-1).

    A pre-trigger covers mentions after it, a post-trigger mentions before it, within its window (in words) and
    not across a scope terminator or a stop character (post-triggers also stop at commas, so "Mild cardiomegaly,
    vascularity within normal limits" keeps the cardiomegaly). The nearest covering trigger decides. Mentions
    with `@requires` count only with a cue of their set nearby (then the cue's triggers count too) or when negated.
    """
    mentions: list[tuple[Term, Entry]] = []
    trigger_terms: list[tuple[Term, Entry]] = []
    cues: dict[str, list[Term]] = {}
    terminators: list[Term] = []
    for term in terms:
        for entry in term.entries:
            kind = entry.kind
            if kind == MENTION:
                mentions.append((term, entry))
            elif kind == CUE:
                cues.setdefault(entry.requires, []).append(term)
            elif kind == TERMINATOR:
                terminators.append(term)
            elif NEG_PRE <= kind <= UNC_POST:
                trigger_terms.append((term, entry))
    if not mentions:
        return []
    if not trigger_terms and not cues:  # the common "Mild cardiomegaly." case
        return [Assertion(term.start, term.end, entry.finding, POSITIVE, entry.implies)
                for term, entry in mentions if not entry.requires]

    def word_index(pos: int) -> int:
        return text.count(" ", start, pos)

    default_windows = {NEG_PRE: scope.negation_pre_window, NEG_POST: scope.negation_post_window,
                       UNC_PRE: scope.uncertainty_pre_window, UNC_POST: scope.uncertainty_post_window}
    triggers: list[_Trigger] = []
    for term, entry in trigger_terms:
        kind = entry.kind
        triggers.append(_Trigger(NEGATION if kind in (NEG_PRE, NEG_POST) else UNCERTAINTY, kind in (NEG_PRE, UNC_PRE),
                                 term.start, term.end, word_index(term.start), word_index(term.end),
                                 entry.window if entry.window is not None else default_windows[kind],
                                 entry.negatable))

    def blocked(left: int, right: int, stop_chars: str) -> bool:
        """Whether a terminator or stop character lies between character offsets left..right."""
        segment = text[left:right]
        if any(char in segment for char in stop_chars):
            return True
        return any(left <= stop.start and stop.end <= right for stop in terminators)

    def covering(target_start: int, target_end: int) -> list[tuple[int, _Trigger]]:
        """(distance in words, trigger) for every trigger whose scope reaches the target span."""
        found = []
        first, last = word_index(target_start), word_index(target_end)
        for trigger in triggers:
            if trigger.is_pre and trigger.end <= target_start:
                distance = first - trigger.last_word - 1
                if distance <= trigger.window and not blocked(trigger.end, target_start, scope.pre_scope_stop_chars):
                    found.append((distance, trigger))
            elif not trigger.is_pre and trigger.start >= target_end:
                distance = trigger.first_word - last - 1
                if distance <= trigger.window and not blocked(target_end, trigger.start, scope.post_scope_stop_chars):
                    found.append((distance, trigger))
        return found

    # A negatable hedge inside a negation's scope ("no findings to suggest pneumonia") joins the negation.
    if any(trigger.negatable for trigger in triggers):
        for i, trigger in enumerate(triggers):
            if trigger.negatable and trigger.polarity == UNCERTAINTY and any(
                    other.polarity == NEGATION and other.is_pre
                    for _, other in covering(trigger.start, trigger.end)):
                triggers[i] = trigger._replace(polarity=NEGATION)

    def decide(found: list[tuple[int, _Trigger]]) -> str | None:
        """The nearest covering trigger's polarity; on a tie the one `scope.tie` names."""
        if not found:
            return None
        return min(found, key=lambda item: (item[0], item[1].polarity != scope.tie))[1].polarity

    assertions: list[Assertion] = []
    previous: Term | None = None
    previous_found: list[tuple[int, _Trigger]] = []
    for term, entry in mentions:
        if previous is not None and term.start == previous.start and term.end == previous.end:
            found = previous_found  # another finding of the same phrase
        else:
            found = covering(term.start, term.end)
            if previous_found and previous is not None and _coordinated(text, previous.end, term.start) \
                    and not blocked(previous.end, term.start, scope.pre_scope_stop_chars):
                # A pre-trigger covering one member of a coordination covers the members after it, as in a
                # dependency parse ("may represent atelectasis versus mild edema or an atypical infection").
                own = {trigger for _, trigger in found}
                found = found + [(distance, trigger) for distance, trigger in previous_found
                                 if trigger.is_pre and trigger not in own]
            previous, previous_found = term, found
        if entry.requires:
            cue = _nearest_cue(cues.get(entry.requires, ()), term, entry.window or scope.cue_window,
                               word_index, blocked, scope.post_scope_stop_chars)
            if cue is not None:
                found = found + covering(cue.start, cue.end)
            polarity = decide(found)
            if cue is None and polarity != NEGATION:
                continue  # "the heart" alone says nothing; "heart size normal" does
        else:
            polarity = decide(found)
        value = NEGATIVE if polarity == NEGATION else UNCERTAIN if polarity == UNCERTAINTY else POSITIVE
        assertions.append(Assertion(term.start, term.end, entry.finding, value, entry.implies))
    return assertions


_CONJUNCTIONS = frozenset({"or", "and", "nor", "versus", "vs", "vs.", "and/or", "/"})
_COORDINATION_GAP_WORDS = 4


def _coordinated(text: str, left: int, right: int) -> bool:
    """Whether the words between two mentions link them in a coordination: a conjunction ('or', 'and',
    'versus', '/' ...) and at most a few modifiers ("... or an atypical ..."). A bare comma is not enough:
    "A, B" may be two statements."""
    gap = text[left:right].replace(",", " ").replace("/", " / ").split()
    return 0 < len(gap) <= _COORDINATION_GAP_WORDS and any(word in _CONJUNCTIONS for word in gap)


def _nearest_cue(candidates, term: Term, window: int, word_index, blocked, stop_chars: str) -> Term | None:
    best: tuple[int, Term] | None = None
    for cue in candidates:
        if cue.end <= term.start:
            distance = word_index(term.start) - word_index(cue.end) - 1
            is_blocked = distance <= window and blocked(cue.end, term.start, stop_chars)
        elif cue.start >= term.end:
            distance = word_index(cue.start) - word_index(term.end) - 1
            is_blocked = distance <= window and blocked(term.end, cue.start, stop_chars)
        else:
            continue
        if distance <= window and not is_blocked and (best is None or distance < best[0]):
            best = (distance, cue)
    return None if best is None else best[1]


def combine(current: float | None, new: float | None) -> float | None:
    """CheXpert aggregation of two values for one finding: positive > uncertain > negative > blank."""
    return new if _RANK[new] > _RANK[current] else current


_NOTHING_FOUND = (POSITIVE,) + (None,) * (NUM_FINDINGS - 1)  # a sentence without assertions: only No Finding


def sentence_vector(assertions: Sequence[Assertion]) -> tuple[list[float | None], bool]:
    """14 labels of one sentence plus whether it asserts an abnormality outside the 14 (blocks No Finding)."""
    if not assertions:
        return list(_NOTHING_FOUND), False
    labels: list[float | None] = [None] * NUM_FINDINGS
    other_abnormality = False
    for assertion in assertions:
        if assertion.finding == OTHER_ABNORMALITY_INDEX:
            other_abnormality = other_abnormality or assertion.value != NEGATIVE
            continue
        labels[assertion.finding] = combine(labels[assertion.finding], assertion.value)
        if assertion.implies is not None and assertion.value != NEGATIVE:
            implied, implied_value = assertion.implies
            labels[implied] = combine(labels[implied], implied_value)
    labels[NO_FINDING_INDEX] = no_finding_value(labels, other_abnormality)
    return labels, other_abnormality


def no_finding_value(labels: Sequence[float | None], other_abnormality: bool) -> float | None:
    """CheXpert rule: No Finding = 1 only when no finding but Support Devices is positive or uncertain."""
    if other_abnormality:
        return None
    for index, value in enumerate(labels):
        if index not in (NO_FINDING_INDEX, SUPPORT_DEVICES_INDEX) and (value == POSITIVE or value == UNCERTAIN):
            return None
    return POSITIVE


def aggregate_report(sentence_vectors: Sequence[tuple[Sequence[float | None], bool]]) -> list[float | None]:
    """Report labels from its sentences' (labels, other_abnormality); all blank for a report without sentences."""
    labels: list[float | None] = [None] * NUM_FINDINGS
    if not sentence_vectors:
        return labels
    other_abnormality = False
    nothing_found = list(_NOTHING_FOUND)
    for vector, other in sentence_vectors:
        other_abnormality = other_abnormality or other
        if vector == nothing_found:
            continue
        for index, value in enumerate(vector):
            if index != NO_FINDING_INDEX and value is not None:
                labels[index] = combine(labels[index], value)
    labels[NO_FINDING_INDEX] = no_finding_value(labels, other_abnormality)
    return labels
