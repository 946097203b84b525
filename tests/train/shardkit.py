"""Small medclip shards for the training tests, written with `webdataset.TarWriter` in the shard format.

Images are real bundled NIH ChestX-ray14 frontal images (downscaled); texts are hand-labelled sentences. Labels
are raw (blank = null, the builder's default policy) and the shard index is written beside the shards with the
index module's own writer, as `medclip shards build` does. The real shard builder is used instead where a test
needs real-corpus shards.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import torch
import webdataset as wds
from PIL import Image

from open_clip_medclip.findings import CHEXPERT_FINDINGS
from open_clip_medclip.labels import values_from_names
from open_clip_medclip.shards.format import sample_key
from open_clip_medclip.sources import SAMPLE_DATA_DIR

SAMPLE_DIR = SAMPLE_DATA_DIR
NIH_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "No Finding": "No Finding",
}

SENTENCES: list[tuple[str, tuple[str, ...]]] = [
    ("there is a focal consolidation in the right lower lobe consistent with pneumonia .", ("Pneumonia", "Consolidation")),
    ("patchy opacity in the left base may represent pneumonia .", ("Pneumonia", "Lung Opacity")),
    ("findings are concerning for multifocal pneumonia .", ("Pneumonia",)),
    ("the lungs are clear without focal consolidation .", ("No Finding",)),
    ("no acute cardiopulmonary abnormality is seen .", ("No Finding",)),
    ("heart size and mediastinal contours are within normal limits .", ("No Finding",)),
    ("the heart is moderately enlarged .", ("Cardiomegaly",)),
    ("small bilateral pleural effusions are present .", ("Pleural Effusion",)),
    ("there is a small right apical pneumothorax .", ("Pneumothorax",)),
    ("mild pulmonary edema is noted .", ("Edema",)),
    ("a right internal jugular catheter terminates in the svc .", ("Support Devices",)),
    ("bibasilar atelectasis is present .", ("Atelectasis",)),
]


def nih_rows(limit: int | None = None) -> list[dict]:
    with open(SAMPLE_DIR / "nih_cxr14" / "labels.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "train"]
    return rows[:limit] if limit else rows


def nih_labels(row: dict) -> list[float | None]:
    """Raw values: the NIH findings positive, the others blank (NIH labels say nothing about them)."""
    return values_from_names([chexpert for nih, chexpert in NIH_TO_CHEXPERT.items() if row.get(nih) == "1"])


def jpeg_bytes(path: Path, size: int) -> bytes:
    image = Image.open(path).convert("L")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def sentence_entry(text: str, names: tuple[str, ...]) -> dict:
    return {"text": text, "labels": values_from_names(names)}


def write_index(out_dir: Path, samples: dict[str, list[dict]], policy: str = "raw") -> None:
    """The shard index for {shard name: [webdataset sample dicts]}, written by the index module's writer."""
    from open_clip_medclip.shards.index import ShardFacts, index_files, write_index_files

    facts = []
    for name, shard_samples in samples.items():
        shard = ShardFacts(name)
        for sample in shard_samples:
            members = {k: (v.encode() if isinstance(v, str) else v) for k, v in sample.items() if k != "__key__"}
            shard.add(sample["__key__"], json.loads(members["json"]), members)
        facts.append(shard)
    write_index_files(out_dir, index_files(facts, policy), lambda path, data: Path(path).write_bytes(data))


