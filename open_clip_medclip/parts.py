"""`--part I/N`: a deterministic split of a command's inputs across machines (SLURM array jobs, any scheduler).

Part numbers are 1-based (`--part 1/4` .. `--part 4/4`). An input belongs to part `1 + h mod N`, where `h` is the
first 8 bytes of sha256 of its identity (for records: source NUL id), so the split depends only on the input
itself, never on input order or on the other inputs, and duplicates of one id land in the same part (where they
are reported as duplicates exactly as in a single run). Stdlib only: the labeler CLI imports it at start-up.
"""
from __future__ import annotations

import hashlib
import re

from open_clip_medclip.errors import UserError

_PART = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_part(text: str | None, flag: str = "--part") -> tuple[int, int] | None:
    """'2/8' -> (2, 8); None -> None; UserError for anything else (0/8, 9/8, 'a/b')."""
    if text is None:
        return None
    match = _PART.match(str(text))
    if not match:
        raise UserError(f"{flag} {text!r}: expected I/N, e.g. 1/4 (parts are numbered 1..N)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise UserError(f"{flag} {text!r}: I must lie in 1..N (parts are numbered 1..N), N >= 1")
    return index, count


def part_of(identity: str, count: int) -> int:
    """The 1-based part (of `count`) that the input with this identity belongs to."""
    digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).digest()
    return 1 + int.from_bytes(digest[:8], "big") % count


def in_part(identity: str, part: tuple[int, int] | None) -> bool:
    """Whether an input belongs to `part` ((I, N) or None for everything)."""
    return part is None or part[1] == 1 or part_of(identity, part[1]) == part[0]


def part_json(part: tuple[int, int] | None) -> dict | None:
    """The one JSON shape of "part I of N" that is written: {"index": I, "count": N} (None: not a part)."""
    return None if part is None else {"index": part[0], "count": part[1]}


def read_part(document: object) -> tuple[int, int] | None:
    """(I, N) from {"index", "count"} or the labeler's older {"index", "of"}; None when absent or malformed."""
    part = (document.get("index"), document.get("count", document.get("of"))) if isinstance(document, dict) else ()
    return part if len(part) == 2 and all(type(v) is int for v in part) and 1 <= part[0] <= part[1] else None


def part_suffix(part: tuple[int, int]) -> str:
    """'part002of008': appended to shard prefixes so the shards of N parts never share a name."""
    return f"part{part[0]:03d}of{part[1]:03d}"
