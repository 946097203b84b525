"""Training throughput: samples/s and the fraction of step time spent waiting for data, logged per epoch.

`TimedLoader` wraps a trainer dataloader and times each `next()`; `log_throughput` writes one line to the log,
one JSON line to `<logs>/<name>/medclip_throughput.jsonl` and, when given, two tensorboard scalars. Used by the
trainer glue around open_clip_train's `train_one_epoch`; nothing here touches OpenCLIP internals.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator

log = logging.getLogger("open_clip_medclip")

THROUGHPUT_FILE = "medclip_throughput.jsonl"


class TimedLoader:
    """Wraps a DataInfo's dataloader; counts batches, samples and seconds spent in `next()`."""

    def __init__(self, dataloader) -> None:
        self.dataloader = dataloader
        self.num_batches = dataloader.num_batches
        self.num_samples = dataloader.num_samples
        self.wait_seconds = 0.0
        self.batches = 0
        self.samples = 0

    def __len__(self) -> int:
        return len(self.dataloader)

    def __getattr__(self, name):
        return getattr(self.dataloader, name)

    def __iter__(self) -> Iterator:
        iterator = iter(self.dataloader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - start
            self.batches += 1
            self.samples += len(batch[0])
            yield batch


def log_throughput(args, epoch: int, loader: TimedLoader, seconds: float, tb_writer=None) -> dict:
    """Log and record one epoch's throughput; returns the record."""
    world = getattr(args, "world_size", 1) or 1
    accum = max(1, getattr(args, "accum_freq", 1) or 1)
    stats = {
        "epoch": epoch,
        "steps": loader.batches // accum,
        "samples": loader.samples * world,
        "seconds": round(seconds, 4),
        "samples_per_second": loader.samples * world / seconds if seconds > 0 else 0.0,
        "data_wait_fraction": loader.wait_seconds / seconds if seconds > 0 else 0.0,
    }
    log.info(
        "medclip epoch %d: %.1f samples/s, %.1f%% of step time waiting for data (%d steps, %.1f s)",
        epoch,
        stats["samples_per_second"],
        100 * stats["data_wait_fraction"],
        stats["steps"],
        seconds,
    )
    logs, name = getattr(args, "logs", None), getattr(args, "name", None)
    if logs and name and os.path.isdir(os.path.join(logs, name)):
        with open(os.path.join(logs, name, THROUGHPUT_FILE), "a") as handle:
            handle.write(json.dumps(stats) + "\n")
    if tb_writer is not None:
        step = (epoch + 1) * max(1, loader.num_batches // accum)
        tb_writer.add_scalar("train/medclip_samples_per_second", stats["samples_per_second"], step)
        tb_writer.add_scalar("train/medclip_data_wait_fraction", stats["data_wait_fraction"], step)
    return stats
