"""The one label contract: value coding, raw int8 codes, uncertainty policies, validation and batch transport.

Every stage (labeler, sources, shard builder and validator, streams, loss passthrough, eval suites) imports
these names; no other module redefines the coding. Finding names and order live in `findings.py`.

Values (JSON, CSV, Python lists) and their raw int8 codes:

| meaning        | value  | code (`np.int8`) |
|----------------|--------|------------------|
| positive       | 1      | 1                |
| negative       | 0      | 0                |
| uncertain      | -1     | -1               |
| not mentioned  | `None` (JSON `null`, empty CSV cell) | -2 (`BLANK_CODE`) |

Anything else is an error that names where it was found and is never coerced: NaN, a string ("1"), a bool,
2.0, a vector that is not 14 long. Integers and floats with those exact values are both accepted (1 == 1.0).

Policies turn codes into float32 training targets (`apply_policy`):

| policy | 1 | 0 | -1 | blank | meaning |
|---|---|---|---|---|---|
| `zeros` | 1 | 0 | 0 | 0 | MedCLIP default: uncertain counts as negative |
| `ones` | 1 | 0 | 1 | 0 | uncertain counts as positive |
| `keep` | 1 | 0 | -1 | 0 | uncertain kept as -1 |
| `raw` | 1 | 0 | -1 | NaN | storage policy: nothing applied (blank is NaN in float form) |

Shards store raw codes by default and record the build's policy; a stream applies the requested training policy
exactly once, and `check_policy(recorded, requested)` says when a recorded build policy makes the requested one
impossible (e.g. shards built with `zeros` have lost their -1s, so `ones` cannot be applied).

Batch transport (`pack_batch` / `unpack_batch`): labels ride in the int64 text tensor of OpenCLIP's
`(images, texts)` batches as small integer codes, one row per sample:

    [ token ids (T) | image label codes (L) | text label codes (L) | marker ]

Token ids are >= 0; label codes are -2..1 (targets after a policy are -1, 0 or 1, blank/NaN travels as -2);
the last column is `MARKER_BASE - L`, a large negative number no tokenizer produces. `unpack_batch` recognises
a packed tensor from its last column alone, so the token width T may differ from batch to batch (text trimming).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from open_clip_medclip.errors import UserError
from open_clip_medclip.findings import CHEXPERT_FINDINGS, FINDING_INDEX, NUM_FINDINGS

if TYPE_CHECKING:  # torch is imported lazily: `medclip label` and `medclip shards` start without it
    import torch

# Values as they appear in JSON / CSV / Python lists.
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
BLANK = None
VALID_VALUES = (POSITIVE, NEGATIVE, UNCERTAIN)

VALUE_MEANINGS = {POSITIVE: "positive", NEGATIVE: "negative", UNCERTAIN: "uncertain", BLANK: "not mentioned"}
# CSV cells (the CheXpert labeler's output format, `medclip label`): blank = empty cell.
CSV_TEXT = {POSITIVE: "1.0", NEGATIVE: "0.0", UNCERTAIN: "-1.0", BLANK: ""}

# Raw int8 codes (shard index sentence bank, packed batches).
POSITIVE_CODE, NEGATIVE_CODE, UNCERTAIN_CODE, BLANK_CODE = 1, 0, -1, -2
CODE_DTYPE = np.int8

# Policies: the three training policies and the storage policy that applies nothing.
RAW_POLICY = "raw"
TRAINING_POLICIES = ("zeros", "ones", "keep")
POLICIES = (*TRAINING_POLICIES, RAW_POLICY)
DEFAULT_TRAINING_POLICY = "zeros"  # MedCLIP
DEFAULT_BUILD_POLICY = RAW_POLICY  # shards keep everything; the stream applies the training policy once

# apply_policy lookup: row = policy, column = code - BLANK_CODE (blank, -1, 0, 1).
_POLICY_TABLE = {
    "zeros": np.array([0.0, 0.0, 0.0, 1.0], dtype=np.float32),
    "ones": np.array([0.0, 1.0, 0.0, 1.0], dtype=np.float32),
    "keep": np.array([0.0, -1.0, 0.0, 1.0], dtype=np.float32),
    "raw": np.array([np.nan, -1.0, 0.0, 1.0], dtype=np.float32),
}
# Values that may appear in shards built under each policy (None = blank).
STORED_VALUES = {"zeros": (1.0, 0.0), "ones": (1.0, 0.0), "keep": (1.0, 0.0, -1.0), "raw": (1.0, 0.0, -1.0, None)}
# Training policies a stream may apply to shards built with a recorded policy.
COMPATIBLE = {"raw": POLICIES, "keep": TRAINING_POLICIES, "zeros": ("zeros",), "ones": ("ones",)}

# Batch transport.
MARKER_BASE = -(1 << 40)  # marker column value = MARKER_BASE - L


class LabelError(UserError, ValueError):
    """A label value or vector that breaks the coding; the message starts with where it was found."""


# --------------------------------------------------------------------------------------------------------------
# Validation and codes
# --------------------------------------------------------------------------------------------------------------
def value_problem(value: object) -> str | None:
    """Why `value` is not a label value (1, 0, -1 or None), or None when it is one."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"{value!r} is a {type(value).__name__}, not a number (allowed: 1, 0, -1 or blank)"
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return "NaN is not a label value (blank is null / an empty cell)"
    if float(value) not in VALID_VALUES:
        return f"{value!r} is not a label value (allowed: 1, 0, -1 or blank)"
    return None


