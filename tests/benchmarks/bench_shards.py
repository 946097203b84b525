"""Shard build speed next to a bare decode-resize-encode loop on the same images (run as a script).

    python tests/benchmarks/bench_shards.py [--workers 2] [--image-size 256] [--large N]

Images: the bundled pediatric + NIH sample (800); with --large N also the first N images of
/work/shared/data/kermany_pediatric when present. Prints images/s for each and the ratio build / bare loop.
"""
from __future__ import annotations

import argparse
import io
import itertools
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from open_clip_medclip.shards import BuildOptions, build_shards  # noqa: E402
from open_clip_medclip.sources import Record, iter_nih, iter_pediatric  # noqa: E402

SAMPLE = REPO / "open_clip_medclip" / "sample_data"
SHARED_PEDIATRIC = Path("/work/shared/data/kermany_pediatric")


def bare_loop(paths: list[str], size: int) -> float:
    """Plain Pillow: open, grayscale, thumbnail, JPEG q95 into memory. Returns images/s."""
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("L")
            image.thumbnail((size, size), Image.Resampling.BICUBIC)
            image.save(io.BytesIO(), format="JPEG", quality=95)
    return len(paths) / (time.perf_counter() - started)


def build(records: list[Record], size: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        summary = build_shards(records, Path(folder) / "out", BuildOptions(image_size=size, workers=workers,
                                                                           samples_per_shard=1000, progress=False))
        return summary.written / (time.perf_counter() - started)


def run(name: str, records: list[Record], size: int, workers: int) -> None:
    paths = [r.image_path for r in records]
    bare_loop(paths[:20], size)  # warm the file cache
    bare = bare_loop(paths, size)
    one = build(records, size, 1)
    many = build(records, size, workers) if workers > 1 else one
    print(f"{name}: {len(records)} images, longer side {size}")
    print(f"  bare decode-resize-encode loop : {bare:8.1f} images/s")
    print(f"  shard build, 1 worker          : {one:8.1f} images/s   ratio build/bare = {one / bare:.2f}")
    if workers > 1:
        print(f"  shard build, {workers} workers         : {many:8.1f} images/s   ratio build/bare = {many / bare:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--large", type=int, default=0, help="also N images from ../shared pediatric (0 = skip)")
    args = parser.parse_args()
    bundled = [r for r in itertools.chain(iter_pediatric(SAMPLE / "kermany_pediatric"),
                                          iter_nih(SAMPLE / "nih_cxr14" / "labels.csv")) if isinstance(r, Record)]
    run("bundled pediatric + NIH", bundled, args.image_size, args.workers)
    nih_png = [Record(id=f"png{i}", source="bench", image_path=str(SAMPLE / "odd_inputs" / "00000001_000.png"),
                      labels=bundled[0].labels) for i in range(40)]
    run("NIH 512 px PNG x40", nih_png, args.image_size, args.workers)
    if args.large:
        if not SHARED_PEDIATRIC.is_dir():
            print(f"skipping --large: {SHARED_PEDIATRIC} not present")
            return
        large = [r for r in itertools.islice(iter_pediatric(SHARED_PEDIATRIC), args.large) if isinstance(r, Record)]
        run(f"shared pediatric ({len(large)})", large, args.image_size, args.workers)


if __name__ == "__main__":
    main()
