"""Fused kernels and `--torchcompile` (issue 15): SDPA in the BERT tower, timm's fused attention in the Swin tower,
a compiled `medclip-tiny` step with packed labels equal to eager, and a FLOPs proxy that runs on CPU."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip_medclip.plugins import openclip_models, openclip_train

import open_clip_medclip  # noqa: F401
from open_clip_medclip import models
from open_clip_medclip.labels import pack_batch
from open_clip_medclip.loss import SemanticMatchingLoss

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SENTENCES = ["the heart is enlarged .", "no acute disease .", "small left pleural effusion with basilar atelectasis .",
             "right lower lobe pneumonia .", "stable mild cardiomegaly", "no pneumothorax ."]


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.create_model("medclip-tiny", output_dict=True)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    openclip_train.enable_label_passthrough(model)
    return model


def _packed_batch(width: int, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = open_clip.get_tokenizer("medclip-tiny")([SENTENCES[i % len(SENTENCES)] for i in range(n)])[:, :width]
    image_labels = torch.randint(2, (n, 14), generator=g).float()
    text_labels = image_labels.clone()
    text_labels[::2] = 0
    return torch.randn(n, 3, 128, 128, generator=g), pack_batch(tokens, image_labels, text_labels)


def _step(model, step_model, images, texts):
    model.zero_grad(set_to_none=True)
    loss = SemanticMatchingLoss()(**step_model(images, texts))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same_step(eager, compiled):
    assert torch.allclose(eager[0], compiled[0], atol=1e-5)
    assert eager[1].keys() == compiled[1].keys()
    for name, grad in eager[1].items():
        assert torch.allclose(grad, compiled[1][name], atol=1e-5, rtol=1e-4), name


# ----------------------------------------------------------------------------------------------------------------
# Attention kernels
# ----------------------------------------------------------------------------------------------------------------
def test_text_tower_uses_sdpa_and_equals_eager_attention_with_padding():
    model = _tiny_model()
    model.eval()
    transformer = model.text.transformer
    assert transformer.config._attn_implementation == "sdpa"
    tokens = open_clip.get_tokenizer("medclip-tiny")(SENTENCES)  # padded to 77: a real padding mask
    assert (tokens == 0).any()
    with torch.no_grad():
        fused = model.encode_text(tokens)
        transformer.set_attn_implementation("eager")
        assert transformer.config._attn_implementation == "eager"
        plain = model.encode_text(tokens)
    assert torch.allclose(fused, plain, atol=1e-5)


class _NoSdpaModel:
    pass


class _SdpaModel:
    _supports_sdpa = True


class _FakeAuto:
    """A transformers Auto class stand-in: records the kwargs each build gets."""

    def __init__(self, model_class):
        self._model_mapping = {_FakeConfig: model_class}
        self.calls = []

    def from_config(self, config, *args, **kwargs):
        self.calls.append(kwargs)
        return kwargs


class _FakeConfig:
    pass


def test_resolver_asks_for_sdpa_only_where_the_model_class_supports_it():
    supported = _FakeAuto(_SdpaModel)
    resolver = openclip_models._BundledTowerResolver(supported, builds_model=True)
    assert resolver.from_config(_FakeConfig(), add_pooling_layer=False) == {"add_pooling_layer": False,
                                                                           "attn_implementation": "sdpa"}
    # the caller's explicit choice wins
    assert resolver.from_config(_FakeConfig(), attn_implementation="eager") == {"attn_implementation": "eager"}
    # a model class without SDPA support, or a config transformers does not map, builds as before
    assert openclip_models._BundledTowerResolver(_FakeAuto(_NoSdpaModel), builds_model=True).from_config(
        _FakeConfig()) == {}
    assert resolver.from_config(object()) == {}
    # the config resolver never adds model kwargs
    assert openclip_models._BundledTowerResolver(supported, builds_model=False)._attention(_FakeConfig(), {}) == {}


def test_swin_tower_runs_timm_fused_attention_and_equals_plain_attention(monkeypatch):
    import timm
    import timm.layers.config as timm_config
    from timm.layers import use_fused_attn

    assert use_fused_attn()
    name = models.portable_model_config("medclip-swin")["vision_cfg"]["timm_model_name"]
    torch.manual_seed(0)
    swin = timm.create_model(name, pretrained=False, num_classes=0).eval()
    attention = [module for module in swin.modules() if hasattr(module, "fused_attn")]
    assert len(attention) == 12  # swin-tiny: 2+2+6+2 blocks; timm leaves them unfused ("experimental")
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = swin(image)
        monkeypatch.setattr(timm_config, "_USE_FUSED_ATTN", 0)  # TIMM_FUSED_ATTN=0: timm's off switch is kept
        assert models.enable_fused_attention(swin) == 0
        monkeypatch.undo()
        assert models.enable_fused_attention(swin) == 12 and all(module.fused_attn for module in attention)
        assert models.enable_fused_attention(swin) == 0  # already fused
        fused = swin(image)
    assert torch.allclose(fused, plain, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# torch.compile with the label-passthrough subclass and packed labels
# ----------------------------------------------------------------------------------------------------------------
def test_compiled_tiny_step_with_packed_labels_equals_eager():
    """Dynamo traces the passthrough subclass (the label unpacking is a graph break) and gives eager's step."""
    torch._dynamo.reset()
    model = _tiny_model()
    images, texts = _packed_batch(16)
    eager = _step(model, model, images, texts)
    compiled = _step(model, torch.compile(model, backend="eager"), images, texts)
    _assert_same_step(eager, compiled)


