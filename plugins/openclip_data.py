"""Host glue for data: the only place that touches `open_clip_train.data` and `webdataset` internals.

The label-aware streams call upstream's `get_wds_dataset` and splice their stages into the pipeline it built
(plugins/README.md lists what stays upstream's): a counting tar reader for any URL, a seeded shuffle, the MedCLIP tail.
Every attribute used is checked at import (`check_host`; `open_clip.__version__` names the installed host); a
pipeline that no longer has the expected shape fails with `HostMismatchError` naming the stage, never silently.
"""
from __future__ import annotations

import copy
import importlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import open_clip
import open_clip_train.data as ocd
import webdataset as wds
from open_clip_medclip.plugins import HostMismatchError, missing_attributes, require_host

from open_clip_medclip.shards import format as shard_format

wds_filters = importlib.import_module("webdataset.filters")
wds_tar = importlib.import_module("webdataset.tariterators")

_REQUIRED = {
    ocd: ("get_wds_dataset", "tarfile_to_samples_nothrow", "group_by_keys_nothrow"),
    wds: ("DataPipeline", "WebLoader", "batched", "select", "map"),
    wds_filters: ("FilterFunction", "_shuffle", "_select", "_batched"),
    wds_tar: ("tar_file_expander", "tarfile_samples"),
}


def check_host() -> None:
    """Fail loudly, naming each attribute, if an open_clip_train / webdataset internal we use has gone."""
    require_host(missing_attributes(_REQUIRED), "open_clip_torch 3.3.x (open_clip_train) with webdataset 0.2.x",
                 f"open_clip {open_clip.__version__}, webdataset {getattr(wds, '__version__', '?')}",
                 "open_clip_torch>=3.3,<3.4 webdataset>=0.2.86,<1")


check_host()


# Reading shards from any URL
class CheckedHttpBody:
    """An HTTP response body that fails loudly when it ends before its Content-Length (a cut connection), where
    `http.client` would end the stream quietly and leave a tar cut mid-member."""

    def __init__(self, response, url: str, timeout: float) -> None:
        self.response, self.url, self.timeout = response, url, timeout
        length = response.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.response.read(size)
        except TimeoutError:
            raise TimeoutError(f"stalled: no data for {self.timeout:g} s after {self.received} bytes") from None
        self.received += len(data)
        if not data and size != 0 and self.length is not None and self.received < self.length:
            raise OSError(f"truncated body: the connection ended after {self.received} of {self.length} bytes")
        return data

    def close(self) -> None:
        self.response.close()


def open_http(url: str, timeout: float) -> CheckedHttpBody:
    """An http(s) body with a read timeout (no byte for `timeout` seconds raises) and a length check.

    webdataset's own `gopen` runs `curl --retry 30 --retry-delay 2`, which waits a minute on a failing server
    and never times out a stalled read; the stream's retry policy (`streams.ShardFailurePolicy`) decides instead.
    """
    import urllib.error
    import urllib.request

    try:
        response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - the user's own URL
    except urllib.error.HTTPError as exc:
        raise OSError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise OSError(getattr(reason, "strerror", None) or str(reason)) from None
    except TimeoutError:
        raise TimeoutError(f"stalled: no response for {timeout:g} s") from None
    return CheckedHttpBody(response, url, timeout)


class WatchedPipe:
    """A `pipe:` command's output with a stall timeout: when no byte arrives for `timeout` seconds a watchdog
    kills the command (its whole process group: `sh -c '...; sleep'` children too) and the read raises
    `TimeoutError`. webdataset's own pipe waits for a stalled command forever (close waits up to two hours).
    Exit statuses are checked as webdataset does (141, a reader that left early, is not an error)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,  # noqa: S602 - the user's pipe: URL
                                     start_new_session=True)
        self.received, self.last, self.stalled = 0, time.monotonic(), False
        self.finished = threading.Event()
        threading.Thread(target=self._watch, name="medclip-pipe-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while not self.finished.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                self.stalled = True
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                return

    def _stall_error(self) -> TimeoutError:
        return TimeoutError(f"stalled: no data for {self.timeout:g} s after {self.received} bytes; the pipe: command "
                            "was killed")

    def read(self, size: int = -1) -> bytes:
        chunks, wanted = [], size if size is not None and size >= 0 else None
        while wanted is None or wanted > 0:
            chunk = self.proc.stdout.read1(65536 if wanted is None else wanted)
            if self.stalled:
                raise self._stall_error()
            if not chunk:
                break
            self.last = time.monotonic()
            self.received += len(chunk)
            chunks.append(chunk)
            if wanted is not None:
                wanted -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Wait for the command (still under the watchdog) and raise on a failing exit status or a stall."""
        try:
            self.proc.stdout.close()
            status = self.proc.wait()
        finally:
            self.finished.set()
        if self.stalled:
            raise self._stall_error()
        if status not in (0, 141, -signal.SIGPIPE):  # a reader that stopped early
            raise OSError(f"{self.url}: the pipe: command exited with status {status}")


def open_url(url: str, timeout: float | None = None):
    """http(s) and `pipe:` with a stall `timeout` when one is given; any other URL through the library's one
    opener."""
    scheme = shard_format.url_scheme(url)
    if timeout and scheme in ("http", "https"):
        return open_http(url, timeout)
    if timeout and scheme == "pipe":
        return WatchedPipe(url, timeout)
    return shard_format.open_url(url)


