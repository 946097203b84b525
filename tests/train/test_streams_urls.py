"""2-process gloo `torchrun` training from shards served by a local HTTP server and read through `pipe:cat`."""
from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(small_shards):
    """The small shard folder on http://127.0.0.1:PORT/ (stopped when the test ends)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(small_shards["dir"])))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _shard_names(small_shards) -> list[str]:
    return [Path(p).name for p in small_shards["image"] + small_shards["paired"] + small_shards["text"]]


def _torchrun(tmp_path: Path, data: str, name: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "open_clip_medclip.train", "--",
        "--model", "medclip-tiny", "--train-data", data, "--batch-size", "2", "--workers", "1",
        "--epochs", "1", "--device", "cpu", "--precision", "fp32", "--warmup", "1", "--lr", "1e-4",
        "--log-every-n-steps", "1", "--logs", str(tmp_path), "--name", name, "--seed", "0",
        "--dist-backend", "gloo", "--dataset-type", "webdataset",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["http", "pipe"])
def test_torchrun_two_processes_train_from_remote_urls(tmp_path: Path, small_shards, served, scheme):
    names = _shard_names(small_shards)
    if scheme == "http":
        data = f"{served}/train-{{000000..{len(names) - 1:06d}}}.tar"
    else:
        data = "::".join(f"pipe:cat {small_shards['dir'] / n}" for n in names)
    result = _torchrun(tmp_path, data, scheme)
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / scheme / "out.log").read_text()
    assert "medclip streams (train): 3 image shards, 24 image samples" in log
    assert "world_size: 2" in (tmp_path / scheme / "params.txt").read_text()
    assert (tmp_path / scheme / "checkpoints" / "epoch_1.pt").exists()
