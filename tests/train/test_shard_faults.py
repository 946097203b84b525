"""Faults of remote shard sources (issue 24): bounded retries with backoff, then one clean stop.

Every server binds 127.0.0.1 (`tests.train.faultserver`); budgets are tiny so each case ends in seconds.
"""
from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

from open_clip_medclip.streams.faults import ShardFailurePolicy, ShardSourceError
from open_clip_medclip.streams.stages import get_medclip_wds_dataset
from tests.train.faultserver import FaultServer
from tests.train.shardkit import fake_image, fake_tokenizer, stream_args

FAST = dict(medclip_shard_retries=2, medclip_shard_timeout=1.0, medclip_shard_backoff=0.01,
            medclip_shard_max_failures=2, medclip_shard_max_skipped=0.5)


def _args(shards: str, **overrides) -> SimpleNamespace:
    return stream_args(shards, **{**FAST, **overrides})


@pytest.fixture
def server(small_shards):
    served = FaultServer(small_shards["dir"])
    yield served
    served.stop()


def _remote(server, small_shards) -> str:
    return f"{server.url}/train-{{000000..{len(small_shards['image']) + len(small_shards['paired']):06d}}}.tar"


def _loader(server, small_shards, **overrides):
    info = get_medclip_wds_dataset(_args(_remote(server, small_shards), **overrides), fake_image, is_train=True,
                                   tokenizer=fake_tokenizer)
    return info.dataloader


def _stop_line(loader, caplog) -> tuple[str, float, list[str]]:
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="open_clip_medclip.streams"), pytest.raises(ShardSourceError) as err:
        for _ in range(3):  # epochs: the old code looped forever here
            list(loader)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return ShardSourceError.line(err.value), time.monotonic() - started, warnings


@pytest.mark.parametrize("mode, error, workers", [("500", "HTTP 500 Internal Server Error", 0),
                                                  ("500", "HTTP 500 Internal Server Error", 1),
                                                  ("truncated", "truncated body: the connection ended after", 0),
                                                  ("stall", "stalled: no data for 1 s", 0)])
def test_failing_server_stops_the_stream_in_one_line(server, small_shards, caplog, mode, error, workers):
    """workers=1: the stop raised in a loader worker reaches the main process, its line recoverable."""
    server.mode = mode
    loader = _loader(server, small_shards, workers=workers)
    line, seconds, warnings = _stop_line(loader, caplog)
    assert line.startswith("stopping: ") and error in line and f"{server.url}/train-" in line, line
    assert "--resume latest" in line and "\n" not in line
    assert seconds < 20, seconds
    # max_failures=2 shards in a row, each read 1 + retries times, then the stop: no further request
    assert len(server.failed) == 2 * (1 + FAST["medclip_shard_retries"]), server.failed
    per_shard = {}
    for message in warnings:
        for url in {u for u in message.split() if u.startswith(server.url)}:
            per_shard[url] = per_shard.get(url, 0) + 1
    assert all(count <= 2 for count in per_shard.values()), warnings  # one warning per shard (+ the summary)


def test_server_killed_mid_epoch_stops_within_the_budget(server, small_shards, caplog):
    # in-process reads: a forked loader worker would hold the test's listening socket open (the end-to-end
    # test in test_shard_faults_cli kills a server process instead)
    loader = _loader(server, small_shards, workers=0)
    batches = iter(loader)
    next(batches)  # the epoch is under way
    server.stop()
    line, seconds, warnings = _stop_line(loader, caplog)
    assert "Connection refused" in line and f"{server.url}/train-" in line, line
    assert seconds < 20 and len(warnings) < 12, (seconds, warnings)


def test_a_shard_that_recovers_is_read_once_without_duplicates(server, small_shards, caplog, monkeypatch):
    """A read cut mid-shard is retried; the samples already delivered are not delivered again."""
    from open_clip_medclip.plugins import openclip_data

    original = openclip_data.open_http
    calls = []

    def flaky(url, timeout):
        calls.append(url)
        if len(calls) == 1:
            server.mode = "truncated"
        else:
            server.mode = "ok"
        return original(url, timeout)

    monkeypatch.setattr(openclip_data, "open_http", flaky)
    loader = _loader(server, small_shards)
    with caplog.at_level(logging.INFO, logger="open_clip_medclip.streams"):
        batches = list(loader)
    assert sum(len(images) for images, _ in batches) == 24
    messages = [r.getMessage() for r in caplog.records]
    assert any("read after 2 attempts" in m for m in messages), messages


def test_policy_share_and_defaults_come_from_the_options():
    from open_clip_medclip.options import SHARD_FAILURE_DEFAULTS

    policy = ShardFailurePolicy.from_args(SimpleNamespace(world_size=2, workers=4), shards=100)
    assert policy.share == 13 and policy.retries == SHARD_FAILURE_DEFAULTS["retries"]
    assert sum(policy.wait(a) for a in range(1, policy.retries + 1)) < 60  # the default budget is a bounded wait
    with pytest.raises(ShardSourceError.__mro__[1], match="--medclip-shard-max-failures must be >= 1"):
        ShardFailurePolicy.from_args(SimpleNamespace(medclip_shard_max_failures=0))


def _pipe_reader(**overrides):
    from open_clip_medclip.streams.stages import ShardReader, StreamStats

    policy = ShardFailurePolicy.from_args(_args("unused", **{**FAST, "medclip_shard_retries": 0,
                                                             "medclip_shard_max_failures": 1, **overrides}))
    return ShardReader(StreamStats({}), policy)


def test_a_stalled_pipe_command_is_killed_and_stops_the_stream(small_shards):
    """`pipe:` shards get the --medclip-shard-timeout too: a command that stops sending bytes is killed (its
    `sleep` child included) and counts as a failed shard, instead of blocking the loader forever."""
    shard = small_shards["dir"] / "train-000000.tar"
    stalled = f"pipe:sh -c 'head -c 3000 {shard}; sleep 60'"
    started = time.monotonic()
    with pytest.raises(ShardSourceError) as err:
        list(_pipe_reader()([{"url": stalled}]))
    assert time.monotonic() - started < 15
    line = ShardSourceError.line(err.value)
    assert "TimeoutError: stalled: no data for 1 s after 3000 bytes" in line and stalled in line
    # a healthy command under the same timeout reads the whole shard
    assert len(list(_pipe_reader()([{"url": f"pipe:cat {shard}"}]))) == 8


def test_an_unreadable_first_shard_is_a_refusal_not_plain_data(server, small_shards, capsys):
    """The autoload reads the first shard to tell MedCLIP shards from plain OpenCLIP data; a shard server that
    answers 500 or is down used to make the run silently plain OpenCLIP data. Now: one line, exit 3."""
    from open_clip_medclip.plugins.host_args import data_has_medclip_labels, refused_on_one_line

    args = SimpleNamespace(train_data=_remote(server, small_shards), val_data=None, dataset_type="auto",
                           medclip_shard_timeout=2.0)
    assert data_has_medclip_labels(args) == (True, f"{server.url}/train-000000.tar")
    server.mode = "500"
    with pytest.raises(ShardSourceError, match=r"cannot read the first shard http://127\.0\.0\.1:\d+/train-000000"
                                               r"\.tar .*: OSError: HTTP 500"):
        data_has_medclip_labels(args)
    server.stop()
    with pytest.raises(SystemExit) as stop, refused_on_one_line():
        data_has_medclip_labels(args)
    line = capsys.readouterr().err.strip()
    assert stop.value.code == 3 and "\n" not in line
    assert line.startswith("open_clip_train.main: error: cannot read the first shard") and "refused" in line
