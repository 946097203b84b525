"""Crash-safe training state (issue 11, deliverable 1): atomic checkpoint writes, `--resume latest` that skips
unreadable files, a clear error for an unreadable `--resume` file; fused AdamW only on CUDA."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from open_clip_medclip.plugins import openclip_train

from open_clip_medclip import checkpoints
from open_clip_medclip import train as medclip_train
from open_clip_medclip.options import MedclipOptions

_SAVER = r'''
import sys, time
import torch

class Slow:
    """Pickled in the middle of the checkpoint: signals the test, then hangs until killed."""
    def __reduce__(self):
        open(sys.argv[2], "w").close()
        time.sleep(120)
        return (int, (0,))

obj = {"epoch": 3, "state_dict": {"w": torch.ones(4096)}, "hang": Slow()}
if sys.argv[3] == "atomic":
    from open_clip_medclip.checkpoints import atomic_save
    atomic_save(obj, sys.argv[1])
else:
    torch.save(obj, sys.argv[1])  # what open_clip_train 3.3 does
'''


def _kill_while_saving(tmp_path: Path, target: Path, mode: str) -> None:
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    ready = tmp_path / f"ready-{mode}-{target.name}"
    assert not ready.exists()
    process = subprocess.Popen([sys.executable, str(script), str(target), str(ready), mode],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the saver never reached the checkpoint write"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


def test_kill_during_save_leaves_no_partial_file_under_the_checkpoint_name(tmp_path: Path):
    good = {"epoch": 2, "state_dict": {"w": torch.zeros(4)}}
    # the fault: an in-place torch.save killed mid-write leaves a file under the final name that cannot be loaded
    inplace = tmp_path / "inplace" / "epoch_3.pt"
    inplace.parent.mkdir()
    _kill_while_saving(tmp_path, inplace, "inplace")
    assert inplace.exists() and checkpoints.unreadable_reason(str(inplace)) is not None

    # atomic: a new checkpoint never appears half-written, an existing one keeps its content
    folder = tmp_path / "atomic"
    folder.mkdir()
    new, existing = folder / "epoch_3.pt", folder / "epoch_2.pt"
    checkpoints.atomic_save(good, str(existing))
    before = existing.read_bytes()
    _kill_while_saving(tmp_path, new, "atomic")
    _kill_while_saving(tmp_path, existing, "atomic")
    assert not new.exists()
    assert existing.read_bytes() == before and torch.load(existing)["epoch"] == 2
    leftovers = sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)
    assert len(leftovers) == 2 and not any(name.endswith(".pt") for name in leftovers)  # invisible to --resume
    # the next save of those names removes the dead run's partial files
    checkpoints.atomic_save(good, str(new))
    checkpoints.atomic_save(good, str(existing))
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_2.pt", "epoch_3.pt"]


def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    target = tmp_path / "epoch_1.pt"

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        openclip_train.TrainerTorch().save({"w": torch.zeros(2)}, str(target))  # open_clip_train's torch.save
    assert list(tmp_path.iterdir()) == []


def test_unreadable_reasons(tmp_path: Path):
    good = tmp_path / "good.pt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.randn(1000)}}, good)
    assert checkpoints.unreadable_reason(str(good)) is None
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert checkpoints.unreadable_reason(str(empty)) == "empty (0 bytes)"
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        truncated = tmp_path / f"cut{cut}.pt"
        truncated.write_bytes(data[:cut])
        assert "truncated" in checkpoints.unreadable_reason(str(truncated)), cut
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    assert "unknown format" in checkpoints.unreadable_reason(str(text))
    chosen, skipped = checkpoints.newest_readable([str(good), str(empty), str(tmp_path / "cut100.pt")])
    assert chosen == str(good) and [Path(p).name for p, _ in skipped] == ["cut100.pt", "empty.pt"]


def _launch(tmp_path: Path, shards: str, name: str, *extra: str) -> Path:
    argv = ["--model", "medclip-tiny", "--train-data", shards, "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--precision", "fp32", "--warmup", "1", "--lr", "1e-4", "--log-every-n-steps", "1",
            "--logs", str(tmp_path), "--name", name, "--seed", "0", "--train-num-samples", "8", *extra]
    assert medclip_train.main(argv) == 0
    return tmp_path / name


def test_resume_latest_skips_unreadable_checkpoints(tmp_path: Path, small_shards):
    run = _launch(tmp_path, small_shards["all"], "run", "--epochs", "1")
    folder = run / "checkpoints"
    good = (folder / "epoch_1.pt").read_bytes()
    (folder / "epoch_2.pt").write_bytes(b"")  # killed right after open()
    (folder / "epoch_3.pt").write_bytes(good[: len(good) // 2])  # killed mid-write
    _launch(tmp_path, small_shards["all"], "run", "--epochs", "2", "--resume", "latest")
    log = (run / "out.log").read_text()
    assert "skipped 2 unreadable checkpoint(s)" in log
    assert f"{folder / 'epoch_3.pt'}: truncated" in log and f"{folder / 'epoch_2.pt'}: empty (0 bytes)" in log
    assert f"resuming from {folder / 'epoch_1.pt'}" in log
    assert f"=> resuming checkpoint '{folder / 'epoch_1.pt'}' (epoch 1)" in log
    assert "Train Epoch: 1" in log
    assert checkpoints.unreadable_reason(str(folder / "epoch_2.pt")) is None  # rewritten by the resumed run
    assert torch.load(folder / "epoch_2.pt", weights_only=False)["epoch"] == 2


def test_resume_from_an_unreadable_file_names_it(tmp_path: Path, small_shards):
    bad = tmp_path / "epoch_7.pt"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 200)
    with pytest.raises(RuntimeError, match=r"--resume .*epoch_7.pt: the checkpoint is truncated or corrupt"):
        _launch(tmp_path, small_shards["all"], "bad", "--epochs", "1", "--resume", str(bad))


def test_trainer_namespace_is_patched_for_a_run_and_restored():
    import open_clip_train.main as host_main

    before = (host_main.torch, host_main.optim, host_main.get_latest_checkpoint, host_main.pt_load)
    with openclip_train.patched_trainer(MedclipOptions()):
        assert isinstance(host_main.torch, openclip_train.TrainerTorch)
        assert host_main.torch.nn is torch.nn and host_main.torch.cuda is torch.cuda
        assert isinstance(host_main.optim, openclip_train.TrainerOptim)
    assert (host_main.torch, host_main.optim, host_main.get_latest_checkpoint, host_main.pt_load) == before


def test_adamw_is_fused_only_for_cuda_parameters():
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = openclip_train.TrainerOptim.AdamW([{"params": params, "weight_decay": 0.0}], lr=1e-3)
    assert not optimizer.defaults.get("fused")  # CPU: torch's default
    if torch.cuda.is_available():
        cuda = [torch.nn.Parameter(torch.zeros(3, device="cuda"))]
        optimizer = openclip_train.TrainerOptim.AdamW([{"params": cuda}], lr=1e-3)
        assert optimizer.defaults["fused"] is True
        optimizer = openclip_train.TrainerOptim.AdamW([{"params": cuda}], lr=1e-3, foreach=True)
        assert not optimizer.defaults.get("fused")  # an explicit choice is kept
