"""Regenerate `tarballs_spec/examples/` from the bundled real sample (a few KB; run after a format change):

    python -m open_clip_medclip.tarballs_spec.make_examples

Mixed kinds in one build: 3 NIH and 3 pediatric images (image kind, 64 px) and the CheXpert labeler's 4 sample
reports (text kind, labels from its own output), through the same `build_shards` the CLI uses.
"""
from __future__ import annotations

import itertools
import shutil
from pathlib import Path

from open_clip_medclip.shards.builder import BuildOptions, build_shards
from open_clip_medclip.sources import SAMPLE_DATA_DIR, iter_labelled_csv, iter_nih, iter_pediatric


def make_examples(out_dir: Path) -> None:
    data = SAMPLE_DATA_DIR
    items = itertools.chain(
        itertools.islice(iter_nih(data / "nih_cxr14" / "labels.csv"), 3),
        itertools.islice(iter_pediatric(data / "kermany_pediatric"), 3),
        iter_labelled_csv(data / "chexpert_labeler" / "labeled_reports.csv", source="chexpert-labeler-sample"),
    )
    options = BuildOptions(kinds=("image", "text"), image_size=64, samples_per_shard=5, prefix="example",
                           uncertainty="raw", progress=False)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    summary = build_shards(items, out_dir, options)
    print(summary.line())


if __name__ == "__main__":
    make_examples(Path(__file__).resolve().parent / "examples")
