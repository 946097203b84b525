"""The shard format as a contract: SPEC.md, schema.json and examples/ as package data, plus the validator."""
from __future__ import annotations

import json
from pathlib import Path

from open_clip_medclip.shards.format import SPEC_VERSION
from open_clip_medclip.shards.validate import (
    Problem,
    ValidationReport,
    check_provenance,
    check_sample_json,
    validate_shards,
)

SPEC_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = SPEC_DIR / "examples"


def load_schema() -> dict:
    """schema.json as a dict (`$defs.sample` for the per-sample JSON, `$defs.provenance` for provenance.json)."""
    return json.loads((SPEC_DIR / "schema.json").read_text(encoding="utf-8"))


__all__ = ["EXAMPLES_DIR", "SPEC_DIR", "SPEC_VERSION", "Problem", "ValidationReport", "check_provenance",
           "check_sample_json", "load_schema", "validate_shards"]
