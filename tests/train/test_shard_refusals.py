"""Refusals are one line, before anything is built (issue 24): missing shards ("no such file", with the
pattern) and too few image shards for ranks x loader workers (workers capped and said, or what to do), on both
front doors (`medclip train`, plain `open_clip_train.main` with the autoload)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from open_clip_medclip import train as medclip_train
from open_clip_medclip.cli import run_command
from open_clip_medclip.errors import UserError
from tests.train.test_host_main import autoload_env  # noqa: F401  (fixture)


def _args(data: str, **overrides) -> SimpleNamespace:
    values = dict(train_data=data, val_data=None, medclip_bank_data=None, medclip_index=None,
                  dataset_resampled=False, workers=1)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_unmatched_pattern_and_wildcard_are_no_such_file(small_shards):
    from open_clip_medclip.streams.plan import preflight_shards

    folder = small_shards["dir"]
    pattern = f"{folder}/train-{{000000..000009}}.tar"
    with pytest.raises(UserError) as err:
        preflight_shards(_args(pattern), 1)
    assert str(err.value) == (f"--train-data {pattern!r}: no such file {folder}/train-000004.tar "
                              "(6 of the 10 shards it names are missing)")
    with pytest.raises(UserError, match=r"no such file .*\*\.tar; shard lists take brace notation, not wildcards"):
        preflight_shards(_args(f"{folder}/*.tar"), 1)
    with pytest.raises(UserError, match=r"--medclip-bank-data .*: no such file .*/bank-000000.tar"):
        preflight_shards(_args(small_shards["all"], medclip_bank_data=f"{folder}/bank-000000.tar"), 1)


def test_too_few_shards_caps_the_workers_or_says_what_to_do(small_shards):
    from open_clip_medclip.streams.plan import preflight_shards

    one = small_shards["image"][0]
    args = _args(one, workers=4)
    note = preflight_shards(args, 1)
    assert args.workers == 1 and note.startswith("--workers 4 capped to 1: 1 image shard(s) for 1 rank(s)")
    assert preflight_shards(_args(one, workers=4, dataset_resampled=True), 2) is None  # resampled: any count
    with pytest.raises(UserError) as err:
        preflight_shards(_args(one, workers=1), 2)
    assert str(err.value).startswith("--train-data: 1 image shard(s) for 2 ranks: each rank reads its own shards; "
                                     "pass --dataset-resampled")


def _train(tmp_path: Path, data: str, *extra: str) -> int:
    argv = ["--model", "medclip-tiny", "--train-data", data, "--batch-size", "4", "--device", "cpu",
            "--precision", "fp32", "--logs", str(tmp_path), "--name", "run", "--train-num-samples", "8",
            "--epochs", "1", *extra]
    return run_command("train", lambda: medclip_train.main(argv), debug=False)


def test_medclip_train_refuses_missing_shards_and_too_few_shards_in_one_line(tmp_path, small_shards, capsys,
                                                                            monkeypatch):
    pattern = f"{small_shards['dir']}/train-{{000000..000009}}.tar"
    assert _train(tmp_path, pattern) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medclip train: --train-data {pattern!r}: no such file {small_shards['dir']}/train-000004.tar "
                   "(6 of the 10 shards it names are missing)"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets; refused before init
    assert _train(tmp_path, small_shards["image"][0], "--workers", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medclip train: --train-data: 1 image shard(s) for 2 ranks")
    assert not (tmp_path / "run").exists()  # nothing was built


def test_medclip_train_caps_workers_on_a_single_shard_and_says_so(tmp_path, small_shards, capsys):
    assert _train(tmp_path, small_shards["image"][0], "--workers", "2") == 0
    err = capsys.readouterr().err
    assert "medclip train: note: --workers 2 capped to 1: 1 image shard(s) for 1 rank(s)" in err
    assert (tmp_path / "run" / "checkpoints" / "epoch_1.pt").exists()


@pytest.mark.slow
def test_plain_openclip_front_door_refuses_in_one_line(tmp_path, small_shards, autoload_env):  # noqa: F811
    base = [sys.executable, "-m", "open_clip_train.main", "--model", "medclip-tiny", "--batch-size", "4",
            "--device", "cpu", "--logs", str(tmp_path), "--train-num-samples", "8", "--workers", "1"]
    pattern = f"{small_shards['dir']}/*.tar"
    result = subprocess.run([*base, "--train-data", pattern], env=autoload_env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"open_clip_train.main: error: --train-data {pattern!r}: no such file"), result.stderr[-3000:]
    result = subprocess.run([*base, "--train-data", small_shards["image"][0]], capture_output=True, text=True,
                            env={**autoload_env, "WORLD_SIZE": "2"}, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "open_clip_train.main: error: --train-data: 1 image shard(s) for 2 ranks"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not any(os.scandir(tmp_path))
