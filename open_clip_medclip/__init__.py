"""MedCLIP for OpenCLIP: importing this package registers the MedCLIP models with `open_clip`.

After `import open_clip_medclip`, `open_clip.create_model_and_transforms('medclip-swin')`,
`open_clip.get_tokenizer('medclip-swin')` and `pretrained=<official MedCLIP checkpoint>` work offline.
Nothing here touches the network.

Importing this package is cheap: it imports neither torch nor open_clip. When `open_clip` is already imported
the models are registered at once; otherwise a one-shot import hook registers them right after `import
open_clip` finishes (either order works). So `medclip label` and `medclip shards ...` start in a fraction of a
second, and the public names below (`MedclipPooler`, `MEDCLIP_MEAN`, ...) are imported on first access, among them the
zero-shot API of `open_clip_medclip.zero_shot` (`prompts`, `ZeroShotClassifier`, `predict`, `heatmap`, ...).
"""
from __future__ import annotations

import sys

from open_clip_medclip.import_hook import AfterImport
from open_clip_medclip.lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY_NAMES = {
    "CHEXPERT_FINDINGS": "findings", "NUM_FINDINGS": "findings",
    "MEDCLIP_MEAN": "models", "MEDCLIP_PREPROCESS_CFG": "models", "MEDCLIP_STD": "models",
    "MedclipMaskedPooler": "models", "MedclipPooler": "models", "medclip_image_transform": "models",
    "ImageClassifier": "zero_shot", "Predictions": "zero_shot", "ZeroShotClassifier": "zero_shot",
    "build_multilabel_classifier": "zero_shot", "build_zero_shot_classifier": "zero_shot", "heatmap": "zero_shot",
    "predict": "zero_shot", "prompts": "zero_shot",
}

__all__ = sorted([*_LAZY_NAMES, "MODEL_NAMES", "register"])


def register() -> None:
    """Register the MedCLIP models, poolers, tags and wrappers with `open_clip` (imports it; idempotent)."""
    from open_clip_medclip.plugins import openclip_models

    openclip_models.install()


_lazy_getattr, __dir__ = lazy_attributes(__name__, _LAZY_NAMES, __all__)


def __getattr__(name: str):
    if name != "MODEL_NAMES":
        return _lazy_getattr(name)
    from open_clip_medclip import models

    value = globals()[name] = tuple(sorted(models.medclip_model_configs()))
    return value


def _install() -> None:
    """Register now if `open_clip` is imported, else right after it is (`import_hook.AfterImport`, one-shot)."""
    if "open_clip" in sys.modules:
        register()
    elif not any(isinstance(finder, AfterImport) and "open_clip" in finder.pending for finder in sys.meta_path):
        AfterImport.install(["open_clip"], lambda name, module: register())


_install()
