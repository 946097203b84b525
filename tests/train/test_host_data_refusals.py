"""A data refusal raised while OpenCLIP builds the data (`get_data`) is one line on both front doors: plain
`open_clip_train.main` (autoload) used to print a ~290-line traceback for it (exit 1) where `medclip train` said it
in one line (exit 2)."""
from __future__ import annotations

from pathlib import Path

from open_clip_medclip import train as medclip_train
from open_clip_medclip.cli import run_command
from tests.train.shardkit import brace, write_shards
from tests.train.test_host_main import COMMON, _fail, _host, autoload_env  # noqa: F401  (fixture)

NO_BANK = "image-only shards need a sentence bank"


def _image_only_shards(folder: Path) -> str:
    """Two image-only shards and their index: nothing in them can fill the sentence bank."""
    return brace(write_shards(folder, images_per_shard=8, image_shards=2, paired_shards=0, text_shards=0)["image"])


def test_plain_host_main_refuses_data_without_a_bank_in_one_line(tmp_path: Path, autoload_env):  # noqa: F811
    shards = _image_only_shards(tmp_path / "shards")
    result = _host(autoload_env, tmp_path, "--model", "medclip-tiny", "--train-data", shards,
                   "--logs", str(tmp_path / "logs"), "--name", "nobank", *COMMON)
    assert result.returncode == 2, _fail(result)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("open_clip_train.main: error: ") and NO_BANK in last, _fail(result)
    assert "Traceback" not in result.stderr, _fail(result)


def test_medclip_train_refuses_data_without_a_bank_in_one_line(tmp_path: Path, capsys):
    shards = _image_only_shards(tmp_path / "shards")
    argv = ["--model", "medclip-tiny", "--train-data", shards, "--logs", str(tmp_path / "logs"), "--name", "nobank",
            *COMMON]
    code = run_command("train", lambda: medclip_train.main(argv), debug=False)
    err = capsys.readouterr().err
    assert code == 2, err
    assert NO_BANK in err.strip().splitlines()[-1] and "Traceback" not in err
