"""Rule files: where they live, their line syntax, phrase expansion and the rules hash.

The labeler's knowledge is data, not code: every phrase list is a UTF-8 text file in one flat folder
(`open_clip_medclip/knowledge/rules/` by default; pass `rules_dir` to use a copy you edited). Line syntax of a
phrase file::

    # a comment (also after two spaces at the end of a line)
    pleural effusion(s|)                 -> "pleural effusion", "pleural effusions"
    (heart|cardiac) size @requires=enlargement
    normal @window=0
    chf @implies=cardiomegaly:uncertain
    to suggest @negatable

Phrases are matched case-insensitively on whole words; `-` counts as a space on both sides, so
`air-space disease` and `air space disease` are one phrase. `(a|b|)` groups (nestable, empty alternative
allowed) expand to every literal variant, so the matchers only ever see literal phrases. Options after `@`:
`window=N` (scope in words for a trigger, or cue distance for a mention), `requires=CUESET` (a mention that
only counts with a cue from `cues_CUESET.txt` nearby, or when it is negated), `implies=FINDING:uncertain`
(CheXpert's "chf / heart failure -> Cardiomegaly uncertain" rule), `negatable` (an uncertainty trigger that a
preceding negation turns into part of the negation, as in "no findings to suggest pneumonia").

The rules hash is sha256 over every file's relative name and bytes, so labels can be traced to the exact rules.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from open_clip_medclip.findings import CHEXPERT_FINDINGS, FINDING_INDEX

DEFAULT_RULES_DIR = Path(__file__).resolve().parent / "rules"
RULE_FILE_SUFFIXES = (".txt", ".json")

# Mention files: one per finding except No Finding (derived by the aggregation rule), plus the abnormalities
# outside the 14 that still mean "there is a finding" (CheXpert's no_finding mention list).
OTHER_ABNORMALITY = "other_abnormality"
OTHER_ABNORMALITY_INDEX = -1
MENTIONED_FINDINGS = tuple(name for name in CHEXPERT_FINDINGS if name != "No Finding")


def finding_slug(name: str) -> str:
    """'Pleural Effusion' -> 'pleural_effusion' (the file-name form of a finding)."""
    return name.lower().replace(" ", "_")


SLUG_TO_INDEX = {finding_slug(name): FINDING_INDEX[name] for name in MENTIONED_FINDINGS}
SLUG_TO_INDEX[OTHER_ABNORMALITY] = OTHER_ABNORMALITY_INDEX


@dataclass(frozen=True)
class PhraseRule:
    """One literal phrase from a rule file with its options."""

    phrase: str
    source: str  # "file:line", for error messages and debugging
    window: int | None = None
    requires: str | None = None
    implies: tuple[int, float] | None = None  # (finding index, value)
    negatable: bool = False


@dataclass
class RuleFileError(ValueError):
    """A rule file that cannot be parsed; the message names file and line."""

    message: str

    def __str__(self) -> str:
        return self.message


_OPTION_RE = re.compile(r"\s@([a-z_]+)(?:=(\S+))?")


def normalize_phrase(text: str) -> str:
    """The matching form of a phrase or text: lower case, '-' as space, single spaces."""
    return " ".join(text.lower().replace("-", " ").split())


def expand_alternatives(pattern: str, where: str = "phrase") -> list[str]:
    """Expand `(a|b|)` groups (nestable) into every literal variant, in file order."""
    variants, rest = _expand_sequence(pattern, 0, where, top_level=True)
    if rest != len(pattern):
        raise RuleFileError(f"{where}: unbalanced ')' in {pattern!r}")
    return variants


def _expand_sequence(pattern: str, pos: int, where: str, top_level: bool) -> tuple[list[str], int]:
    """Expand a sequence up to a '|' or ')' at this nesting level; return (variants, position)."""
    variants = [""]
    literal_start = pos
    while pos < len(pattern):
        char = pattern[pos]
        if char in "|)":
            if top_level:
                raise RuleFileError(f"{where}: '{char}' outside a group in {pattern!r}")
            break
        if char == "(":
            literal = pattern[literal_start:pos]
            variants = [v + literal for v in variants]
            options, pos = _expand_group(pattern, pos + 1, where)
            variants = [v + o for v in variants for o in options]
            literal_start = pos
            continue
        pos += 1
    literal = pattern[literal_start:pos]
    return [v + literal for v in variants], pos


def _expand_group(pattern: str, pos: int, where: str) -> tuple[list[str], int]:
    options: list[str] = []
    while True:
        branch, pos = _expand_sequence(pattern, pos, where, top_level=False)
        options.extend(branch)
        if pos >= len(pattern):
            raise RuleFileError(f"{where}: unclosed '(' in {pattern!r}")
        if pattern[pos] == ")":
            return options, pos + 1
        pos += 1  # skip '|'


def parse_phrase_file(path: Path) -> list[PhraseRule]:
    """Read one phrase file into literal PhraseRules (alternatives expanded, options parsed)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError(f"{path}: cannot read rule file ({exc})") from exc
    rules: list[PhraseRule] = []
    for number, raw in enumerate(lines, start=1):
        where = f"{path.name}:{number}"
        line = raw.split("  #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        options: dict[str, str | None] = {}
        for match in _OPTION_RE.finditer(" " + line):
            options[match.group(1)] = match.group(2)
        body = _OPTION_RE.sub("", " " + line).strip()
        if not body:
            raise RuleFileError(f"{where}: no phrase before the options")
        rule_options = _parse_options(options, where)
        for variant in expand_alternatives(body, where):
            phrase = normalize_phrase(variant)
            if phrase:
                rules.append(PhraseRule(phrase=phrase, source=where, **rule_options))
    return rules


def _parse_options(options: dict[str, str | None], where: str) -> dict:
    parsed: dict = {}
    for key, value in options.items():
        if key == "window":
            if value is None or not value.isdigit():
                raise RuleFileError(f"{where}: @window needs a whole number of words, got {value!r}")
            parsed["window"] = int(value)
        elif key == "requires":
            if not value:
                raise RuleFileError(f"{where}: @requires needs a cue set name")
            parsed["requires"] = value
        elif key == "implies":
            slug, _, kind = (value or "").partition(":")
            if slug not in SLUG_TO_INDEX or slug == OTHER_ABNORMALITY or kind not in ("positive", "uncertain"):
                raise RuleFileError(f"{where}: @implies must be FINDING:positive|uncertain, got {value!r}")
            parsed["implies"] = (SLUG_TO_INDEX[slug], 1.0 if kind == "positive" else -1.0)
        elif key == "negatable":
            parsed["negatable"] = True
        else:
            raise RuleFileError(f"{where}: unknown option @{key}")
    return parsed


def read_json_rules(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuleFileError(f"{path}: cannot read JSON rule file ({exc})") from exc


def resolve_rules_dir(rules_dir: str | Path | None) -> Path:
    """The rules folder to use (the bundled one for None); raises if it is missing."""
    path = DEFAULT_RULES_DIR if rules_dir in (None, "") else Path(rules_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"rules folder not found: {path}")
    return path


def rules_hash(rules_dir: str | Path | None = None) -> str:
    """sha256 over the rule files' relative names and bytes (sorted), as 'sha256:<hex>'."""
    root = resolve_rules_dir(rules_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in RULE_FILE_SUFFIXES):
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return "sha256:" + digest.hexdigest()


@dataclass
class MentionRules:
    """Mention phrases per finding, phrases that look like mentions but are not, and cue sets."""

    mentions: dict[int, list[PhraseRule]] = field(default_factory=dict)  # finding index -> phrases
    ignore: list[PhraseRule] = field(default_factory=list)
    cues: dict[str, list[PhraseRule]] = field(default_factory=dict)


def load_mention_rules(rules_dir: str | Path | None = None) -> MentionRules:
    root = resolve_rules_dir(rules_dir)
    rules = MentionRules()
    for slug, index in SLUG_TO_INDEX.items():
        path = root / f"mentions_{slug}.txt"
        if not path.is_file():
            raise RuleFileError(f"{path}: mention file missing (one per finding is required)")
        rules.mentions[index] = parse_phrase_file(path)
    ignore_path = root / "ignore.txt"
    if ignore_path.is_file():
        rules.ignore = parse_phrase_file(ignore_path)
    for path in sorted(root.glob("cues_*.txt")):
        rules.cues[path.stem[len("cues_"):]] = parse_phrase_file(path)
    for phrases in rules.mentions.values():
        for rule in phrases:
            if rule.requires and rule.requires not in rules.cues:
                raise RuleFileError(f"{rule.source}: @requires={rule.requires} but cues_{rule.requires}.txt "
                                    f"is missing in {root}")
    return rules


def load_trigger_rules(rules_dir: str | Path | None, prefix: str, kinds: tuple[str, ...]) -> dict[str, list[PhraseRule]]:
    """Trigger files `<prefix>_<kind>.txt` (e.g. negation_pre.txt); each kind's file must exist."""
    root = resolve_rules_dir(rules_dir)
    loaded: dict[str, list[PhraseRule]] = {}
    for kind in kinds:
        path = root / f"{prefix}_{kind}.txt"
        if not path.is_file():
            raise RuleFileError(f"{path}: trigger file missing")
        loaded[kind] = parse_phrase_file(path)
    return loaded


def load_plain_list(rules_dir: str | Path | None, name: str) -> list[str]:
    """A list file without options (abbreviations): one normalized entry per line."""
    return [rule.phrase for rule in parse_phrase_file(resolve_rules_dir(rules_dir) / name)]
