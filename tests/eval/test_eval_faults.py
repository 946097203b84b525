"""Fault injection for `medclip eval` (issue 11): each user error is one line naming the problem, exit code 2, no
traceback, and a failed run never replaces the previous run's outputs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from open_clip_medclip import cli as medclip_cli
from open_clip_medclip.eval import cli as eval_cli


def _zeroshot(suite, out, *extra):
    return ["eval", "zeroshot", "--model", "medclip-tiny", "--suite", str(suite), "--out", str(out), "--bootstrap", "0",
            "--no-plots", "--quiet", *extra]


def _stderr_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("medclip eval")]


@pytest.fixture()
def previous_run(tmp_path, tiny_suite, tiny_checkpoint):
    """An output folder holding a previous good run of the tiny suite."""
    out = tmp_path / "out"
    assert eval_cli.main(_zeroshot(tiny_suite, out, "--pretrained", str(tiny_checkpoint), "--device", "cpu")[1:]) == 0
    return out, {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _unchanged(out, before) -> None:
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_missing_image_is_one_line_and_keeps_the_previous_results(previous_run, tiny_suite, tmp_path, capsys):
    out, before = previous_run
    suite = tmp_path / "suite"
    shutil.copytree(tiny_suite, suite)
    victim = sorted((suite / "images").iterdir())[0]
    victim.unlink()
    capsys.readouterr()
    assert medclip_cli.main(_zeroshot(suite, out, "--device", "cpu")) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith(f"medclip eval: {victim}: image {victim.stem} listed in {suite / 'manifest.csv'}")
    assert lines[0].endswith("is missing; restore it or rebuild the suite")
    _unchanged(out, before)


def test_missing_cuda_is_one_line(previous_run, tiny_suite, capsys, monkeypatch):
    out, before = previous_run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    assert medclip_cli.main(_zeroshot(tiny_suite, out, "--device", "cuda")) == 2
    assert _stderr_lines(capsys) == ["medclip eval: --device cuda: this machine has no CUDA device; use --device cpu"]
    _unchanged(out, before)


def test_wrong_model_name_suggests_close_matches(tiny_suite, tmp_path, capsys):
    args = _zeroshot(tiny_suite, tmp_path / "out", "--device", "cpu")
    args[args.index("medclip-tiny")] = "medclip-tinyy"
    assert medclip_cli.main(args) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("medclip eval: unknown model 'medclip-tinyy' (did you mean: ")
    assert "medclip-tiny" in lines[0] and "RN50" not in lines[0]  # close matches only, never the whole registry


def test_missing_checkpoint_is_one_line(tiny_suite, tmp_path, capsys):
    assert medclip_cli.main(_zeroshot(tiny_suite, tmp_path / "out", "--pretrained", str(tmp_path / "nope.pt"),
                                      "--device", "cpu")) == 2
    assert _stderr_lines(capsys) == [f"medclip eval: --pretrained {tmp_path / 'nope.pt'}: no such checkpoint file or folder"]


def test_failure_while_writing_outputs_keeps_the_previous_results(previous_run, tiny_suite, monkeypatch):
    """A crash after the metrics, while the outputs are being written, leaves the previous files in place."""
    out, before = previous_run

    def broken(*args, **kwargs):
        raise RuntimeError("disk full while plotting")

    monkeypatch.setattr(eval_cli, "_plots", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        eval_cli.main(["zeroshot", "--model", "medclip-tiny", "--suite", str(tiny_suite), "--out", str(out),
                       "--bootstrap", "0", "--quiet", "--device", "cpu"])
    _unchanged(out, before)


def test_stale_staging_folders_are_cleaned(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".nih-tiny{eval_cli.STAGING_MARK}{dead.pid}-abc"
    live = out / f".nih-tiny{eval_cli.STAGING_MARK}{os.getppid()}-abc"  # a running process's staging: kept
    stale.mkdir(parents=True)
    live.mkdir()
    assert eval_cli.clean_stale_staging(out) == [stale]
    assert not stale.exists() and live.exists()


def test_python_m_eval_cli_fails_the_same_way(tiny_suite, tmp_path):
    """`python -m open_clip_medclip.eval.cli` (no `medclip` entry point) is one line and exit 2 as well."""
    code = ("import sys, torch; torch.cuda.is_available = lambda: False; sys.argv[0] = 'medclip'; "
            "import runpy; runpy.run_module('open_clip_medclip.eval.cli', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, *_zeroshot(tiny_suite, tmp_path / "out", "--device", "cuda")[1:]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("medclip eval: --device cuda: this machine has no CUDA device; "
                                                    "use --device cpu")
    assert "Traceback" not in proc.stderr
