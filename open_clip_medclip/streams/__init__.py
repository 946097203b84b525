"""Label-aware WebDataset streams for MedCLIP training inside OpenCLIP's data machinery.

MedCLIP decouples images and texts: an image without a report is paired at load time with a bank sentence that
shares one of its positive findings, so image-only and text-only corpora both feed training.
`get_medclip_wds_dataset` has `open_clip_train.data.get_wds_dataset`'s signature and calls it, splicing the MedCLIP
stages into the pipeline upstream builds (`plugins/openclip_data.py`):

    tar reader (any URL, counted per shard) -> seeded sample shuffle -> check (the shard validator's own checks,
    one decode) -> pick a text (own report | bank sentence) -> image transform -> batch -> tokenize, trim -> pack labels

Start-up reads only the shard indexes (and each build's small `provenance.json`), never an image shard (`plan.py`).
Labels travel packed behind the token ids (`labels.pack_batch`); the `--medclip-uncertain` policy is applied once.
"""
from __future__ import annotations

from .stages import get_medclip_wds_dataset

__all__ = ["get_medclip_wds_dataset"]
