"""Shard build speed next to a bare decode-resize-encode loop on the same images (run as a script).

    python tests/benchmarks/bench_shards.py [--workers 2] [--image-size 256] [--large N] [--pediatric DIR]
                                            [--out PATH | --no-out] [--machine TEXT]

Images: the bundled pediatric + NIH sample (800) and one 512 px NIH PNG ×40; with --large N also the first N
images of a Kermany-layout pediatric folder: --pediatric DIR, by default the repo-relative shared-data convention
`../shared/data/kermany_pediatric` (beside the repository; skipped with a message when it is not there).
Prints images/s for each and the ratio build / bare loop (measured side by side in one run, so the ratio holds
on a busy machine when the absolute numbers do not); writes them to tests/benchmarks/results/bench_shards.json.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import add_output_arguments, write_results  # noqa: E402

from open_clip_medclip.shards import BuildOptions, build_shards  # noqa: E402
from open_clip_medclip.sources import (  # noqa: E402
    SAMPLE_DATA_DIR,
    Record,
    iter_nih,
    iter_pediatric,
)

SAMPLE = SAMPLE_DATA_DIR
SHARED_DATA = REPO.parent / "shared" / "data"  # the repo-relative ../shared convention (tests/conftest.py too)


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


def run(name: str, records: list[Record], size: int, workers: int) -> dict:
    paths = [r.image_path for r in records]
    bare_loop(paths[:20], size)  # warm the file cache
    bare = bare_loop(paths, size)
    one = build(records, size, 1)
    many = build(records, size, workers) if workers > 1 else one
    print(f"{name}: {len(records)} images, longer side {size}")
    print(f"  bare decode-resize-encode loop : {bare:8.1f} images/s")
    print(f"  shard build, 1 worker          : {one:8.1f} images/s   ratio build/bare = {one / bare:.2f}")
    result = {"images": len(records), "image_size": size, "bare_loop_images_per_s": bare,
              "build_1_worker_images_per_s": one, "ratio_build_1_worker_to_bare": one / bare}
    if workers > 1:
        print(f"  shard build, {workers} workers         : {many:8.1f} images/s   ratio build/bare = {many / bare:.2f}")
        result.update({f"build_{workers}_workers_images_per_s": many, f"ratio_build_{workers}_workers_to_bare":
                       many / bare})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--large", type=int, default=0, help="also N images from --pediatric (0 = skip)")
    parser.add_argument("--pediatric", type=Path, default=SHARED_DATA / "kermany_pediatric",
                        help="Kermany-layout pediatric folder for --large (default: ../shared/data/kermany_pediatric "
                             "beside the repository)")
    add_output_arguments(parser, "bench_shards")
    args = parser.parse_args(argv)
    results = {}
    bundled = [r for r in itertools.chain(iter_pediatric(SAMPLE / "kermany_pediatric"),
                                          iter_nih(SAMPLE / "nih_cxr14" / "labels.csv")) if isinstance(r, Record)]
    results["bundled pediatric + NIH"] = run("bundled pediatric + NIH", bundled, args.image_size, args.workers)
    nih_png = [Record(id=f"png{i}", source="bench", image_path=str(SAMPLE / "odd_inputs" / "00000001_000.png"),
                      labels=bundled[0].labels) for i in range(40)]
    results["NIH 512 px PNG x40"] = run("NIH 512 px PNG x40", nih_png, args.image_size, args.workers)
    notes = []
    if args.large:
        if not args.pediatric.is_dir():
            message = (f"skipped --large {args.large}: {args.pediatric} is not a folder (pass --pediatric DIR, or "
                       f"put the shared data beside the repository as ../shared/data)")
            print(message)
            notes.append(message)
        else:
            large = [r for r in itertools.islice(iter_pediatric(args.pediatric), args.large) if isinstance(r, Record)]
            name = f"pediatric from {args.pediatric.name} ({len(large)})"
            results[name] = run(name, large, args.image_size, args.workers)
    write_results(args, results, argv, __file__, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
