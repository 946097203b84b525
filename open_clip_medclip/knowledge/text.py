"""Report text -> normalized text -> sections -> sentences, all as character offsets.

Normalization keeps paragraph breaks ("\\n\\n", also forced before numbered/bulleted list items) and turns every
other whitespace run into one space, as MIMIC reports wrap lines mid-sentence. Offsets from here on refer to the
normalized text, which is also the text the spaCy Doc is built from.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

# A line that starts a list item or an upper-case "HEADER:" starts a paragraph (MIMIC wraps everything else).
_LIST_ITEM_LINE = re.compile(r"\n[ \t]*(?=(?:\(?\d{1,2}[.)]|[-*\u2022])[ \t]|[A-Z][A-Z /&()-]{1,40}:)")
_PARAGRAPH_BREAK = re.compile(r"[ \t\r\f\v]*\n[ \t\r\f\v]*\n\s*")
# "[.!?][.!?]*" rather than "[.!?]+": a pattern whose branches all start with a character set lets the regex
# engine skip ahead to the next candidate character instead of trying every position.
_SENTENCE_END = re.compile(r"[.!?][.!?]*(?=[\s\"')\]]|$)|\n\n")
_LIST_MARKER = re.compile(r"(?:\(?\d{1,2}[.)]|[-*\u2022])\s+")
_HAS_LETTER = re.compile(r"[A-Za-z]")
# Characters a phrase match would have to contain (before its last character) to run across a sentence
# boundary: sentence-ending punctuation, the ':' of a section header, the end of a list marker ("1)", "*", "\u2022")
# and line breaks. Everything between two sentences starts or ends next to one of them.
SENTENCE_BOUNDARY_CHARS = frozenset(".!?:)*\u2022\n")


def may_cross_sentences(phrase: str) -> bool:
    """Whether a matched phrase could span two sentences (or a sentence and the text between sentences).

    Sentences end at '.', '!' or '?' (or a paragraph break or section end) and start after whitespace, a header
    colon or a list marker, and the characters on both sides of every boundary are not letters or digits. So a
    phrase without leading/trailing whitespace, line breaks or a boundary character before its last character
    matches the same way in a sentence's text alone as in the whole report (what `Labeler`'s per-sentence
    cache relies on).
    """
    return phrase != phrase.strip() or any(char in SENTENCE_BOUNDARY_CHARS for char in phrase[:-1])


def normalize_report(text: str) -> str:
    """Paragraph breaks as '\\n\\n' (also before list items and upper-case headers at a line start), all other
    whitespace as single spaces, trimmed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _LIST_ITEM_LINE.sub("\n\n", text)
    paragraphs = _PARAGRAPH_BREAK.split(text)
    return "\n\n".join(joined for joined in (" ".join(p.split()) for p in paragraphs) if joined)


class Section(NamedTuple):
    kind: str  # canonical section name ("findings", "impression", ...), "preamble" or "body" for unheaded text
    header_start: int
    start: int  # content start (after "HEADER:")
    end: int


PREAMBLE = "preamble"  # text before the first header
BODY = "body"  # text after a skipped section's paragraph, without a header of its own


