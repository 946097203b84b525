"""Official-checkpoint conversion, `medclip convert` / `medclip info`, and clear errors for bad inputs."""
from __future__ import annotations

import json
import os
import zipfile
from collections import OrderedDict
from pathlib import Path

import open_clip
import pytest
import torch

import open_clip_medclip  # noqa: F401
from open_clip_medclip import weights
from open_clip_medclip.cli import main as medclip_main
from open_clip_medclip.weights import CheckpointError


def official_layout(open_clip_state: dict) -> OrderedDict:
    """Inverse of the converter for ResNet-style towers: what the authors' code would have saved."""
    out = OrderedDict()
    for key, value in open_clip_state.items():
        if key.startswith("visual.trunk."):
            out["vision_model.model." + key[len("visual.trunk."):]] = value
        elif key == "visual.head.proj.weight":
            out["vision_model.model.fc.weight"] = value
        elif key.startswith("text.transformer."):
            out["text_model.model." + key[len("text.transformer."):]] = value
        elif key == "text.proj.weight":
            out["text_model.projection_head.weight"] = value
        else:
            out[key] = value
    out["text_model.model.pooler.dense.weight"] = torch.zeros(64, 64)  # the official file carries BERT's pooler
    out["text_model.model.embeddings.position_ids"] = torch.arange(128)[None]
    return out


@pytest.fixture(scope="module")
def tiny_source():
    torch.manual_seed(0)
    model = open_clip.create_model("medclip-tiny")
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.normal_(0, 0.05)
        model.logit_scale.fill_(6.0)
    return model.eval()


@pytest.fixture()
def official_tiny(tmp_path, tiny_source):
    path = tmp_path / "pytorch_model.bin"
    torch.save(official_layout(tiny_source.state_dict()), path)
    return path


def _outputs(model, tokens, pixels):
    with torch.no_grad():
        return model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True)


def test_official_layout_converts_on_load(official_tiny, tiny_source):
    model, _, _ = open_clip.create_model_and_transforms("medclip-tiny", pretrained=str(official_tiny))
    model.eval()
    tokens = open_clip.get_tokenizer("medclip-tiny")(["no effusion", "cardiomegaly"])
    pixels = torch.randn(2, 3, 128, 128)
    for ours, theirs in zip(_outputs(model, tokens, pixels), _outputs(tiny_source, tokens, pixels)):
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert model.logit_scale.item() == pytest.approx(weights.REFERENCE_LOGIT_SCALE_MAX)  # clamped like the reference


def test_released_zip_loads_and_convert_writes_a_local_dir(tmp_path, official_tiny, tiny_source, capsys):
    archive = tmp_path / "medclip-pretrained.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(official_tiny, "medclip-pretrained/pytorch_model.bin")
    out = tmp_path / "converted"
    assert medclip_main(["convert", str(archive), "--model", "medclip-tiny", "--out", str(out)]) == 0
    assert (out / "open_clip_model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == "open_clip_medclip/tiny-bert"  # portable, no paths
    assert config["preprocess_cfg"]["mean"][0] == pytest.approx(open_clip_medclip.MEDCLIP_MEAN)
    model, _, val = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    tokens = tokenizer(["no effusion"])
    pixels = torch.randn(1, 3, 128, 128)
    for ours, theirs in zip(_outputs(model.eval(), tokens, pixels), _outputs(tiny_source, tokens, pixels)):
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert medclip_main(["info", str(out)]) == 0
    assert "local-dir" in capsys.readouterr().out
    assert medclip_main(["convert", str(archive), "--model", "medclip-tiny", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"medclip convert: {out}: already exists and is not an empty folder; choose a new --out folder\n"


def test_info_says_what_a_checkpoint_is(official_tiny, tmp_path, tiny_source, capsys):
    assert medclip_main(["info", str(official_tiny), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == weights.OFFICIAL_RESNET and info["container"] == "torch"
    epoch = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in tiny_source.state_dict().items()}}, epoch)
    assert weights.describe_checkpoint(epoch).kind == weights.OPEN_CLIP
    model = open_clip.create_model("medclip-tiny", pretrained=str(epoch))  # plain OpenCLIP training checkpoint
    assert torch.equal(model.visual.head.proj.weight, tiny_source.visual.head.proj.weight)


# ------------------------------------------------------------------------------------------------ bad inputs


def test_non_checkpoint_file_is_named(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.bin: file is not a PyTorch checkpoint"):
        open_clip.create_model("medclip-tiny", pretrained=str(path))


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.bin"
    path.touch()
    with pytest.raises(CheckpointError, match=r"empty\.bin: empty file"):
        open_clip.create_model("medclip-tiny", pretrained=str(path))


def test_truncated_file_is_named(tmp_path, official_tiny):
    data = official_tiny.read_bytes()
    path = tmp_path / "truncated.bin"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.bin: .*truncated or corrupt"):
        open_clip.create_model("medclip-tiny", pretrained=str(path))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"weights": torch.zeros(1), "config": zipfile.ZipInfo("x")}, path)
    with pytest.raises(CheckpointError, match=r"evil\.bin: .*objects other than tensors"):
        weights.read_state_dict(path)


def _fake_official(kind: str) -> dict:
    first = ("vision_model.model.fc.weight" if kind == "resnet"
             else "vision_model.model.embeddings.patch_embeddings.projection.weight")
    return {first: torch.zeros(1), "text_model.projection_head.weight": torch.zeros(512, 768), "logit_scale": torch.tensor(2.0)}


@pytest.mark.parametrize(("kind", "model_name", "want"), [("resnet", "medclip-swin", "medclip-resnet50"),
                                                          ("swin", "medclip-resnet50", "medclip-swin")])
def test_wrong_architecture_is_explained(tmp_path, kind, model_name, want):
    path = tmp_path / f"{kind}.bin"
    torch.save(_fake_official(kind), path)
    with pytest.raises(CheckpointError, match=rf"{kind}\.bin: holds .* image-tower weights .*load it with model '{want}'"):
        open_clip.create_model(model_name, pretrained=str(path))


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_source):
    state = official_layout(tiny_source.state_dict())
    del state["text_model.model.encoder.layer.1.output.dense.weight"]
    state["text_model.projection_head.bias"] = torch.zeros(64)  # the pre-Oct-2022 code had a biased head
    path = tmp_path / "odd.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        open_clip.create_model("medclip-tiny", pretrained=str(path))
    message = str(err.value)
    assert "odd.bin" in message
    assert "missing keys (1): text.transformer.encoder.layer.1.output.dense.weight" in message
    assert "unexpected keys (1): text.proj.bias" in message


