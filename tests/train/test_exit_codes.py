"""`medclip train` exit codes tell the truth (issue 24): a host refusal, zero steps trained or zero checkpoints
written is a one-line error and a non-zero exit, never "Trained ... 0 checkpoint(s)" and 0; the summary counts
only checkpoints that load."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from open_clip_medclip import train as medclip_train
from open_clip_medclip.cli import run_command


def _argv(tmp_path: Path, shards: str, name: str, *extra: str) -> list[str]:
    return ["--model", "medclip-tiny", "--train-data", shards, "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--precision", "fp32", "--warmup", "1", "--lr", "1e-4", "--logs", str(tmp_path),
            "--name", name, "--seed", "0", "--train-num-samples", "8", *extra]


def _train(argv: list[str]) -> int:
    return run_command("train", lambda: medclip_train.main(argv), debug=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_shards) -> tuple[Path, str]:
    """A finished 1-epoch run (its folder and the shards)."""
    logs = tmp_path_factory.mktemp("exit_codes")
    assert _train(_argv(logs, small_shards["all"], "done", "--epochs", "1")) == 0
    return logs, small_shards["all"]


def test_existing_experiment_name_is_a_one_line_refusal(finished, capsys):
    logs, shards = finished
    assert _train(_argv(logs, shards, "done", "--epochs", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"medclip train: open_clip_train refused to run: experiment 'done' already exists in "
                       f"{logs / 'done'}; pass a new --name, or --resume latest to continue it")


def test_resuming_a_finished_run_trains_zero_steps_and_says_so(finished, capsys):
    logs, shards = finished
    assert _train(_argv(logs, shards, "done", "--epochs", "1", "--resume", "latest")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medclip train: 0 steps trained: no epoch was left to train: --epochs 1 (resumed from ")


def test_summary_counts_only_checkpoints_that_load(tmp_path, small_shards, capsys):
    assert _train(_argv(tmp_path, small_shards["all"], "run", "--epochs", "1")) == 0
    folder = tmp_path / "run" / "checkpoints"
    (folder / "epoch_5.pt").write_bytes(b"")  # a save killed right after open(): --resume latest skips it
    capsys.readouterr()
    assert _train(_argv(tmp_path, small_shards["all"], "run", "--epochs", "2", "--resume", "latest")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(next(line for line in out if line.startswith("{")))
    assert summary["checkpoints"] == [str(folder / "epoch_1.pt"), str(folder / "epoch_2.pt")]
    assert "2 checkpoint(s)" in out[-1]


def test_no_checkpoint_written_although_saving_was_asked_for():
    args = SimpleNamespace(train_data="x.tar", save_logs=True, checkpoint_path="/logs/run/checkpoints", logs="/logs",
                           resume=None, epochs=1)
    run = SimpleNamespace(args=args, host_result=None, host_messages=[], epochs_run=1, steps=2,
                          torch=SimpleNamespace(saved=[]))
    with pytest.raises(medclip_train.TrainingNotDone, match="0 checkpoints written to /logs/run/checkpoints"):
        medclip_train.check_work_done(run)
    run.torch.saved.append("/logs/run/checkpoints/epoch_1.pt")
    medclip_train.check_work_done(run)
    run.steps = 0
    with pytest.raises(medclip_train.TrainingNotDone, match="0 steps trained: 1 epoch.s. gave no batch"):
        medclip_train.check_work_done(run)
