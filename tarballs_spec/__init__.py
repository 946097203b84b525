"""The shard format as a contract: SPEC.md, schema.json and examples/ as package data, the validator and the
per-sample check the streams share with it, and the shard-index reader."""
from __future__ import annotations

import json
from pathlib import Path

from open_clip_medclip.shards.format import SPEC_VERSION
from open_clip_medclip.shards.index import INDEX_VERSION, ShardIndex, index_problems, read_index
from open_clip_medclip.shards.validate import (
    Problem,
    ValidationReport,
    check_provenance,
    check_sample,
    check_sample_json,
    validate_shards,
)

SPEC_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = SPEC_DIR / "examples"


def load_schema() -> dict:
    """schema.json as a dict (`$defs.sample`: per-sample JSON, `$defs.provenance`: provenance.json, `$defs.index`:
    index.json, `$defs.checksums_line`: a line of index-samples.jsonl)."""
    return json.loads((SPEC_DIR / "schema.json").read_text(encoding="utf-8"))


__all__ = ["EXAMPLES_DIR", "INDEX_VERSION", "SPEC_DIR", "SPEC_VERSION", "Problem", "ShardIndex", "ValidationReport",
           "check_provenance", "check_sample", "check_sample_json", "index_problems", "load_schema", "read_index",
           "validate_shards"]
