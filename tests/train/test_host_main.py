"""OpenCLIP's own trainer CLI (`python -m open_clip_train.main`, `torchrun -m open_clip_train.main`) with the
opt-in autoload: MedCLIP models on MedCLIP shards train with the semantic matching loss, on plain shards with
InfoNCE (and say so), other models as before; the webdataset end-of-shard fault of issue 10."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--batch-size", "4", "--workers", "1", "--epochs", "1", "--device", "cpu", "--precision", "fp32",
          "--warmup", "1", "--lr", "1e-4", "--log-every-n-steps", "1", "--seed", "0", "--train-num-samples", "12"]


@pytest.fixture(scope="module")
def autoload_env(tmp_path_factory) -> dict:
    """An environment whose Python processes load the autoload from an isolated site dir (never the venv's)."""
    from open_clip_medclip import autoload

    site_dir = tmp_path_factory.mktemp("site")
    autoload.install_autoload(str(site_dir))
    boot = tmp_path_factory.mktemp("boot")
    # .pth files are only read in site dirs: sitecustomize (found on PYTHONPATH) makes the tmp dir one
    (boot / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({str(site_dir)!r})\n")
    path = os.pathsep.join(p for p in (str(boot), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _host(env: dict, cwd: Path, *argv: str, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "open_clip_train.main", *argv]
    else:  # `torchrun ... -m open_clip_train.main -- <args>` (torchrun's own --logs-specs makes `--` necessary)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "open_clip_train.main", "--", *argv]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _plain_shard(path: Path, count: int = 12) -> Path:
    """A plain OpenCLIP jpg/txt shard (no labels)."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as sink:
        for i in range(count):
            buffer = io.BytesIO()
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(buffer, format="JPEG")
            sink.write({"__key__": f"s{i:03d}", "jpg": buffer.getvalue(), "txt": f"a chest x-ray number {i}"})
    return path


def _tiny_plain_clip(folder: Path) -> str:
    """A tiny non-MedCLIP OpenCLIP model (ViT + OpenCLIP text transformer) as a `local-dir:` model name."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": {"embed_dim": 32,
                            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 16},
                            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                         "layers": 1}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return f"local-dir:{folder}"


def _fail(result: subprocess.CompletedProcess) -> str:
    return f"rc={result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def test_host_main_trains_medclip_with_the_soft_loss(tmp_path: Path, small_shards, autoload_env):
    import open_clip

    import open_clip_medclip  # noqa: F401

    result = _host(autoload_env, tmp_path, "--model", "medclip-tiny", "--train-data", small_shards["all"],
                   "--logs", str(tmp_path), "--name", "soft", *COMMON)
    assert result.returncode == 0, _fail(result)
    log = (tmp_path / "soft" / "out.log").read_text()
    assert "Semantic_matching_loss" in log
    assert "open_clip_medclip: training medclip-tiny with the semantic matching loss" in log
    # truthful logs: the preprocessing the model really uses, no "initialized partially" for a random model
    final = next(line for line in log.splitlines() if "Final image preprocessing configuration set" in line)
    assert "0.5862785" in final and "0.2795008" in final and "'resize_mode': 'longest'" in final, final
    assert "initialized partially" not in log and "initialized randomly" in log
    for noise in ("BertConfig", "LOAD REPORT", "FakeTensor cache stats"):
        assert noise not in result.stderr, noise
    assert "medclip_loss: soft" in (tmp_path / "soft" / "params.txt").read_text()
    checkpoint = tmp_path / "soft" / "checkpoints" / "epoch_1.pt"
    model = open_clip.create_model("medclip-tiny", pretrained=str(checkpoint))
    assert type(model).__name__ == "CustomTextCLIP"
    assert not list((tmp_path / "soft" / "checkpoints").glob("*.tmp-*"))


def test_host_main_medclip_model_on_plain_shards_trains_infonce_and_says_why(tmp_path: Path, autoload_env):
    shard = _plain_shard(tmp_path / "plain-000000.tar")
    result = _host(autoload_env, tmp_path, "--model", "medclip-tiny", "--train-data", str(shard),
                   "--logs", str(tmp_path), "--name", "plain", *COMMON)
    assert result.returncode == 0, _fail(result)
    log = (tmp_path / "plain" / "out.log").read_text()
    assert "Contrastive_loss" in log and "Semantic_matching_loss" not in log
    assert "plain InfoNCE" in log and "carry no MedCLIP labels" in log and str(shard) in log


def test_host_main_leaves_other_models_alone_and_survives_shard_end_markers(tmp_path: Path, autoload_env):
    # webdataset >= 0.2.96 (0.2.111 in issue 10) ends shards with a marker that crashed open_clip_train 3.3 with
    # KeyError: 'fname' for every model; the autoload's glue drops the markers, nothing else changes
    shard = _plain_shard(tmp_path / "plain-000000.tar")
    model = _tiny_plain_clip(tmp_path / "tinyclip")
    result = _host(autoload_env, tmp_path, "--model", model, "--train-data", str(shard),
                   "--logs", str(tmp_path), "--name", "other", *COMMON)
    assert result.returncode == 0, _fail(result)
    log = (tmp_path / "other" / "out.log").read_text()
    assert "Contrastive_loss" in log and "open_clip_medclip" not in log
    assert "KeyError" not in result.stderr
    assert (tmp_path / "other" / "checkpoints" / "epoch_1.pt").is_file()


def test_host_main_medclip_flags_on_other_models_are_a_short_error(tmp_path: Path, autoload_env):
    shard = _plain_shard(tmp_path / "plain-000000.tar")
    model = _tiny_plain_clip(tmp_path / "tinyclip")
    # --medclip-* flags are for MedCLIP models: a short error, before anything is built
    wrong = _host(autoload_env, tmp_path, "--model", model, "--train-data", str(shard), "--medclip-loss", "clip",
                  "--logs", str(tmp_path), "--name", "wrong", *COMMON, timeout=300)
    assert wrong.returncode == 2
    assert "--medclip-loss: for MedCLIP models only" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) <= 6, wrong.stderr


def test_host_main_padding_free_on_the_reference_pooler_is_a_short_error(tmp_path: Path, small_shards, autoload_env):
    # medclip-swin's reference pooler averages padding: refused before the (BERT-base) model is built
    wrong = _host(autoload_env, tmp_path, "--model", "medclip-swin", "--train-data", small_shards["all"],
                  "--medclip-padding-free", "--logs", str(tmp_path), "--name", "free", *COMMON, timeout=300)
    assert wrong.returncode == 2
    assert "--medclip-padding-free: --model medclip-swin averages padding" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) <= 6, wrong.stderr
    assert not (tmp_path / "free").exists()


@pytest.mark.slow
def test_host_main_clip_flag_trains_infonce_on_medclip_streams(tmp_path: Path, small_shards, autoload_env):
    result = _host(autoload_env, tmp_path, "--model", "medclip-tiny", "--train-data", small_shards["all"],
                   "--medclip-loss", "clip", "--logs", str(tmp_path), "--name", "clip", *COMMON)
    assert result.returncode == 0, _fail(result)
    log = (tmp_path / "clip" / "out.log").read_text()
    assert "plain InfoNCE (--medclip-loss clip) on MedCLIP label-aware streams" in log
    assert "Contrastive_loss" in log


@pytest.mark.slow
def test_torchrun_host_main_two_processes_gloo(tmp_path: Path, small_shards, autoload_env):
    import open_clip

    import open_clip_medclip  # noqa: F401

    argv = ["--model", "medclip-tiny", "--train-data", small_shards["all"], "--dist-backend", "gloo",
            "--logs", str(tmp_path), "--name", "ddp", *COMMON[:-1], "16"]
    result = _host(autoload_env, tmp_path, *argv, nproc=2)
    assert result.returncode == 0, _fail(result)
    log = (tmp_path / "ddp" / "out.log").read_text()
    assert "Semantic_matching_loss" in log and "[16/16 (100%)]" in log
    model = open_clip.create_model("medclip-tiny", pretrained=str(tmp_path / "ddp" / "checkpoints" / "epoch_1.pt"))
    assert type(model).__name__ == "CustomTextCLIP"


# ----------------------------------------------------------------------------------------------------------------
# The webdataset fault itself, independent of the installed webdataset version
# ----------------------------------------------------------------------------------------------------------------
def _expander_with_markers(data, handler=None, **kwargs):
    """webdataset >= 0.2.96's tar_file_expander: an empty `{}` after each shard."""
    from webdataset.tariterators import reraise_exception, tar_file_iterator

    for source in data:
        for sample in tar_file_iterator(source["stream"], handler=handler or reraise_exception):
            sample["__url__"] = source["url"]
            yield sample
        yield {}


def test_end_of_shard_markers_crash_open_clip_train_and_the_glue_drops_them(tmp_path: Path, monkeypatch):
    import open_clip_train.data as host_data
    from open_clip_medclip.plugins import trainer_shims

    shard = str(_plain_shard(tmp_path / "plain-000000.tar", count=5))

    def reraise(exc):
        raise exc

    monkeypatch.setattr(host_data, "tar_file_expander", _expander_with_markers)
    with pytest.raises(KeyError, match="fname"):  # the fault of issue 10, as open_clip_train 3.3 meets it
        list(host_data.tarfile_to_samples_nothrow([{"url": shard}], handler=reraise))

    monkeypatch.setattr(trainer_shims, "_ORIGINAL_TAR_FILE_EXPANDER", _expander_with_markers)
    monkeypatch.setattr(host_data, "tar_file_expander", trainer_shims.tar_file_expander_without_markers)
    samples = list(host_data.tarfile_to_samples_nothrow([{"url": shard}, {"url": shard}], handler=reraise))
    assert [s["__key__"] for s in samples] == [f"s{i:03d}" for i in range(5)] * 2
    assert all(set(s) >= {"jpg", "txt"} for s in samples)


def test_setup_cfg_pins_a_webdataset_that_open_clip_train_can_read():
    """open_clip_torch[training] 3.3 itself asks for webdataset<=0.2.86; 0.2.96+ add the end-of-shard marker."""
    import re

    pin = next(line.strip() for line in (REPO / "setup.cfg").read_text().splitlines()
               if line.strip().startswith("webdataset"))
    upper = re.search(r"(?:<=|==)\s*([0-9.]+)", pin)
    assert upper is not None, pin
    assert tuple(int(p) for p in upper[1].split(".")) <= (0, 2, 86), pin
