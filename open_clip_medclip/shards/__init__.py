"""Labelled WebDataset shards: the writer (`build_shards`), the format constants, the validator (and its per-sample
`check_sample`, shared with the training streams), the shard index (`read_index`) and part merging.

The format is specified in `tarballs_spec/SPEC.md` (installed as `open_clip_medclip.tarballs_spec`). Names are
imported lazily, so `from open_clip_medclip.shards.index import read_index` does not load the image or source code.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BuildError": "builder", "BuildOptions": "builder", "BuildSummary": "builder", "build_shards": "builder",
    "SPEC_VERSION": "format", "sample_key": "format", "shard_name": "format",
    "ImageRejected": "images", "load_grayscale": "images", "prepare_image": "images",
    "Problem": "validate", "ValidationReport": "validate", "validate_shards": "validate", "check_sample": "validate",
    "ShardIndex": "index", "read_index": "index",
    "merge_builds": "merge", "write_index": "merge",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