def test_zip_path_traversal_is_rejected(tmp_path, official_tiny):
    archive = tmp_path / "traversal.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(official_tiny, "../../pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"traversal\.zip: zip member '\.\./\.\./pytorch_model\.bin' has an unsafe path"):
        weights.read_state_dict(archive)


def test_zip_oversized_and_bomb_members_are_rejected(tmp_path, official_tiny, monkeypatch):
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(official_tiny, "pytorch_model.bin")
    monkeypatch.setattr(weights, "MAX_ZIP_MEMBER_BYTES", 1000)
    with pytest.raises(CheckpointError, match=r"big\.zip: zip member 'pytorch_model\.bin' is \d+ bytes, over the 1000-byte limit"):
        weights.read_state_dict(archive)
    monkeypatch.undo()
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pytorch_model.bin", b"\0" * 10_000_000)
    with pytest.raises(CheckpointError, match=r"bomb\.zip: .*zip bomb"):
        weights.read_state_dict(bomb)


def test_zip_without_weights_is_named(tmp_path):
    archive = tmp_path / "readme.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("README.txt", "hello")
    with pytest.raises(CheckpointError, match=r"readme\.zip: zip has no pytorch_model\.bin"):
        weights.read_state_dict(archive)


# ------------------------------------------------------------------------------------------------ folders, temps


def test_convert_takes_the_folder_the_release_unzips_to(tmp_path, official_tiny, capsys):
    folder = tmp_path / "unzipped" / "medclip-pretrained"
    folder.mkdir(parents=True)
    official_tiny.rename(folder / "pytorch_model.bin")
    assert weights.resolve_source(tmp_path / "unzipped") == folder / "pytorch_model.bin"
    out = tmp_path / "converted"
    assert medclip_main(["convert", str(tmp_path / "unzipped"), "--model", "medclip-tiny", "--out", str(out)]) == 0
    assert f"wrote {out} (medclip-tiny)" in capsys.readouterr().out
    assert medclip_main(["info", str(tmp_path / "unzipped")]) == 0
    assert f"found in folder {tmp_path / 'unzipped'}" in capsys.readouterr().out


def test_convert_without_model_refuses_to_guess_for_a_non_official_checkpoint(tmp_path, tiny_source, capsys):
    path = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": tiny_source.state_dict()}, path)
    assert medclip_main(["convert", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medclip convert: {path}: an OpenCLIP checkpoint, so the model cannot be detected; "
                          "pass --model (medclip-demo, ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_failed_convert_leaves_no_temporary_and_cleans_stale_ones(tmp_path, official_tiny, capsys, monkeypatch):
    import errno
    import importlib

    push_to_hf_hub = importlib.import_module("open_clip.push_to_hf_hub")  # the module, not the function

    out = tmp_path / "converted"
    stale = tmp_path / ".converted.tmp-999999999"  # left by a killed run (no such process)
    stale.mkdir()
    (stale / "open_clip_model.safetensors").write_bytes(b"partial")

    def disk_full(model, tokenizer, config, save_directory, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        (Path(save_directory) / "open_clip_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(save_directory) / "open_clip_model.safetensors"))

    monkeypatch.setattr(push_to_hf_hub, "save_for_hf", disk_full)
    assert medclip_main(["convert", str(official_tiny), "--model", "medclip-tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medclip convert: ") and "open_clip_model.safetensors: No space left on device" in err
    assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_model.bin"]  # no temp, no half output
    monkeypatch.undo()
    assert medclip_main(["convert", str(official_tiny), "--model", "medclip-tiny", "--out", str(out)]) == 0
    assert (out / "open_clip_model.safetensors").is_file()


def test_existing_converted_folder_survives_a_failed_run(tmp_path, official_tiny, capsys):
    out = tmp_path / "converted"
    assert medclip_main(["convert", str(official_tiny), "--model", "medclip-tiny", "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a checkpoint")
    assert medclip_main(["convert", str(bad), "--model", "medclip-tiny", "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == before
