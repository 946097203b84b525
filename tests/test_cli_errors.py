"""One way of failing: every `medclip` subcommand turns a user error into one line and exit code 2.

Each fault is injected and the exact message checked; bugs keep their traceback; `--debug` / MEDCLIP_DEBUG=1
show it for user errors too. Also the atomic-output helpers (no half-written output, stale temporaries cleaned).
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from open_clip_medclip import atomic, cli
from open_clip_medclip.errors import UserError, resolve_device

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fake_command(monkeypatch):
    """Register `medclip fake`, whose body is whatever the test sets; records the argv it was given."""
    module = types.ModuleType("medclip_fake_command")
    module.calls = []
    module.body = lambda: 0

    def main(argv):
        module.calls.append(list(argv))
        return module.body()

    module.main = main
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", (module.__name__, "a test command"))
    monkeypatch.delenv("MEDCLIP_DEBUG", raising=False)
    return module


def one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err.rstrip("\n")


def raiser(exc: BaseException):
    def body():
        raise exc

    return body


# ------------------------------------------------------------------------------------------------ entry point


def test_unknown_command_suggests_close_matches(capsys):
    assert cli.main(["trian", "--epochs", "1"]) == 2
    assert one_line(capsys) == ("medclip: unknown command 'trian' (did you mean: train?); "
                                "run 'medclip --help' for the list of commands")
    assert cli.main(["zzz"]) == 2
    assert one_line(capsys) == "medclip: unknown command 'zzz'; run 'medclip --help' for the list of commands"


def test_help_is_import_light():
    code = ("import sys; from open_clip_medclip.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'open_clip', 'numpy', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: medclip <command>" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_user_error_is_one_line_exit_2(fake_command, capsys):
    fake_command.body = raiser(UserError("data.csv, row 3: label 'x' is not one of 1, 0, -1 or blank"))
    assert cli.main(["fake"]) == 2
    assert one_line(capsys) == "medclip fake: data.csv, row 3: label 'x' is not one of 1, 0, -1 or blank"


def test_multiline_user_error_is_folded_into_one_line(fake_command, capsys):
    fake_command.body = raiser(UserError("first part\n  second part\n"))
    assert cli.main(["fake"]) == 2
    assert one_line(capsys) == "medclip fake: first part second part"


@pytest.mark.parametrize("how", ["flag", "flag-first", "env"])
def test_debug_shows_the_traceback_and_is_not_passed_on(fake_command, capsys, monkeypatch, how):
    fake_command.body = raiser(UserError("bad input"))
    argv = {"flag": ["fake", "--x", "--debug"], "flag-first": ["--debug", "fake", "--x"], "env": ["fake", "--x"]}[how]
    if how == "env":
        monkeypatch.setenv("MEDCLIP_DEBUG", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("medclip fake: bad input\n")
    assert fake_command.calls == [["--x"]]


def test_debug_after_double_dash_is_kept(fake_command):
    assert cli.main(["fake", "--", "--debug"]) == 0
    assert fake_command.calls == [["--", "--debug"]]


def test_train_keeps_its_own_debug_flag(monkeypatch):
    module = types.ModuleType("medclip_fake_train")
    seen = []
    module.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "train", (module.__name__, "x"))
    assert cli.main(["train", "--epochs", "1", "--debug"]) == 0
    assert seen == [["--epochs", "1", "--debug"]]  # OpenCLIP's trainer has its own --debug (debug logging)


def test_bug_keeps_its_traceback(fake_command):
    fake_command.body = raiser(ZeroDivisionError("division by zero"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["fake"])


def test_missing_input_file_is_named(fake_command, capsys, tmp_path):
    missing = tmp_path / "reports.csv"
    fake_command.body = lambda: open(missing).read()
    assert cli.main(["fake"]) == 2
    assert one_line(capsys) == f"medclip fake: {missing}: No such file or directory"


def test_unwritable_output_is_named(fake_command, capsys, tmp_path):
    target = tmp_path / "out.csv"
    fake_command.body = raiser(PermissionError(errno.EACCES, "Permission denied", str(target)))
    assert cli.main(["fake"]) == 2
    assert one_line(capsys) == f"medclip fake: {target}: Permission denied"


def test_full_disk_is_one_line(fake_command, capsys, tmp_path):
    target = tmp_path / "epoch_1.pt"
    fake_command.body = raiser(OSError(errno.ENOSPC, "No space left on device", str(target)))
    assert cli.main(["fake"]) == 2
    assert one_line(capsys) == f"medclip fake: {target}: No space left on device"


def test_missing_file_of_the_package_itself_is_a_bug(fake_command):
    inside = Path(cli.__file__).parent / "rules" / "gone.json"
    fake_command.body = raiser(FileNotFoundError(errno.ENOENT, "No such file or directory", str(inside)))
    with pytest.raises(FileNotFoundError):
        cli.main(["fake"])


def test_undecodable_text_is_one_line(fake_command, capsys, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Pleural \xe9ffusion".encode("latin-1"))
    fake_command.body = lambda: path.read_text(encoding="utf-8")
    assert cli.main(["fake"]) == 2
    assert one_line(capsys) == (
        "medclip fake: text is not valid utf-8 (byte b'\\xe9' at offset 8: invalid continuation byte); convert "
        "the file to UTF-8 or pass its encoding (--encoding) where the command has that option")


def test_malformed_csv_is_one_line(fake_command, capsys):
    def body():
        previous = csv.field_size_limit(10)  # restored as it was (csvio lifts it at import for huge reports)
        try:
            list(csv.reader(io.StringIO("a" * 20 + "\n")))
        finally:
            csv.field_size_limit(previous)

    fake_command.body = body
    assert cli.main(["fake"]) == 2
    assert one_line(capsys) == "medclip fake: malformed CSV: field larger than field limit (10)"


def test_unreadable_image_is_one_line(fake_command, capsys, tmp_path):
    from PIL import Image

    path = tmp_path / "scan.jpg"
    path.write_bytes(b"not an image")
    fake_command.body = lambda: Image.open(path)
    assert cli.main(["fake"]) == 2
    assert one_line(capsys) == f"medclip fake: cannot identify image file '{path}' (not an image PIL can read)"


def test_user_error_rewrapped_by_a_library_is_still_one_line(fake_command, capsys):
    """OpenCLIP logs a download failure with logging.error and re-raises it as RuntimeError(f'...: {e}')."""
    import logging

    def body():
        try:
            raise UserError("could not download http://x/medclip.zip: HTTP 404; save it as /c/medclip.zip")
        except Exception as e:
            logging.error(f"Failed to download weights for tag 'medclip': {e}")
            raise RuntimeError(f"Failed to download weights for tag 'medclip': {e}") from None

    fake_command.body = body
    assert cli.main(["fake"]) == 2
    assert one_line(capsys) == "medclip fake: could not download http://x/medclip.zip: HTTP 404; save it as /c/medclip.zip"


def test_unrelated_exception_during_user_error_handling_is_a_bug(fake_command):
    def body():
        try:
            raise UserError("bad input")
        except UserError:
            raise KeyError("oops")  # noqa: B904  (a bug in an error handler must not pass as the user error)

    fake_command.body = body
    with pytest.raises(KeyError):
        cli.main(["fake"])


def test_missing_optional_package_is_one_line(fake_command, capsys):
    fake_command.body = raiser(ModuleNotFoundError("No module named 'clip_benchmark'", name="clip_benchmark"))
    assert cli.main(["fake"]) == 2
    assert one_line(capsys) == ("medclip fake: the Python package providing 'clip_benchmark' is not installed; "
                                "install it (see the README's installation section)")


def test_interrupt_is_one_line_exit_130(fake_command, capsys):
    fake_command.body = raiser(KeyboardInterrupt())
    assert cli.main(["fake"]) == 130
    assert one_line(capsys) == "medclip fake: interrupted"


# ------------------------------------------------------------------------------------------------ real commands


def test_mistyped_flag_shows_the_subcommands_own_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["smoke", "--modle", "medclip-tiny"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: medclip smoke") and "unrecognized arguments: --modle" in err
    assert len(err.splitlines()) <= 6


def test_smoke_wrong_model_name_suggests_close_matches(capsys):
    assert cli.main(["smoke", "--model", "medclip-swn"]) == 2
    line = one_line(capsys)
    assert line.startswith("medclip smoke: unknown model 'medclip-swn' (did you mean: medclip-swin")
    assert "MedCLIP models: medclip-demo, medclip-resnet50" in line
    assert "ViT-B-32" not in line and len(line) < 400  # no dump of the ~150 upstream names


def test_smoke_missing_accelerator_is_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["smoke", "--model", "medclip-tiny", "--device", "cuda"]) == 2
    assert one_line(capsys) == "medclip smoke: --device cuda: this machine has no CUDA device; use --device cpu"


def test_device_policy(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match=r"--device cuda:1: this machine has no CUDA device"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda"


def test_smoke_bad_pretrained_value_is_one_line(capsys, tmp_path):
    assert cli.main(["smoke", "--model", "medclip-swin", "--pretrained", "medclp"]) == 2
    assert one_line(capsys) == ("medclip smoke: --pretrained medclp: no such file, and not a pretrained tag (did you "
                                "mean: medclip?) (medclip-swin's pretrained tags: medclip)")
    assert cli.main(["smoke", "--model", "medclip-tiny", "--pretrained", str(tmp_path)]) == 2
    assert one_line(capsys).startswith(f"medclip smoke: --pretrained {tmp_path}: is a folder; pass the checkpoint")


def test_smoke_missing_and_unreadable_images_are_named(capsys, tmp_path):
    missing = tmp_path / "gone.png"
    assert cli.main(["smoke", "--model", "medclip-tiny", "--device", "cpu", "--image", str(missing)]) == 2
    assert one_line(capsys) == f"medclip smoke: --image {missing}: no such file"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    assert cli.main(["smoke", "--model", "medclip-tiny", "--device", "cpu", "--image", str(broken)]) == 2
    assert one_line(capsys).startswith(f"medclip smoke: {broken}: ")


def test_smoke_writes_json_atomically(capsys, tmp_path):
    out = tmp_path / "sim.json"
    stale = tmp_path / ".sim.json.tmp-999999999"
    stale.write_text("{")
    assert cli.main(["smoke", "--model", "medclip-tiny", "--device", "cpu", "--output-json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and len(data["similarity"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim.json"]
    assert cli.main(["smoke", "--model", "medclip-tiny", "--output-json", str(tmp_path / "no" / "x.json")]) == 2
    assert one_line(capsys).endswith(f"--output-json {tmp_path / 'no' / 'x.json'}: its folder does not exist")


def test_convert_empty_folder_names_the_folder_and_what_was_expected(capsys, tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    for argv in (["convert", str(empty), "--out", str(tmp_path / "out")],
                 ["convert", str(empty), "--model", "medclip-tiny", "--out", str(tmp_path / "out")],
                 ["info", str(empty)]):
        assert cli.main(argv) == 2
        assert one_line(capsys) == (
            f"medclip {argv[0]}: {empty}: folder holds no checkpoint (expected pytorch_model.bin, model.safetensors, "
            "open_clip_model.safetensors or the released .zip); pass the checkpoint file")
    assert not (tmp_path / "out").exists()


def test_convert_wrong_model_name_suggests_close_matches(capsys, tmp_path):
    source = tmp_path / "pytorch_model.bin"
    source.write_bytes(b"x")
    assert cli.main(["convert", str(source), "--model", "medclip-resnet", "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys).startswith("medclip convert: unknown model 'medclip-resnet' (did you mean: medclip-resnet50")


@pytest.mark.parametrize("content, message", [
    (b"this is not a checkpoint\n", "file is not a PyTorch checkpoint"),
    (b"", "empty file, not a checkpoint"),
    (b"PK\x03\x04" + b"\x00" * 40, "truncated or corrupt zip/torch file"),
], ids=["not-a-checkpoint", "empty", "truncated-zip"])
def test_info_on_a_bad_file_is_one_line(capsys, tmp_path, content, message):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    assert cli.main(["info", str(path)]) == 2
    line = one_line(capsys)
    assert line.startswith(f"medclip info: {path}: {message}")


def test_info_missing_file_is_one_line(capsys, tmp_path):
    assert cli.main(["info", str(tmp_path / "nope.bin")]) == 2
    assert one_line(capsys) == f"medclip info: {tmp_path / 'nope.bin'}: no such file"


def test_download_failure_through_the_entry_point_is_one_line(capsys, tmp_path, monkeypatch):
    """`pretrained='medclip'` with an unreachable server: one line with the URL and the cache path."""
    import socket

    from open_clip import factory

    import open_clip_medclip
    from open_clip_medclip import download

    open_clip_medclip.register()

    if not hasattr(factory.download_pretrained, "__wrapped__"):
        # The plugin hook that routes MedCLIP tags through download.fetch (plugins/openclip_models.py) is missing.
        pytest.fail("factory.download_pretrained is not wrapped by open_clip_medclip.download")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(download.BASE_URL_ENV, f"http://127.0.0.1:{port}/w")
    monkeypatch.setenv(download.ATTEMPTS_ENV, "1")
    assert cli.main(["smoke", "--model", "medclip-swin", "--pretrained", "medclip", "--device", "cpu"]) == 2
    line = one_line(capsys)
    cached = tmp_path / ".cache" / "clip" / "medclip-vit-pretrained.zip"
    assert line.startswith(f"medclip smoke: could not download http://127.0.0.1:{port}/w/medclip-vit-pretrained.zip: "
                           "cannot connect")
    assert f"save it as {cached}" in line


# ------------------------------------------------------------------------------------------------ atomic outputs


def test_atomic_write_keeps_the_previous_result_on_failure(tmp_path):
    path = tmp_path / "zeroshot.md"
    atomic.write_text(path, "| good |\n")
    with pytest.raises(RuntimeError), atomic.atomic_write(path) as handle:
        handle.write("| half")
        raise RuntimeError("evaluation failed")
    assert path.read_text() == "| good |\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zeroshot.md"]


def test_stale_temporaries_are_cleaned_and_live_ones_kept(tmp_path):
    dead = tmp_path / ".labels.csv.tmp-999999999"
    dead.write_text("partial")
    dead_dir = tmp_path / ".out.tmp-999999998"
    dead_dir.mkdir()
    (dead_dir / "x").write_text("x")
    live = tmp_path / f".labels.csv.tmp-{os.getppid()}"  # our parent process is alive
    live.write_text("being written")
    other = tmp_path / ".other.tmp-999999999"
    other.write_text("another output's temp")
    assert atomic.clean_stale_temps(tmp_path, "labels.csv") == [dead]
    assert live.exists() and other.exists()
    atomic.write_text(tmp_path / "labels.csv", "ok\n")  # writing an output cleans its stale temporaries
    assert sorted(p.name for p in atomic.clean_stale_temps(tmp_path)) == [".other.tmp-999999999", ".out.tmp-999999998"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "labels.csv"]
