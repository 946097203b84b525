"""`python -m open_clip_medclip.benchmark eval ...`: LAION CLIP_benchmark with MedCLIP registered.

Every CLIP_benchmark argument passes through unchanged, plus:

- `--model_type` defaults to `medclip` (OpenCLIP's loader with the MedCLIP configs registered);
- `--device cpu|cuda|cuda:N` (CLIP_benchmark has no such flag and takes CUDA whenever there is one), under the
  package's device policy: a requested CUDA device that this machine lacks is a one-line error;
- `--num_workers` (CLIP_benchmark's default 4) is capped at the number of shards of the smallest local `wds/` split
  it reads: a webdataset worker without a shard stops the run ("No samples found in dataset");
- the hooks of `open_clip_medclip.plugins.clip_benchmark`: a built suite's class-specific prompts
  (`wds/custom_templates.json`) and no NaN metrics (acc5 with fewer than 5 classes is left out).

Example (a suite built by `medclip eval build-suite`):

    python -m open_clip_medclip.benchmark eval --model medclip-tiny --pretrained ckpt.pt \\
        --dataset wds/pediatric-pneumonia --dataset_root suites/pediatric/wds --no_amp --output result.json
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from open_clip_medclip import hosted
from open_clip_medclip.errors import USER_ERROR_EXIT_CODE, UserError, debug_requested

PROG = "python -m open_clip_medclip.benchmark"
CLIP_BENCHMARK_DEFAULT_WORKERS = 4


def _value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _pop(argv: list[str], flag: str) -> tuple[list[str], str | None]:
    """argv without `flag VALUE` / `flag=VALUE`, and the value (the last one given)."""
    out, value, skip = [], None, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == flag:
            if i + 1 >= len(argv):
                raise UserError(f"{flag} needs a value, e.g. {flag} cuda")
            value, skip = argv[i + 1], True
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        else:
            out.append(arg)
    return out, value


def _shard_count(root: str, split: str) -> int | None:
    """`<root>/<split>/nshards.txt` of a local wds dataset, or None when it cannot be read here."""
    if "://" in root:
        return None
    try:
        with open(os.path.join(root, split, "nshards.txt"), encoding="utf-8") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def worker_cap(argv: list[str]) -> int | None:
    """The fewest shards among the local `wds/` splits this CLIP_benchmark command reads (None: unknown)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dataset", nargs="+", default=[])
    parser.add_argument("--dataset_root", default="root")
    parser.add_argument("--split", "--test_split", dest="split", default="test")
    parser.add_argument("--train_split", nargs="+", default=["train"])
    parser.add_argument("--task", default="auto")
    known, _ = parser.parse_known_args(argv[1:])
    counts = []
    for dataset in known.dataset:
        if not dataset.startswith("wds/"):
            continue
        name = dataset.split("/", 1)[1]
        root = known.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))
        splits = [known.split] + (list(known.train_split) if known.task == "linear_probe" else [])
        counts += [c for c in (_shard_count(root, s) for s in splits) if c is not None]
    return min(counts) if counts else None


def prepare_argv(argv: list[str]) -> list[str]:
    """Add `--model_type medclip` when not given and cap `--num_workers` at the shard count (see module doc)."""
    argv = list(argv)
    if not argv or argv[0] != "eval":
        return argv
    if _value(argv, "--model_type") is None:
        argv += ["--model_type", "medclip"]
    cap = worker_cap(argv)
    requested = _value(argv, "--num_workers")
    workers = int(requested) if requested is not None and requested.lstrip("-").isdigit() else None
    effective = CLIP_BENCHMARK_DEFAULT_WORKERS if workers is None else workers
    if cap is not None and effective > max(cap, 1):
        argv, _ = _pop(argv, "--num_workers")
        argv += ["--num_workers", str(max(cap, 1))]
        print(f"{PROG}: --num_workers {effective} -> {max(cap, 1)} (the dataset has {cap} shard(s); "
              "a worker without a shard would stop the run)", file=sys.stderr)
    return argv


@contextlib.contextmanager
def use_device(requested: str | None) -> Iterator[str]:
    """Run CLIP_benchmark on the device the package's policy picks. CLIP_benchmark itself takes 'cuda' (the
    current CUDA device) whenever CUDA is available, so 'cuda:N' selects device N and 'cpu' hides CUDA from it."""
    from unittest import mock

    import torch

    from open_clip_medclip.errors import resolve_device

    device = resolve_device(requested)
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: CLIP_benchmark runs on cuda or cpu")
    if kind == "cuda":
        if ":" in device:
            index = int(device.split(":")[1])
            if index >= torch.cuda.device_count():
                raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
            torch.cuda.set_device(index)
        yield device
    elif torch.cuda.is_available():
        with mock.patch.object(torch.cuda, "is_available", return_value=False):
            yield device
    else:
        yield device


def run(argv: list[str]) -> int:
    argv, device = _pop([a for a in argv if a != "--debug"], "--device")
    if not argv or argv[0] != "eval" or any(a in ("-h", "--help") for a in argv):
        device = None  # help and `build` need no device
    cb_cli = hosted.piece("clip_benchmark_cli")()
    argv = prepare_argv(argv)
    saved = sys.argv
    sys.argv = ["clip_benchmark", *argv]  # CLIP_benchmark's parser reads sys.argv
    try:
        with use_device(device) if argv and argv[0] == "eval" else contextlib.nullcontext():
            cb_cli.main()
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except UserError as exc:
        if debug_requested(argv):
            raise
        print(f"{PROG}: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


if __name__ == "__main__":
    raise SystemExit(main())