def vector_problems(values: object, where: str = "labels") -> list[str]:
    """Every problem of one label vector, each naming `where` and the finding; [] when valid."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        return [f"{where}: expected a list of {NUM_FINDINGS} label values, got {type(values).__name__}"]
    if len(values) != NUM_FINDINGS:
        return [f"{where}: expected {NUM_FINDINGS} label values, got {len(values)}"]
    problems = []
    for index, value in enumerate(values):
        problem = value_problem(value)
        if problem:
            problems.append(f"{where}[{index}] ({CHEXPERT_FINDINGS[index]}): {problem}")
    return problems


def validate_values(values: object, where: str = "labels") -> list[float | None]:
    """A checked copy of one label vector as floats and None; raises LabelError naming `where`."""
    problems = vector_problems(values, where)
    if problems:
        raise LabelError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return [None if value is None else float(value) for value in values]


def to_codes(values: object, where: str = "labels") -> np.ndarray:
    """One validated label vector as int8 codes [14] (blank = BLANK_CODE)."""
    return np.array([BLANK_CODE if v is None else int(v) for v in validate_values(values, where)], dtype=CODE_DTYPE)


def codes_matrix(vectors: Sequence[object], where: str = "labels") -> np.ndarray:
    """Many label vectors as an int8 [N, 14] code matrix; the error names `where[row]`."""
    out = np.empty((len(vectors), NUM_FINDINGS), dtype=CODE_DTYPE)
    for row, values in enumerate(vectors):
        out[row] = to_codes(values, f"{where}[{row}]")
    return out


def from_codes(codes: Sequence[int] | np.ndarray) -> list[float | None]:
    """Int8 codes back to JSON values (floats and None)."""
    return [None if int(code) == BLANK_CODE else float(code) for code in codes]


def parse_value_text(text: str | float | None, where: str = "label") -> float | None:
    """One CSV cell as a value: '' -> None (blank); '1', '1.0', '0', '-1' -> float; LabelError otherwise
    ('nan', 'yes', '2'). Numbers and None are checked the same way (a NaN float is an error, not blank)."""
    if text is None:
        return None
    if isinstance(text, str):
        stripped = text.strip()
        if stripped == "":
            return None
        try:
            value: object = float(stripped)
        except ValueError:
            raise LabelError(f"{where}: {stripped!r} is not a number (allowed: 1, 0, -1 or an empty cell)") from None
        if math.isnan(value):
            raise LabelError(f"{where}: NaN is not a label value (leave the cell empty for 'not mentioned')")
    else:
        value = text
    problem = value_problem(value)
    if problem:
        raise LabelError(f"{where}: {problem}")
    return float(value)


def csv_text(value: float | None) -> str:
    """A value as the labeler CSV writes it ('1.0', '0.0', '-1.0', '' for blank)."""
    return CSV_TEXT[None if value is None else float(value)]


def empty_values() -> list[float | None]:
    """A label vector with every finding unmentioned."""
    return [BLANK] * NUM_FINDINGS


# --------------------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------------------
def check_policy_name(policy: str, allowed: Sequence[str] = POLICIES) -> str:
    if policy not in allowed:
        raise LabelError(f"unknown label policy {policy!r}; choose one of {', '.join(allowed)}")
    return policy


def apply_policy(codes: object, policy: str) -> np.ndarray:
    """Float32 targets from int8 codes (any shape, last axis = findings) or from one list of values.

    Integer arrays are taken as codes (checked to lie in -2..1); anything else is validated as label values.
    """
    table = _POLICY_TABLE.get(policy)
    if table is None:
        check_policy_name(policy)
    if isinstance(codes, np.ndarray) and codes.dtype.kind in "iu":
        if codes.size and (codes.min() < BLANK_CODE or codes.max() > POSITIVE_CODE):
            raise LabelError(f"label codes must lie in {BLANK_CODE}..{POSITIVE_CODE}, got {codes.min()}..{codes.max()}")
        return table[codes.astype(np.intp) - BLANK_CODE]
    return table[to_codes(codes).astype(np.intp) - BLANK_CODE]


def policy_values(values: object, policy: str, where: str = "labels") -> list[float | None]:
    """Validated JSON values with a build policy applied (raw keeps -1 and None): what a shard stores."""
    check_policy_name(policy)
    values = validate_values(values, where)
    if policy == RAW_POLICY:
        return values
    return [float(x) for x in _POLICY_TABLE[policy][to_codes(values, where).astype(np.intp) - BLANK_CODE]]


def stored_value_problems(values: Sequence[object], policy: str, where: str = "labels") -> list[str]:
    """Values of a valid vector that a build with `policy` cannot have written (e.g. -1 under zeros)."""
    allowed = STORED_VALUES[policy]
    bad = [CHEXPERT_FINDINGS[i] for i, v in enumerate(values) if (None if v is None else float(v)) not in allowed]
    if not bad:
        return []
    shown = ", ".join("null" if v is None else f"{v:g}" for v in allowed)
    return [f"{where}: {', '.join(bad)} not allowed under label policy {policy!r} (allowed: {shown})"]


def check_policy(recorded: str, requested: str, where: str = "shards") -> str:
    """The training policy to apply to shards built with `recorded`; LabelError when that is impossible."""
    check_policy_name(requested)
    if recorded not in COMPATIBLE:
        raise LabelError(f"{where}: recorded label policy {recorded!r} is unknown; rebuild the shards")
    if requested not in COMPATIBLE[recorded]:
        raise LabelError(f"{where}: built with label policy {recorded!r}, which cannot give {requested!r} targets "
                         f"(possible: {', '.join(COMPATIBLE[recorded])}); rebuild with --uncertainty raw or train "
                         f"with --medclip-uncertain {COMPATIBLE[recorded][0]}")
    return requested


def values_from_names(names: Sequence[str], value: float = POSITIVE) -> list[float | None]:
    """A vector with the named findings set to `value` and the rest blank; LabelError for an unknown name."""
    labels = empty_values()
    for name in names:
        if name not in FINDING_INDEX:
            raise LabelError(f"unknown finding {name!r}; known: {', '.join(CHEXPERT_FINDINGS)}")
        labels[FINDING_INDEX[name]] = float(value)
    return labels


def positive_findings(values: Sequence[float | None]) -> list[str]:
    """Names of the findings coded positive."""
    return [name for name, value in zip(CHEXPERT_FINDINGS, values) if value == POSITIVE]


# --------------------------------------------------------------------------------------------------------------
# Batch transport
# --------------------------------------------------------------------------------------------------------------
def pack_batch(tokens: torch.Tensor, image_targets: torch.Tensor | np.ndarray,
               text_targets: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[tokens | image codes | text codes | marker] as one int64 tensor; 1-D inputs give one 1-D row.

    Targets hold -1, 0, 1 (any float or int dtype) and NaN for blank; anything else raises LabelError.
    """
    import torch

    single = tokens.ndim == 1
    tokens = tokens.reshape(1, -1) if single else tokens
    image_targets = torch.as_tensor(image_targets)
    text_targets = torch.as_tensor(text_targets)
    if single:
        image_targets, text_targets = image_targets.reshape(1, -1), text_targets.reshape(1, -1)
    rows = tokens.shape[0]
    if image_targets.shape != text_targets.shape or image_targets.ndim != 2 or image_targets.shape[0] != rows:
        raise LabelError(f"pack_batch: tokens {tuple(tokens.shape)}, image targets {tuple(image_targets.shape)} and "
                         f"text targets {tuple(text_targets.shape)} do not describe the same {rows} rows")
    labels = torch.cat([image_targets, text_targets], dim=1)
    if labels.is_floating_point():
        blank = torch.isnan(labels)
        codes = torch.where(blank, torch.full_like(labels, BLANK_CODE), labels)
        if not torch.equal(codes, codes.round()):
            raise LabelError("pack_batch: label targets must be -1, 0, 1 or NaN (blank)")
        codes = codes.long()
    else:
        codes = labels.long()
    if codes.numel() and (codes.min() < BLANK_CODE or codes.max() > POSITIVE_CODE):
        raise LabelError(f"pack_batch: label targets must be -1, 0, 1 or NaN (blank), got {codes.min()}..{codes.max()}")
    marker = torch.full((rows, 1), MARKER_BASE - image_targets.shape[1], dtype=torch.long, device=tokens.device)
    packed = torch.cat([tokens.long(), codes.to(tokens.device), marker], dim=1)
    return packed[0] if single else packed


