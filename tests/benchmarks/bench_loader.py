"""Loader benchmark: the label-aware stream vs upstream `open_clip_train.data.get_wds_dataset` on the same shards.

    python tests/benchmarks/bench_loader.py [--machine "2-core CPU dev box, shared"] [--data-dir /tmp/...]

Synthetic shard sets (tiny 32-px grayscale JPEGs, 100 paired samples per shard, a report sentence each, raw
labels, sizes.json and the shard index) are generated once into `--data-dir` (default: the system temp folder)
and reused: 1k samples (10 shards) and 200k samples (2,000 shards).

- samples/s: both loaders on the 1k set (repeated until `--samples`), the same image transform (MedCLIP's
  training augmentation at 64 px) and the same tokenizer (medclip-tiny's), workers 0 and 2;
- time to first batch (start-up + first batch, workers 0) and memory per rank (resident-set growth) on the 1k and
  200k sets: start-up reads only the shard index, so it must not grow with the number of image shards.

Prints the ratios side by side and writes tests/benchmarks/results/bench_loader.json. Goal (issue 12): stream
samples/s >= 0.9x upstream.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import rss_mb  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_loader.json"
PER_SHARD = 100
SENTENCES = [
    ("no acute cardiopulmonary process .", ["No Finding"]),
    ("there is a small right pleural effusion .", ["Pleural Effusion"]),
    ("the heart is moderately enlarged .", ["Cardiomegaly"]),
    ("patchy opacity in the left base may represent pneumonia or atelectasis .", ["Pneumonia", "Atelectasis"]),
    ("mild pulmonary edema , slightly improved since the prior study .", ["Edema"]),
]


def _jpegs(count: int = 16, size: int = 32) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L").save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def make_shards(folder: Path, samples: int) -> str:
    """`folder/synth-{000000..N}.tar` with `samples` paired samples; generated once (index.json marks done)."""
    from open_clip_medclip.labels import values_from_names
    from open_clip_medclip.shards.index import ShardFacts, index_files, write_index_files

    shards = samples // PER_SHARD
    pattern = str(folder / f"synth-{{000000..{shards - 1:06d}}}.tar")
    if (folder / "index.json").exists():
        return pattern
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = _jpegs()
    facts, sizes = [], {}
    for shard in range(shards):
        name = f"synth-{shard:06d}.tar"
        fact = ShardFacts(name)
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(PER_SHARD):
                number = shard * PER_SHARD + i
                text, findings = SENTENCES[number % len(SENTENCES)]
                labels = values_from_names(findings)
                meta = {"id": f"{number:07d}", "kind": "paired", "labels": labels, "meta": {},
                        "sentences": [{"labels": labels, "text": text}], "source": "synth"}
                key = f"synth__{number:07d}__paired"
                members = {"jpg": jpegs[number % len(jpegs)], "json": json.dumps(meta, sort_keys=True).encode(),
                           "txt": text.encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
                fact.add(key, meta, members)
        facts.append(fact)
        sizes[name] = PER_SHARD
    (folder / "sizes.json").write_text(json.dumps(sizes))
    write_index_files(folder, index_files(facts, "raw"), lambda path, data: Path(path).write_bytes(data))
    return pattern


def loader_args(data: str, workers: int, batch_size: int, num_samples: int | None) -> SimpleNamespace:
    return SimpleNamespace(train_data=data, val_data=None, train_data_upsampling_factors=None,
                           dataset_resampled=False, train_num_samples=num_samples, val_num_samples=None,
                           batch_size=batch_size, workers=workers, world_size=1, rank=0, seed=0, model="medclip-tiny",
                           medclip_uncertain="zeros", medclip_bank_data=None, medclip_text_multiple=None)


def build(kind: str, args, transform, tokenizer):
    if kind == "stream":
        from open_clip_medclip.streams.stages import get_medclip_wds_dataset

        return get_medclip_wds_dataset(args, transform, is_train=True, tokenizer=tokenizer)
    import open_clip_train.data as ocd

    if not getattr(ocd.tar_file_expander, "medclip_bench_fix", False):
        # webdataset 0.2.111 ends each shard with an empty EOF-marker dict that open_clip_train 3.3's grouper
        # cannot read (KeyError 'fname'); drop the markers so upstream runs at all (benchmark-only patch; the
        # stream's reader does the same in plugins/openclip_data.py)
        expander = ocd.tar_file_expander

        def without_markers(*args, **kwargs):
            return (f for f in expander(*args, **kwargs) if "fname" in f)

        without_markers.medclip_bench_fix = True
        ocd.tar_file_expander = without_markers
    return ocd.get_wds_dataset(args, transform, is_train=True, tokenizer=tokenizer)


def throughput(kind: str, data: str, workers: int, samples: int, batch_size: int, transform, tokenizer) -> float:
    """Samples/s over one epoch of `samples`, after the first batch (start-up and worker spawn excluded)."""
    info = build(kind, loader_args(data, workers, batch_size, samples), transform, tokenizer)
    iterator = iter(info.dataloader)
    next(iterator)
    start, seen = time.perf_counter(), 0
    for images, _ in iterator:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def first_batch(kind: str, data: str, batch_size: int, transform, tokenizer) -> tuple[float, float]:
    """(seconds from dataset construction to the first batch, resident-set growth in MB), workers 0."""
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    info = build(kind, loader_args(data, 0, batch_size, None), transform, tokenizer)
    next(iter(info.dataloader))
    return time.perf_counter() - start, rss_mb() - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machine", default="2-core CPU dev box, shared")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "medclip_bench_loader"))
    parser.add_argument("--samples", type=int, default=3000, help="samples per throughput measurement")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs per setting (best kept)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import logging

    import open_clip

    import open_clip_medclip  # noqa: F401
    from open_clip_medclip.augment import medclip_train_transform

    logging.getLogger("open_clip_medclip").setLevel(logging.WARNING)
    root = Path(args.data_dir)
    start = time.perf_counter()
    small = make_shards(root / "1k", 1_000)
    large = make_shards(root / "200k", 200_000)
    generate_s = time.perf_counter() - start
    transform = medclip_train_transform(64)
    tokenizer = open_clip.get_tokenizer("medclip-tiny")

    rates = {}
    for workers in (0, 2):
        for kind in ("upstream", "stream"):
            rates[(kind, workers)] = max(throughput(kind, small, workers, args.samples, args.batch_size, transform,
                                                    tokenizer) for _ in range(args.repeats))
    startup = {}
    for name, data in (("1k", small), ("200k", large)):
        for kind in ("upstream", "stream"):
            startup[(kind, name)] = first_batch(kind, data, args.batch_size, transform, tokenizer)

    print(f"loader benchmark on {args.machine}; shard sets generated/reused in {generate_s:.1f} s under {root}")
    print(f"{'samples/s':24s} {'upstream':>10s} {'stream':>10s} {'ratio':>7s}")
    throughput_rows = []
    for workers in (0, 2):
        up, ours = rates[("upstream", workers)], rates[("stream", workers)]
        print(f"{f'workers {workers}':24s} {up:10.1f} {ours:10.1f} {ours / up:7.2f}")
        throughput_rows.append({"workers": workers, "upstream_samples_per_s": round(up, 1),
                                "stream_samples_per_s": round(ours, 1), "ratio": round(ours / up, 3)})
    print(f"{'first batch (s) / MB':24s} {'upstream':>10s} {'stream':>10s} {'ratio':>7s} {'up MB':>7s} "
          f"{'stream MB':>9s}")
    startup_rows = []
    for name, shards in (("1k", 10), ("200k", 2000)):
        (up_s, up_mb), (our_s, our_mb) = startup[("upstream", name)], startup[("stream", name)]
        print(f"{f'{name} ({shards} shards)':24s} {up_s:10.2f} {our_s:10.2f} {our_s / up_s:7.2f} {up_mb:7.1f} "
              f"{our_mb:9.1f}")
        startup_rows.append({"set": name, "shards": shards, "upstream_first_batch_s": round(up_s, 3),
                             "stream_first_batch_s": round(our_s, 3), "upstream_rss_growth_mb": round(up_mb, 1),
                             "stream_rss_growth_mb": round(our_mb, 1)})
    growth = startup[("stream", "200k")][0] / startup[("stream", "1k")][0]
    print(f"stream time to first batch, 200k set / 1k set: {growth:.2f}x (200x the shards)")
    goals = {"samples_per_s>=0.9x": all(r["ratio"] >= 0.9 for r in throughput_rows)}
    print("goals:", ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in goals.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "bench_loader", "machine": args.machine, "batch_size": args.batch_size,
        "throughput_samples": args.samples, "image_transform": "MedCLIP training augmentation, 64 px",
        "tokenizer": "medclip-tiny (Bio_ClinicalBERT)", "throughput": throughput_rows, "first_batch": startup_rows,
        "stream_first_batch_200k_over_1k": round(growth, 3), "goals": goals,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
