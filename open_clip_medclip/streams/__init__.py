"""Label-aware WebDataset streams for MedCLIP training inside OpenCLIP's data machinery.

MedCLIP decouples images and texts: an image without a report is paired at load time with a sentence from a
labelled sentence bank that shares one of its positive findings, so image-only and text-only corpora both feed
training. `get_medclip_wds_dataset` has `open_clip_train.data.get_wds_dataset`'s signature and *is* that function:
`open_clip_medclip.plugins.openclip_data` calls it and splices the MedCLIP stages into the pipeline it builds
(shard lists, resampling, upsampling factors, shard shuffle, node/worker split, `with_epoch` and the batch
arithmetic stay upstream's):

    tar reader (any URL; samples counted per shard) -> seeded sample shuffle -> image-bearing samples ->
    check (the shard validator's own `check_sample`; one decode; its `decoded_image_problems`), skips named ->
    pick a text (own report sentence | bank sentence) -> image transform -> batch -> tokenize, trim to the
    batch's longest text -> pack labels

Start-up reads only the shard index files written beside the shards (`medclip shards build` / `medclip shards
index DIR`): per-shard sample counts by kind, the build's label policy and the sentence bank — plus each build's
small `provenance.json` for the image size the validator checks (the index does not record it) — never an image
shard, once per rank. URLs are anything OpenCLIP/webdataset read: local paths, brace patterns, `::` groups,
`pipe:` commands, `http(s)://`, and fsspec URLs (`s3://` ... with the fsspec backend installed). The index is
looked up at the shards' URL prefix, or given with `--medclip-index LOCATION[::LOCATION...]` (one per group).

Labels travel through OpenCLIP's `(images, texts)` batches packed behind the token ids by
`open_clip_medclip.labels.pack_batch` (small integer codes and a marker column, any token width); the model
subclass in `plugins.label_passthrough` unpacks them. The `--medclip-uncertain` policy is applied exactly once, here,
to the raw codes, after checking it against the build's recorded policy.
"""
from __future__ import annotations

from .stages import get_medclip_wds_dataset

__all__ = ["get_medclip_wds_dataset"]
