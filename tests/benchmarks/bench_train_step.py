"""Training step and loader throughput, measured side by side in one run.

1. A whole training step (forward, loss, backward, AdamW step) of a small config, semantic matching loss vs
   plain `ClipLoss` on the same model and batch (the issue's target: <= 1.03x).
2. Loader samples/s: the label-aware stream (decode, pair a sentence, MedCLIP augmentation, tokenize, pack,
   batch) vs a bare JPEG decode loop over the same shard files.

    python tests/benchmarks/bench_train_step.py [--model medclip-tiny] [--batch-size 32] [--steps 8]
        [--shards DIR_WITH_medclip_SHARDS] [--workers 0]

Without --shards, shards are built from the bundled sample (NIH images, IU sentences) with `medclip shards build`.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import open_clip
import torch
from open_clip.loss import ClipLoss
from open_clip_medclip.plugins import openclip_train
from PIL import Image

import open_clip_medclip  # noqa: F401  (registers the models)
from open_clip_medclip.augment import medclip_train_transform
from open_clip_medclip.labels import pack_batch
from open_clip_medclip.loss import SemanticMatchingLoss
from open_clip_medclip.streams.stages import get_medclip_wds_dataset

SAMPLE = Path(open_clip_medclip.__file__).resolve().parent / "sample_data"


def build_sample_shards(out: Path) -> tuple[str, str]:
    from open_clip_medclip.shards.cli import main as shards_main

    shards_main(["build", "--source", "nih", "--csv", str(SAMPLE / "nih_cxr14" / "labels.csv"), "--root",
                 str(SAMPLE / "nih_cxr14"), "--out", str(out / "nih"), "--samples-per-shard", "50", "--no-progress"])
    shards_main(["build", "--source", "iu-reports", "--reports", str(SAMPLE / "iu_reports" / "NLMCXR_reports.tgz"),
                 "--out", str(out / "iu"), "--text-unit", "sentence", "--limit", "300", "--no-progress"])
    return ",".join(sorted(str(p) for p in (out / "nih").glob("*.tar"))), \
        ",".join(sorted(str(p) for p in (out / "iu").glob("*.tar")))


def training_step_ratio(model_name: str, batch_size: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, output_dict=True)
    openclip_train.enable_label_passthrough(model)
    model.train()
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    tokenizer = open_clip.get_tokenizer(model_name)
    tokens = tokenizer([f"the heart is enlarged , case {i} ." for i in range(batch_size)])
    g = torch.Generator().manual_seed(0)
    il, tl = torch.randint(2, (batch_size, 14), generator=g).float(), torch.randint(2, (batch_size, 14), generator=g).float()
    texts = pack_batch(tokens, il, tl)
    images = torch.randn(batch_size, 3, size, size, generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    losses = {"soft": SemanticMatchingLoss(), "clip": ClipLoss()}

    def step(kind: str) -> float:
        start = time.perf_counter()
        out = model(images, texts)
        if kind == "clip":
            out.pop("image_labels"), out.pop("text_labels")
        loss = losses[kind](**out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    step("soft"), step("clip")  # warm-up
    times = {"soft": [], "clip": []}
    for _ in range(steps):
        for kind in ("clip", "soft"):
            times[kind].append(step(kind))
    soft, clip = statistics.median(times["soft"]), statistics.median(times["clip"])
    return {"model": model_name, "batch": batch_size, "soft_step_ms": round(1000 * soft, 1),
            "clip_step_ms": round(1000 * clip, 1), "ratio": round(soft / clip, 3)}


def loader_ratio(image_shards: str, bank_shards: str, batch_size: int, workers: int, image_size: int) -> dict:
    urls = image_shards.split(",")
    args = SimpleNamespace(train_data=urls, val_data=None, train_data_upsampling_factors=None,
                           dataset_resampled=False, train_num_samples=None, val_num_samples=None,
                           batch_size=batch_size, workers=workers, world_size=1, rank=0, seed=0,
                           medclip_uncertain="zeros", medclip_bank_data=bank_shards.replace(",", "::"))
    tokenizer = open_clip.get_tokenizer("medclip-tiny")
    transform = medclip_train_transform(image_size)
    start = time.perf_counter()
    info = get_medclip_wds_dataset(args, transform, is_train=True, tokenizer=tokenizer)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    stream_samples = sum(len(images) for images, _ in info.dataloader)
    stream_seconds = time.perf_counter() - start

    start = time.perf_counter()
    bare_samples = 0
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith((".jpg", ".png")):
                    Image.open(io.BytesIO(tar.extractfile(member).read())).convert("L").load()
                    bare_samples += 1
    bare_seconds = time.perf_counter() - start
    stream_rate, bare_rate = stream_samples / stream_seconds, bare_samples / bare_seconds
    return {"stream_samples_per_s": round(stream_rate, 1), "bare_decode_samples_per_s": round(bare_rate, 1),
            "stream_over_bare": round(stream_rate / bare_rate, 3), "samples": stream_samples, "workers": workers,
            "image_size": image_size, "scan_and_setup_s": round(setup, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medclip-tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--shards", default=None, help="image shards (comma list); default: built from the sample")
    parser.add_argument("--bank-shards", default=None, help="text shards for the sentence bank (comma list)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)

    step = training_step_ratio(args.model, args.batch_size, args.steps)
    print(json.dumps({"benchmark": "train_step", **step}))
    with tempfile.TemporaryDirectory() as tmp:
        image_shards, bank_shards = (args.shards, args.bank_shards) if args.shards else build_sample_shards(Path(tmp))
        loader = loader_ratio(image_shards, bank_shards or image_shards, 16, args.workers, args.image_size)
    print(json.dumps({"benchmark": "loader", **loader}))
    print(f"Training step ({args.model}, batch {args.batch_size}, CPU {torch.get_num_threads()} threads): semantic "
          f"matching loss {step['soft_step_ms']} ms vs ClipLoss {step['clip_step_ms']} ms = {step['ratio']}x. "
          f"Loader: {loader['stream_samples_per_s']} samples/s through the label-aware stream (augment + tokenize, "
          f"{args.workers} workers) vs {loader['bare_decode_samples_per_s']} samples/s bare JPEG decode of the same "
          f"files = {loader['stream_over_bare']}x.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
