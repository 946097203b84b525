"""MedCLIP for OpenCLIP: importing this package registers the MedCLIP models with `open_clip`.

After `import open_clip_medclip`, `open_clip.create_model_and_transforms('medclip-swin')`,
`open_clip.get_tokenizer('medclip-swin')` and `pretrained=<official MedCLIP checkpoint>` work offline.
Nothing here touches the network.
"""
from open_clip_medclip.findings import CHEXPERT_FINDINGS, NUM_FINDINGS
from open_clip_medclip.models import (
    MEDCLIP_MEAN,
    MEDCLIP_PREPROCESS_CFG,
    MEDCLIP_STD,
    MedclipMaskedPooler,
    MedclipPooler,
    medclip_image_transform,
)
from open_clip_medclip.plugins import openclip_models as _openclip_models

__version__ = "0.1.0"

_openclip_models.install()

MODEL_NAMES = tuple(sorted(_openclip_models.models.medclip_model_configs()))

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
]
