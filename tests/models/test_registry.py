"""`import open_clip_medclip` makes the MedCLIP models ordinary OpenCLIP models, offline."""
from __future__ import annotations

import os
import subprocess
import sys

import open_clip
import pytest
import torch
from PIL import Image

import open_clip_medclip
from open_clip_medclip.models import MEDCLIP_MEAN, MEDCLIP_STD, MedclipMaskedPooler, MedclipPooler


def test_models_are_listed():
    listed = set(open_clip.list_models())
    for name in ("medclip-swin", "medclip-resnet50", "medclip-swin-masked", "medclip-resnet50-masked", "medclip-tiny"):
        assert name in listed
    assert set(open_clip_medclip.MODEL_NAMES) <= listed


def test_acceptance_command_runs_offline_in_a_fresh_process():
    code = ("import open_clip, open_clip_medclip; m, _, pp = open_clip.create_model_and_transforms('medclip-swin'); "
            "print(type(m.visual.trunk).__name__, type(m.text.pooler).__name__)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SwinTransformer MedclipPooler" in result.stdout


@pytest.fixture(scope="module")
def swin():
    return open_clip.create_model_and_transforms("medclip-swin")


def test_swin_architecture_matches_the_paper(swin):
    model, _, _ = swin
    head = model.visual.head.proj
    assert head.in_features == 768 and head.out_features == 512 and head.bias is None
    assert model.text.proj.in_features == 768 and model.text.proj.bias is None
    assert model.text.transformer.config.output_hidden_states is True
    assert isinstance(model.text.pooler, MedclipPooler) and not isinstance(model.text.pooler, MedclipMaskedPooler)
    trunk_params = sum(p.numel() for p in model.visual.trunk.parameters())
    assert 27.0e6 < trunk_params < 28.5e6  # Swin-T, as MedCLIP's HF SwinModel


def test_medclip_preprocessing_is_returned(swin):
    model, train_transform, val_transform = swin
    cfg = model.visual.preprocess_cfg
    assert tuple(cfg["mean"]) == (MEDCLIP_MEAN,) * 3 and tuple(cfg["std"]) == (MEDCLIP_STD,) * 3
    assert cfg["resize_mode"] == "longest" and cfg["interpolation"] == "bicubic" and cfg["size"] == (224, 224)
    x = val_transform(Image.new("L", (300, 200), 255))
    assert x.shape == (3, 224, 224)
    # Padding rows are black (0 -> (0 - mean) / std), the image rows white.
    assert x[0, 0, 112].item() == pytest.approx(-MEDCLIP_MEAN / MEDCLIP_STD, abs=1e-5)
    assert x[0, 112, 112].item() == pytest.approx((1 - MEDCLIP_MEAN) / MEDCLIP_STD, abs=1e-5)


def test_explicit_mean_std_are_respected():
    model, _, _ = open_clip.create_model_and_transforms("medclip-tiny", image_mean=(0.1, 0.2, 0.3), image_std=(1, 1, 1))
    assert tuple(model.visual.preprocess_cfg["mean"]) == (0.1, 0.2, 0.3)


def test_non_medclip_models_keep_openai_defaults():
    model = open_clip.create_model("RN50", pretrained=None)
    assert tuple(model.visual.preprocess_cfg["mean"]) == tuple(open_clip.OPENAI_DATASET_MEAN)


def test_tokenizer_is_bundled_lowercasing_bio_clinicalbert():
    tokenizer = open_clip.get_tokenizer("medclip-swin")
    ids = tokenizer(["Pleural Effusion", "pleural effusion"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert torch.equal(ids[0], ids[1])
    pieces = tokenizer.tokenizer.convert_ids_to_tokens(ids[0][:8].tolist())
    assert pieces == ["[CLS]", "p", "##le", "##ural", "e", "##ff", "##usion", "[SEP]"]


def test_unmasked_pooler_depends_on_padding_masked_does_not():
    model, _, _ = open_clip.create_model_and_transforms("medclip-tiny")  # masked pooler
    model.eval()
    tokenizer = open_clip.get_tokenizer("medclip-tiny")
    short, long = tokenizer(["no effusion"], context_length=16), tokenizer(["no effusion"], context_length=77)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(short), model.encode_text(long), atol=1e-5)
        model.text.pooler = MedclipPooler()
        assert not torch.allclose(model.encode_text(short), model.encode_text(long), atol=1e-5)


def test_pooler_reference_formula():
    hidden = [torch.randn(2, 5, 8) for _ in range(4)]
    out = type("Out", (), {"hidden_states": hidden})()
    expected = torch.stack([hidden[1], hidden[2], hidden[-1]]).permute(1, 0, 2, 3).mean(2).mean(1)
    assert torch.allclose(MedclipPooler()(out, torch.ones(2, 5)), expected, atol=1e-6)
    with pytest.raises(RuntimeError, match="hidden states"):
        MedclipPooler()(type("Out", (), {"hidden_states": None})(), torch.ones(2, 5))


def test_official_weight_tags_are_registered():
    assert "medclip" in open_clip.list_pretrained_tags_by_model("medclip-swin")
    cfg = open_clip.get_pretrained_cfg("medclip-resnet50", "medclip")
    assert cfg["url"].endswith("medclip-pretrained.zip") and tuple(cfg["mean"]) == (MEDCLIP_MEAN,) * 3


def test_hub_text_weights_switch(monkeypatch):
    from open_clip_medclip import models

    assert models.bundled_text_tower(models.BIO_CLINICALBERT_HUB_ID) is not None
    monkeypatch.setenv(models.TEXT_WEIGHTS_ENV, "hub")
    assert models.bundled_text_tower(models.BIO_CLINICALBERT_HUB_ID) is None
    assert models.bundled_text_tower("open_clip_medclip/tiny-bert") is not None  # exists only here
    monkeypatch.setenv(models.TEXT_WEIGHTS_ENV, "typo")
    with pytest.raises(ValueError, match="bundled' or 'hub"):
        models.text_weights_mode()


def test_medclip_swin_attention_runs_fused():
    """create_model switches timm's Swin window attention to SDPA (timm leaves it unfused) for MedCLIP models only."""
    from timm.layers import use_fused_attn

    if not use_fused_attn():
        pytest.skip("timm's fused attention is switched off in this environment (TIMM_FUSED_ATTN=0)")
    model = open_clip.create_model("medclip-swin", pretrained_text=False)
    flags = [module.fused_attn for module in model.visual.modules() if hasattr(module, "fused_attn")]
    assert flags and all(flags)
