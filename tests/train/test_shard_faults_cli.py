"""End to end (issue 24): a shard server process killed mid-epoch ends the run cleanly on both front doors —
one line naming the URL and the error, exit code 3, the checkpoints written so far intact — and `--resume latest`
trains on once the server is back. Servers bind 127.0.0.1; budgets are tiny so each run ends in seconds."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from open_clip_medclip.checkpoints import unreadable_reason
from tests.train.test_host_main import autoload_env  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
FAST = ["--medclip-shard-retries", "1", "--medclip-shard-backoff", "0.05", "--medclip-shard-timeout", "2"]


class ServerProcess:
    """`tests.train.faultserver` in its own process, optionally dying after N shard requests."""

    def __init__(self, folder: Path, tmp_path: Path, die_after: int = 0, port: int = 0) -> None:
        port_file = tmp_path / f"port-{time.monotonic_ns()}"
        command = [sys.executable, "-m", "tests.train.faultserver", str(folder), str(port_file), "--port", str(port),
                   "--lifetime", "240"]
        if die_after:
            command += ["--die-after", str(die_after)]
        self.process = subprocess.Popen(command, cwd=REPO)
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("the shard server did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def _common(tmp_path: Path, data: str) -> list[str]:
    return ["--model", "medclip-tiny", "--train-data", data, "--batch-size", "4", "--workers", "1",
            "--device", "cpu", "--precision", "fp32", "--warmup", "1", "--lr", "1e-4", "--logs", str(tmp_path),
            "--name", "run", "--seed", "0", "--dataset-type", "webdataset", *FAST]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _data(server: ServerProcess) -> str:
    return f"{server.url}/train-{{000000..000003}}.tar"


@pytest.mark.slow
def test_medclip_train_stops_when_the_server_dies_and_resumes_after(tmp_path, small_shards):
    # 3 image shards an epoch: the server dies at the second shard of epoch 2 (after epoch_1.pt was written)
    server = ServerProcess(small_shards["dir"], tmp_path, die_after=4)
    try:
        argv = [sys.executable, "-m", "open_clip_medclip.train", *_common(tmp_path, _data(server)), "--epochs", "3"]
        started = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
        seconds = time.monotonic() - started
    finally:
        server.stop()
    assert result.returncode == 3, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("medclip train: stopping: ") and f"last: {server.url}/train-" in last, last
    assert "Connection refused" in last and "--resume latest" in last, last
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert seconds < 240
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.pt")) == ["epoch_1.pt"]
    assert unreadable_reason(str(folder / "epoch_1.pt")) is None
    log = (tmp_path / "run" / "out.log").read_text()
    assert sum("Connection refused" in line for line in log.splitlines()) <= 4, log[-4000:]

    server = ServerProcess(small_shards["dir"], tmp_path, port=server.port)  # the source is back
    try:
        resumed = subprocess.run([*argv, "--resume", "latest"], capture_output=True, text=True, timeout=300,
                                 env=_env(), cwd=REPO)
    finally:
        server.stop()
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert sorted(p.name for p in folder.glob("*.pt")) == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    assert "3 checkpoint(s)" in resumed.stdout


@pytest.mark.slow
def test_plain_openclip_stops_when_the_server_dies(tmp_path, small_shards, autoload_env):  # noqa: F811
    server = ServerProcess(small_shards["dir"], tmp_path, die_after=4)
    try:
        argv = [sys.executable, "-m", "open_clip_train.main", *_common(tmp_path, _data(server)), "--epochs", "3"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=autoload_env, cwd=REPO)
    finally:
        server.stop()
    assert result.returncode == 3, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("open_clip_train.main: error: stopping: ") and f"{server.url}/train-" in last, last
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert (tmp_path / "run" / "checkpoints" / "epoch_1.pt").exists()
