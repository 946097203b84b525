"""Small medclip shards for the training tests, written with `webdataset.TarWriter` in the shard format.

Images are real bundled NIH ChestX-ray14 frontal images (downscaled); texts are hand-labelled sentences. The
real shard builder (`medclip shards build`) is used instead where a test needs real-corpus shards.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import webdataset as wds
from PIL import Image

from open_clip_medclip.findings import CHEXPERT_FINDINGS, labels_from_names

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "open_clip_medclip" / "sample_data"
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
    names = [chexpert for nih, chexpert in NIH_TO_CHEXPERT.items() if row.get(nih) == "1"]
    labels = labels_from_names(names)
    return [0.0 if v is None else v for v in labels]


def jpeg_bytes(path: Path, size: int) -> bytes:
    image = Image.open(path).convert("L")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def sentence_entry(text: str, names: tuple[str, ...]) -> dict:
    labels = labels_from_names(names)
    return {"text": text, "labels": [0.0 if v is None else v for v in labels]}


def write_shards(
    out_dir: Path,
    images_per_shard: int = 8,
    image_shards: int = 2,
    paired_shards: int = 0,
    text_shards: int = 1,
    image_size: int = 64,
) -> dict[str, list[str]]:
    """Write image-only, paired and text-only shards plus sizes.json; return the shard paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = nih_rows()
    sizes: dict[str, int] = {}
    written: dict[str, list[str]] = {"image": [], "paired": [], "text": []}
    index = 0
    cursor = 0
    for kind, count in (("image", image_shards), ("paired", paired_shards)):
        for _ in range(count):
            name = f"train-{index:06d}.tar"
            with wds.TarWriter(str(out_dir / name)) as sink:
                for _ in range(images_per_shard):
                    row = rows[cursor % len(rows)]
                    cursor += 1
                    labels = nih_labels(row)
                    key = f"nih__{Path(row['image']).stem}__{kind}"
                    meta = {"kind": kind, "id": row["image"], "source": "nih", "labels": labels, "sentences": [],
                            "meta": {}}
                    sample = {"__key__": key, "jpg": jpeg_bytes(SAMPLE_DIR / "nih_cxr14" / row["image"], image_size)}
                    if kind == "paired":
                        positives = [n for n, v in zip(CHEXPERT_FINDINGS, labels, strict=True) if v == 1.0]
                        own = [sentence_entry(t, n) for t, n in SENTENCES if set(n) & set(positives)][:2]
                        own.append(sentence_entry("comparison is made to the prior study of the same patient .", ()))
                        meta["sentences"] = own
                        sample["txt"] = " ".join(s["text"] for s in own)
                    sample["json"] = json.dumps(meta)
                    sink.write(sample)
            sizes[name] = images_per_shard
            written[kind].append(str(out_dir / name))
            index += 1
    for _ in range(text_shards):
        name = f"train-{index:06d}.tar"
        with wds.TarWriter(str(out_dir / name)) as sink:
            for i, (text, names) in enumerate(SENTENCES):
                entry = sentence_entry(text, names)
                meta = {"kind": "text", "id": f"s{index}-{i}", "source": "handmade", "labels": entry["labels"],
                        "sentences": [entry], "meta": {}}
                sink.write({"__key__": f"handmade__s{index}_{i}__text", "txt": text, "json": json.dumps(meta)})
        sizes[name] = len(SENTENCES)
        written["text"].append(str(out_dir / name))
        index += 1
    (out_dir / "sizes.json").write_text(json.dumps(sizes))
    return written


def brace(paths: list[str]) -> str:
    """`dir/train-{000000..000003}.tar` for consecutive shard paths (as open_clip_train expects)."""
    first, last = Path(paths[0]), Path(paths[-1])
    if len(paths) == 1:
        return str(first)
    return str(first.parent / f"train-{{{first.stem.split('-')[1]}..{last.stem.split('-')[1]}}}.tar")
