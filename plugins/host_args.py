"""Host argument parsing for plain `open_clip_train.main` (autoload) and the checks before a run.

Host names touched: `open_clip_train.params.parse_args` (the trainer's own parser), `open_clip_train.data.
expand_urls` (first shard of `--train-data`), `open_clip_train.distributed.world_info_from_env` (preflight).
Decides whether `--model` is a MedCLIP model (`text_width.is_medclip_model`) and whether the data are MedCLIP
shards; refuses in one line, argparse style.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tarfile

import open_clip_train
import open_clip_train.data
import open_clip_train.params

from open_clip_medclip.errors import USER_ERROR_EXIT_CODE, UserError
from open_clip_medclip.options import MedclipOptions
from open_clip_medclip.streams.faults import ShardSourceError, is_remote_url
from open_clip_medclip.streams.plan import preflight_shards


def is_tar_data(path, dataset_type: str) -> bool:
    """Whether OpenCLIP reads `path` as webdataset tar shards (its `--dataset-type` rule)."""
    if dataset_type == "webdataset":
        return True
    return dataset_type == "auto" and isinstance(path, str) and path.split(".")[-1] == "tar"


def shard_carries_medclip_labels(url: str, timeout: float, max_members: int = 64) -> bool:
    """True when the first `.json` member of shard `url` is a MedCLIP sample record (`kind` and `labels`).

    Reads one shard's first members through `openclip_data.open_url` (local paths, `pipe:`, http(s) and fsspec
    URLs; remote reads with the `timeout`, --medclip-shard-timeout). A shard that cannot be read at all (server down, HTTP
    error, stalled, a failing `pipe:` command) raises `ShardSourceError`: treating it as plain OpenCLIP data would
    train the wrong way, silently. A readable file that is not a tar, or holds no MedCLIP record, is plain data.
    """
    import json

    from open_clip_medclip.plugins.openclip_data import open_url

    from open_clip_medclip.shards.format import KINDS

    stream = None
    try:
        stream = open_url(url, timeout)
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for count, member in enumerate(archive):
                if count >= max_members:
                    return False
                if not member.isfile() or not member.name.endswith(".json"):
                    continue
                handle = archive.extractfile(member)
                record = json.loads(handle.read().decode("utf-8")) if handle else None
                return isinstance(record, dict) and record.get("kind") in KINDS and "labels" in record
    except (tarfile.TarError, ValueError, UnicodeDecodeError):
        return False
    except OSError as exc:  # TimeoutError included
        if not is_remote_url(url):
            return False  # a local file: the trainer names it itself
        raise ShardSourceError(
            f"cannot read the first shard {url} to tell MedCLIP shards from plain OpenCLIP data: "
            f"{type(exc).__name__}: {exc}; check that the shard source is up, then rerun") from None
    finally:
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.close()
    return False


def data_has_medclip_labels(args) -> tuple[bool, str | None]:
    """(are the data MedCLIP shards, the first shard looked at): `--train-data`, else `--val-data`."""
    data = getattr(args, "train_data", None) or getattr(args, "val_data", None)
    if not data or not is_tar_data(data, getattr(args, "dataset_type", "auto")):
        return False, None
    try:
        urls, _ = open_clip_train.data.expand_urls(data)
    except Exception:  # malformed brace notation etc.: the trainer reports it itself
        return False, None
    url = urls[0] if urls else None
    return (bool(url) and shard_carries_medclip_labels(url, MedclipOptions.from_args(args).shard_timeout)), url


def medclip_options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="open_clip_train.main", usage=argparse.SUPPRESS, add_help=False, allow_abbrev=False,
        description="open_clip_medclip (autoload): with --model medclip-* and MedCLIP shards this trainer uses the "
        "semantic matching loss on label-aware streams; the flags below tune it. OpenCLIP's own options follow.")
    MedclipOptions.add_arguments(parser)
    return parser


def host_refusal(message: str, exit_code: int = USER_ERROR_EXIT_CODE):
    """Plain `open_clip_train.main` (autoload) refuses in one line, argparse style, exit 2 (or `exit_code`)."""
    print(f"open_clip_train.main: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(exit_code)


@contextlib.contextmanager
def refused_on_one_line():
    """A `UserError` raised in the block becomes the host front door's one-line refusal (`host_refusal`)."""
    try:
        yield
    except UserError as exc:
        host_refusal(str(exc), exc.exit_code)


def preflight(args, program: str) -> None:
    """`streams.preflight_shards` with the world size the trainer will find (torchrun/SLURM/MPI environment):
    missing shards and too few shards for ranks x workers are one line before the model is built."""
    from open_clip_train.distributed import world_info_from_env

    _, rank, world_size = world_info_from_env()
    note = preflight_shards(args, max(1, world_size))
    if note and rank == 0:
        print(f"{program}: note: {note}", file=sys.stderr, flush=True)


def trainer_parse_args(argv: list[str]):
    """open_clip_train's own argument parser (flag checks and `medclip train --help`)."""
    return open_clip_train.params.parse_args(argv)


