"""One pooler answer (`text_width.text_pooler_type`) for a model name and a built model, and one width rule.

Training (the streams), evaluation and the benchmarks all ask `text_pooler_type`; the name path reads the OpenCLIP
config, the model path the built tower's pooler class. The two must agree, and the model path must name poolers
the way OpenCLIP's own `register_pooler` does.
"""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip import hf_model

import open_clip_medclip  # noqa: F401  (registers the models and poolers)
from open_clip_medclip.text_width import is_medclip_model, text_multiple, text_pooler_type


def _tiny_text_cfg(pooler_type: str | None) -> dict:
    """medclip-tiny's (cheap) text tower config with another pooler; None: no `hf_pooler_type` key at all."""
    text_cfg = dict(open_clip.get_model_config("medclip-tiny")["text_cfg"], hf_pooler_type=pooler_type)
    return text_cfg if pooler_type else {k: v for k, v in text_cfg.items() if k != "hf_pooler_type"}


def _tiny(pooler_type: str | None = "medclip_masked_pooler") -> torch.nn.Module:
    return open_clip.create_model("medclip-tiny", text_cfg=_tiny_text_cfg(pooler_type))


def test_name_and_built_model_agree():
    assert text_pooler_type("medclip-tiny") == text_pooler_type(_tiny()) == "medclip_masked_pooler"
    # medclip-swin's tower is BERT-base: its pooler in medclip-tiny's small tower stands in for the build
    assert text_pooler_type("medclip-swin") == text_pooler_type(_tiny("medclip_pooler")) == "medclip_pooler"
    assert is_medclip_model("medclip-swin") and is_medclip_model(_tiny())


def test_openclip_native_and_default_poolers():
    assert text_pooler_type("RN50") is None  # OpenCLIP's own text transformer: no HF pooler
    assert text_pooler_type(None) is None and not is_medclip_model("RN50")



def _local_dir(folder, model_cfg: dict) -> str:
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return f"local-dir:{folder}"


def test_local_dir_model_is_read(tmp_path):
    assert text_pooler_type(_local_dir(tmp_path, open_clip.get_model_config("medclip-swin"))) == "medclip_pooler"
    assert text_pooler_type(f"local-dir:{tmp_path / 'missing'}") is None


def test_config_without_pooler_gets_openclips_default(tmp_path):
    model_cfg = dict(open_clip.get_model_config("medclip-tiny"), text_cfg=_tiny_text_cfg(None))
    name = _local_dir(tmp_path, model_cfg)
    assert text_pooler_type(name) == text_pooler_type(_tiny(None)) == open_clip.CLIPTextCfg.hf_pooler_type
    assert not is_medclip_model(name)


@pytest.mark.parametrize("name", sorted(hf_model._POOLERS))
def test_built_pooler_named_as_openclip_registers_it(name):
    tower = torch.nn.Module()
    tower.pooler = hf_model._POOLERS[name]()
    model = torch.nn.Module()
    model.text = tower
    assert text_pooler_type(model) == name


def test_width_rule_per_consumer():
    # training trims every HF tower; evaluation only the pooler that leaves padding out
    assert [text_multiple(p, training=True) for p in (None, "medclip_pooler", "medclip_masked_pooler", "cls_pooler")] \
        == [0, 1, 8, 8]
    assert [text_multiple(p, training=False) for p in (None, "medclip_pooler", "medclip_masked_pooler", "cls_pooler")] \
        == [0, 0, 8, 0]