def shard_samples(url: str, handler: Callable[[Exception], bool], timeout: float | None = None) -> Iterator[dict]:
    """The samples of one shard, grouped by key as `open_clip_train.data.tarfile_to_samples_nothrow` does.

    Errors (unopenable URL, broken tar) go to `handler` with the URL as the exception's last argument.
    """
    try:
        stream = open_url(url, timeout)
    except Exception as exc:  # noqa: BLE001 - the handler decides
        exc.args = exc.args + (url,)
        if handler(exc):
            return
        raise
    try:
        files = wds_tar.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        # webdataset >= 1.0 ends each shard with an empty marker that open_clip_train 3.3's grouper cannot read
        yield from ocd.group_by_keys_nothrow((f for f in files if "fname" in f), handler=handler)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - a pipe: command's exit status, reported by the handler
                exc.args = exc.args + (url,)
                handler(exc)


def seeded_shuffle(source: Iterable[dict], bufsize: int, initial: int, rng) -> Iterator[dict]:
    """webdataset's sample shuffle buffer with a caller-seeded RNG (`wds.shuffle` seeds from pid and time)."""
    return wds_filters._shuffle(iter(source), bufsize=bufsize, initial=initial, rng=rng)


# Splicing into open_clip_train's own get_wds_dataset
def _is_filter(stage, function) -> bool:
    return isinstance(stage, wds_filters.FilterFunction) and stage.f is function


def _mismatch(what: str, stages: list) -> HostMismatchError:
    shown = ", ".join(getattr(getattr(s, "f", s), "__name__", type(s).__name__) for s in stages)
    return HostMismatchError(
        f"open_clip_train.data.get_wds_dataset built a pipeline without {what} ({shown}); open_clip_medclip "
        "supports open_clip_torch 3.3.x with webdataset 0.2.x. Install 'open_clip_torch>=3.3,<3.4'."
    )


StageBuilder = Callable[..., tuple[Callable, Callable | None, list]]


def spliced_wds_dataset(args, preprocess_img, is_train: bool, epoch: int, floor: bool, tokenizer,
                        shards: list[str], weights: list[float] | None, num_samples: int,
                        build_stages: StageBuilder):
    """`open_clip_train.data.get_wds_dataset` on `shards`, with MedCLIP's stages spliced in.

    `build_stages(shared_epoch=, worker_batches=, shuffle=(bufsize, initial) | None)` returns
    `(reader, shuffle_stage | None, tail)`: the tar reader (a stage over `{"url": ...}` dicts), the sample shuffle
    (train only) and the stages from sample selection to batching.
    """
    resampled = bool(getattr(args, "dataset_resampled", False)) and is_train
    host = copy.copy(args)
    # upstream expands a `::`-joined string (a list only together with upsampling factors)
    urls = list(shards) if resampled else "::".join(shards)
    if not resampled and any("::" in u or "{" in u for u in shards):
        raise HostMismatchError(f"shard URLs with '::' or braces cannot be passed to open_clip_train: {shards}")
    if is_train:
        host.train_data = urls
        host.train_num_samples = args.train_num_samples or num_samples
        # ResampledShards2 only expands a URL list together with weights: uniform ones when none are given
        host.train_data_upsampling_factors = (list(weights) if weights is not None else [1.0] * len(shards)) \
            if resampled else None
    else:
        host.val_data = urls
    info = ocd.get_wds_dataset(host, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=tokenizer)

    loader = info.dataloader
    inner = getattr(loader, "pipeline", [None])[0]
    dataset = getattr(inner, "dataset", None)
    if not isinstance(dataset, wds.DataPipeline):
        raise _mismatch("a WebLoader over a DataPipeline", [loader])
    stages = dataset.pipeline
    reader_at = next((i for i, s in enumerate(stages)
                      if s is ocd.tarfile_to_samples_nothrow or _is_filter(s, wds_tar.tarfile_samples)), None)
    if reader_at is None:
        raise _mismatch("a tar reader stage", stages)
    shuffle = None
    tail_at = reader_at + 1
    if is_train:
        if tail_at >= len(stages) or not _is_filter(stages[tail_at], wds_filters._shuffle):
            raise _mismatch("the sample shuffle after the tar reader", stages)
        shuffle = tuple(stages[tail_at].args[:2]) if len(stages[tail_at].args) >= 2 else (
            stages[tail_at].kw.get("bufsize"), stages[tail_at].kw.get("initial"))
        tail_at += 1
    if not (tail_at < len(stages) and _is_filter(stages[tail_at], wds_filters._select)
            and _is_filter(stages[-1], wds_filters._batched)):
        raise _mismatch("select ... batched after the reader", stages)
    worker_batches = dataset.nsamples if dataset.nsamples > 0 else None
    reader, shuffle_stage, tail = build_stages(shared_epoch=info.shared_epoch, worker_batches=worker_batches,
                                               shuffle=shuffle)
    new_stages = stages[:reader_at] + [reader]
    if is_train:
        new_stages.append(shuffle_stage)
    dataset.pipeline = new_stages + list(tail)
    return info
