"""MedCLIP for OpenCLIP: importing this package registers the MedCLIP models with `open_clip`.

After `import open_clip_medclip`, `open_clip.create_model_and_transforms('medclip-swin')`,
`open_clip.get_tokenizer('medclip-swin')` and `pretrained=<official MedCLIP checkpoint>` work offline.
Nothing here touches the network.

Importing this package is cheap: it imports neither torch nor open_clip. When `open_clip` is already imported
the models are registered at once; otherwise a one-shot import hook registers them right after `import
open_clip` finishes (either order works). So `medclip label` and `medclip shards ...` start in a fraction of a
second, and the public names below (`MedclipPooler`, `MEDCLIP_MEAN`, ...) are imported on first access.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

_LAZY_NAMES = {
    "CHEXPERT_FINDINGS": "open_clip_medclip.findings",
    "NUM_FINDINGS": "open_clip_medclip.findings",
    "MEDCLIP_MEAN": "open_clip_medclip.models",
    "MEDCLIP_PREPROCESS_CFG": "open_clip_medclip.models",
    "MEDCLIP_STD": "open_clip_medclip.models",
    "MedclipMaskedPooler": "open_clip_medclip.models",
    "MedclipPooler": "open_clip_medclip.models",
    "medclip_image_transform": "open_clip_medclip.models",
}

__all__ = [
    "CHEXPERT_FINDINGS",
    "MEDCLIP_MEAN",
    "MEDCLIP_PREPROCESS_CFG",
    "MEDCLIP_STD",
    "MODEL_NAMES",
    "MedclipMaskedPooler",
    "MedclipPooler",
    "NUM_FINDINGS",
    "medclip_image_transform",
    "register",
]


def register() -> None:
    """Register the MedCLIP models, poolers, tags and wrappers with `open_clip` (imports it; idempotent)."""
    from open_clip_medclip.plugins import openclip_models

    openclip_models.install()


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    elif name == "MODEL_NAMES":
        from open_clip_medclip import models

        value = tuple(sorted(models.medclip_model_configs()))
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _RegisterAfterOpenClip(importlib.abc.MetaPathFinder):
    """One-shot meta-path hook: lets `open_clip` import as usual, then registers the MedCLIP models.

    It asks the finders after it for `open_clip`'s spec and wraps that spec's loader, so registration runs
    right after open_clip's module body; it removes itself once open_clip has been executed (a bare
    `importlib.util.find_spec('open_clip')` leaves it in place).
    """

    def find_spec(self, name, path=None, target=None):
        if name != "open_clip":
            return None
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def _install() -> None:
    if "open_clip" in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterOpenClip) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterOpenClip())


_install()