def write_shards(
    out_dir: Path,
    images_per_shard: int = 8,
    image_shards: int = 2,
    paired_shards: int = 0,
    text_shards: int = 1,
    image_size: int = 64,
    index: bool = True,
) -> dict[str, list[str]]:
    """Write image-only, paired and text-only shards, sizes.json and the shard index; return paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = nih_rows()
    written: dict[str, list[str]] = {"image": [], "paired": [], "text": []}
    samples: dict[str, list[dict]] = {}
    index_number = 0
    cursor = 0
    for kind, count in (("image", image_shards), ("paired", paired_shards)):
        for _ in range(count):
            name = f"train-{index_number:06d}.tar"
            samples[name] = []
            for _ in range(images_per_shard):
                row = rows[cursor % len(rows)]
                cursor += 1
                labels = nih_labels(row)
                record_id = f"{row['image']}#{cursor}"
                meta = {"kind": kind, "id": record_id, "source": "nih", "labels": labels, "sentences": [],
                        "meta": {}}
                sample = {"__key__": sample_key("nih", record_id, kind),
                          "jpg": jpeg_bytes(SAMPLE_DIR / "nih_cxr14" / row["image"], image_size)}
                if kind == "paired":
                    positives = [n for n, v in zip(CHEXPERT_FINDINGS, labels, strict=True) if v == 1.0]
                    own = [sentence_entry(t, n) for t, n in SENTENCES if set(n) & set(positives)][:2]
                    own.append(sentence_entry("comparison is made to the prior study of the same patient .", ()))
                    meta["sentences"] = own
                    sample["txt"] = " ".join(s["text"] for s in own)
                sample["json"] = json.dumps(meta, sort_keys=True)
                samples[name].append(sample)
            written[kind].append(str(out_dir / name))
            index_number += 1
    for _ in range(text_shards):
        name = f"train-{index_number:06d}.tar"
        samples[name] = []
        for i, (text, names) in enumerate(SENTENCES):
            entry = sentence_entry(text, names)
            meta = {"kind": "text", "id": f"s{index_number}-{i}", "source": "handmade", "labels": entry["labels"],
                    "sentences": [entry], "meta": {}}
            samples[name].append({"__key__": sample_key("handmade", meta["id"], "text"), "txt": text,
                                  "json": json.dumps(meta, sort_keys=True)})
        written["text"].append(str(out_dir / name))
        index_number += 1
    for name, shard_samples in samples.items():
        with wds.TarWriter(str(out_dir / name)) as sink:
            for sample in shard_samples:
                sink.write(sample)
    (out_dir / "sizes.json").write_text(json.dumps({name: len(s) for name, s in samples.items()}))
    if index:
        write_index(out_dir, samples)
    return written


def brace(paths: list[str]) -> str:
    """`dir/train-{000000..000003}.tar` for consecutive shard paths (as open_clip_train expects)."""
    first, last = Path(paths[0]), Path(paths[-1])
    if len(paths) == 1:
        return str(first)
    return str(first.parent / f"train-{{{first.stem.split('-')[1]}..{last.stem.split('-')[1]}}}.tar")


def rewrite_member(tar_path: str | Path, member: str, change) -> None:
    """Rewrite one member of a shard in place: `change(bytes) -> bytes` (fault injection; the index is kept)."""
    import tarfile

    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == member:
                data = change(data)
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def member_names(tar_path: str | Path) -> list[str]:
    import tarfile

    with tarfile.open(tar_path) as tar:
        return [info.name for info in tar if info.isfile()]


def cut_tar_before(tar_path: str | Path, member: str) -> None:
    """Truncate a shard at the header of `member` (a cut at a member boundary, no end-of-archive blocks)."""
    import tarfile

    with tarfile.open(tar_path) as tar:
        offset = next(info.offset for info in tar if info.name == member)
    with open(tar_path, "r+b") as handle:
        handle.truncate(offset)


def stream_args(shards: str, **overrides) -> SimpleNamespace:
    """The OpenCLIP args `get_medclip_wds_dataset` reads, for a small CPU stream (one rank, batches of 4)."""
    args = dict(train_data=shards, val_data=None, train_data_upsampling_factors=None, dataset_resampled=False,
                train_num_samples=None, val_num_samples=None, batch_size=4, workers=0, world_size=1, rank=0,
                seed=0, medclip_uncertain="zeros", medclip_bank_data=None, medclip_text_multiple=0)
    args.update(overrides)
    return SimpleNamespace(**args)


def fake_tokenizer(texts):
    """Token ids that tell the batch's first text length (77 wide)."""
    return torch.full((len(texts), 77), len(texts[0]), dtype=torch.long)


def fake_image(pil):
    """A tiny image tensor that carries the decoded width."""
    return torch.zeros(3, 8, 8) + pil.size[0]
