"""Labelled WebDataset shards: the writer (`build_shards`), the format constants and the validator.

The format is specified in `tarballs_spec/SPEC.md` (installed as `open_clip_medclip.tarballs_spec`).
"""
from open_clip_medclip.shards.builder import BuildError, BuildOptions, BuildSummary, build_shards
from open_clip_medclip.shards.format import SPEC_VERSION, sample_key, shard_name
from open_clip_medclip.shards.images import ImageRejected, load_grayscale, prepare_image
from open_clip_medclip.shards.validate import Problem, ValidationReport, validate_shards

__all__ = [
    "SPEC_VERSION", "BuildError", "BuildOptions", "BuildSummary", "ImageRejected", "Problem", "ValidationReport",
    "build_shards", "load_grayscale", "prepare_image", "sample_key", "shard_name", "validate_shards",
]