class SectionSplitter:
    """Finds "HEADER:" section headers (MIMIC, CheXpert, IU names from rules/sections.json).

    `select` keeps the sections to label: those named in `label_sections` if the report has any, otherwise
    every section except the ones the rules mark as skip (indication, history, comparison, technique ...).
    """

    def __init__(self, aliases: dict[str, Sequence[str]], skip: Iterable[str], label_sections: Iterable[str]):
        self.alias_to_kind: dict[str, str] = {}
        for kind, names in aliases.items():
            for name in [kind, *names]:
                self.alias_to_kind[" ".join(name.lower().split())] = kind
        self.skip = frozenset(skip)
        self.label_sections = tuple(label_sections)
        unknown = [name for name in (*self.skip, *self.label_sections) if name not in aliases]
        if unknown:
            raise ValueError(f"unknown section names {unknown}; known: {sorted(aliases)}")
        names = sorted(self.alias_to_kind, key=len, reverse=True)
        self.longest_alias = max(map(len, names))
        alternation = "|".join(re.escape(name).replace(r"\ ", " ") for name in names)
        # A header is a known name right before a colon, at the start of the text, a line or a sentence.
        self.header_before_colon = re.compile(r"(?:^|(?<=\n)|(?<=[.!?] ))(" + alternation + r") ?$", re.IGNORECASE)

    def headers(self, text: str) -> list[tuple[str, int, int]]:
        """(kind, header start, content start) for each header; found from the colons, which are few."""
        found = []
        colon = text.find(":")
        while colon != -1:
            match = self.header_before_colon.search(text, max(0, colon - self.longest_alias - 1), colon)
            if match:
                found.append((self.alias_to_kind[" ".join(match.group(1).lower().split())], match.start(), colon + 1))
            colon = text.find(":", colon + 1)
        return found

    def split(self, text: str) -> list[Section]:
        """All sections in order; text before the first header is the preamble (dropped when empty)."""
        sections: list[Section] = []
        previous_kind, previous_header, previous_start = PREAMBLE, 0, 0
        for kind, header_start, content_start in self.headers(text):
            if previous_kind != PREAMBLE or text[previous_start:header_start].strip():
                sections.append(Section(previous_kind, previous_header, previous_start, header_start))
            previous_kind, previous_header, previous_start = kind, header_start, content_start
        sections.append(Section(previous_kind, previous_header, previous_start, len(text)))
        return self._end_skipped_at_paragraph(text, sections)

    def _end_skipped_at_paragraph(self, text: str, sections: list[Section]) -> list[Section]:
        """A skipped section ("HISTORY: cough.") ends at its first paragraph break; what follows without a
        header of its own is report body ("HISTORY: cough.\n\nThe lungs are clear.")."""
        result = []
        for section in sections:
            cut = text.find("\n\n", section.start, section.end) if section.kind in self.skip else -1
            if cut != -1 and text[cut:section.end].strip():
                result.append(section._replace(end=cut))
                result.append(Section(BODY, cut, cut + 2, section.end))
            else:
                result.append(section)
        return result

    def select(self, sections: Sequence[Section]) -> list[Section]:
        chosen = [section for section in sections if section.kind in self.label_sections]
        if chosen:
            return chosen
        return [section for section in sections if section.kind not in self.skip]


class SentenceSplitter:
    """Rule-based sentence splitter for report prose.

    Splits after '.', '!' or '?' followed by whitespace or the end, and at paragraph breaks; a period after a
    listed abbreviation (dr., e.g., vs.) does not end a sentence, a decimal point never does. Leading list
    markers ("1.", "2)", "-") are cut off and fragments without letters ("2.", ".") are dropped.
    """

    def __init__(self, abbreviations: Iterable[str]):
        self.abbreviations = frozenset(a.rstrip(".").lower() for a in abbreviations)

    def split(self, text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        end = len(text) if end is None else end
        spans: list[tuple[int, int]] = []
        sentence_start = start
        abbreviations = self.abbreviations
        for match in _SENTENCE_END.finditer(text, start, end):
            punct_start = match.start()
            if abbreviations and match.end() - punct_start == 1 and text[punct_start] == "." \
                    and text[punct_start - 1].isalpha():
                word_start = max(text.rfind(" ", sentence_start, punct_start) + 1, sentence_start)
                if punct_start - word_start <= 8 and text[word_start:punct_start].lower().lstrip("(") in abbreviations:
                    continue
            self._emit(text, sentence_start, match.end(), spans)
            sentence_start = match.end()
        self._emit(text, sentence_start, end, spans)
        return spans

    @staticmethod
    def _emit(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> None:
        while start < end and text[start] in " \n":
            start += 1
        while end > start and text[end - 1] in " \n":
            end -= 1
        marker = _LIST_MARKER.match(text, start, end)
        if marker:
            start = marker.end()
        if start < end and _HAS_LETTER.search(text, start, end):
            spans.append((start, end))