def _packed_count(texts: torch.Tensor) -> int | None:
    """The label count L of a `pack_batch` tensor, or None when `texts` is not one. One host sync (min and max
    of the marker column read together), so a GPU step pays a single round trip for it."""
    import torch

    if texts.ndim != 2 or texts.shape[0] == 0 or texts.shape[1] < 2 or texts.dtype != torch.long:
        return None
    marker = texts[:, -1]
    low, high = torch.stack([marker.min(), marker.max()]).tolist()
    if low != high or low > MARKER_BASE or texts.shape[1] < 1 + 2 * (MARKER_BASE - low):
        return None
    return MARKER_BASE - low


def unpack_batch(texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(tokens [B,T], image targets float32 [B,L], text targets float32 [B,L]); blank codes come back as NaN.

    A tensor that `pack_batch` did not make comes back untouched as `(texts, None, None)`.
    """
    import torch

    count = _packed_count(texts)
    if count is None:
        return texts, None, None
    width = texts.shape[1] - 1 - 2 * count
    codes = texts[:, width:-1]
    # no `.any()` test before the where: that would be a second host sync per step
    targets = torch.where(codes == BLANK_CODE, torch.full_like(codes, 0, dtype=torch.float32).fill_(float("nan")),
                          codes.float())
    return texts[:, :width], targets[:, :count], targets[:, count:]