@pytest.mark.slow
def test_aot_compiled_step_handles_trimmed_widths():
    """AOTAutograd (forward and backward graphs) on batches trimmed to different widths, as the streams produce."""
    torch._dynamo.reset()
    model = _tiny_model()
    compiled_model = torch.compile(model, backend="aot_eager")
    for width in (16, 24, 40):
        images, texts = _packed_batch(width, seed=width)
        _assert_same_step(_step(model, model, images, texts), _step(model, compiled_model, images, texts))


@pytest.mark.slow
def test_medclip_train_torchcompile_runs_an_epoch(tmp_path: Path, small_shards):
    """`medclip train --torchcompile` (inductor, as on a GPU) trains one epoch of the tiny config on CPU."""
    from open_clip_medclip import train as medclip_train

    torch._dynamo.reset()
    argv = ["--model", "medclip-tiny", "--train-data", small_shards["all"], "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--precision", "fp32", "--warmup", "1", "--lr", "1e-4", "--log-every-n-steps", "1",
            "--logs", str(tmp_path), "--name", "compiled", "--seed", "0", "--train-num-samples", "8",
            "--epochs", "1", "--torchcompile"]
    assert medclip_train.main(argv) == 0
    log = (tmp_path / "compiled" / "out.log").read_text()
    assert "Compiling model" in log and "Semantic_matching_loss" in log


# ----------------------------------------------------------------------------------------------------------------
# FLOPs proxy (tests/benchmarks/bench_flops.py) on a tiny config
# ----------------------------------------------------------------------------------------------------------------
def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_proxy_counts_trimmed_batches_exactly(tmp_path: Path, capsys):
    bench = _load_benchmark("bench_flops")
    out = tmp_path / "flops.json"
    assert bench.main(["--model", "medclip-tiny", "--batches", "4", "--batch-size", "16", "--iu-reports", "60",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"]
    per_sample = result["flops_per_sample"]
    assert per_sample["trimmed"] < per_sample["padded_77"] and per_sample["bucketed"] <= per_sample["trimmed"]
    assert result["ratios"]["trimmed_over_padded"] == pytest.approx(per_sample["trimmed"] / per_sample["padded_77"],
                                                                     abs=1e-3)
    # exactness: the per-width text-tower counts used by the proxy equal a direct count of a whole trimmed batch
    check = result["direct_check"]
    assert check["counted"] == check["predicted"]
    # medclip-tiny's pooler is masked: the padding-free tower is counted too, below trimming, and its per-text cost
    # model (fitted from one-text counts) equals a direct count of a mixed batch
    assert per_sample["padding_free"] < per_sample["trimmed"]
    free_check = result["padding_free"]["direct_check"]
    assert free_check["counted"] == free_check["predicted"] and len(set(free_check["lengths"])) > 1
    assert "trimmed" in capsys.readouterr().out
    # exact-longest widths (the reference pooler's rule) never cost more than rounding up to 8
    assert bench.main(["--model", "medclip-tiny", "--batches", "4", "--batch-size", "16", "--iu-reports", "60",
                       "--text-multiple", "1", "--out", str(out)]) == 0
    exact = json.loads(out.read_text())["results"]
    assert exact["text_multiple"] == 1
    assert exact["flops_per_sample"]["trimmed"] <= exact["flops_per_sample"]["trimmed_multiple_8"]
    assert exact["direct_check"]["counted"] == exact["direct_check"]["predicted"]
