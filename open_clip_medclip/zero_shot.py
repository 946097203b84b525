"""Use the model on your own X-rays: MedCLIP's prompts, zero-shot classifiers and predictions, in OpenCLIP's idiom.

    import open_clip, open_clip_medclip as mc
    model, _, preprocess = open_clip.create_model_and_transforms('medclip-swin', pretrained=...)
    tokenizer = open_clip.get_tokenizer('medclip-swin')
    classifier = mc.ZeroShotClassifier.from_prompts(model, tokenizer, mc.prompts('chexpert', per_class=10))
    result = mc.predict(model, ['a.png', 'b.dcm'], classifier, preprocess=preprocess)

`build_zero_shot_classifier` returns the `(dim, classes)` weight tensor the way `open_clip.build_zero_shot_classifier`
does, but from class-specific prompts (MedCLIP's grids), which OpenCLIP's template API cannot express;
`build_multilabel_classifier` gives one independent logit per finding from CheXzero-style positive/negative prompt
pairs. Scores go through `eval.zeroshot.linear_logits`, the rule `medclip eval zeroshot` uses, so the API,
`medclip predict`, `medclip eval zeroshot` and CLIP_benchmark's AUROC agree.

A classifier for `predict` is any object with `classes`, `activation` ('softmax' or 'sigmoid'), `logits(images)`
(a preprocessed batch -> (n, C) logits) and `provenance()` (a JSON-able dict); `ZeroShotClassifier` is one, and
its `heatmaps(images)` draws each class's additive share of the logit (see `open_clip_medclip.heatmaps`); a
fine-tuned classifier loaded with `eval.classifier.load_classifier` is another (`predict(classifier, images)`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from open_clip_medclip.eval.embed import (
    embed_texts,
    encode_normalized,
    evaluation_mode,
    image_batches,
    logit_scale,
    unwrap,
)
from open_clip_medclip.eval.metrics import softmax
from open_clip_medclip.eval.prompts import (
    available_prompt_sets,
    chexzero_pairs,
    load_prompt_set,
    prompts_hash,
    sample_prompts,
    select_classes,
)
from open_clip_medclip.eval.zeroshot import LINEAR_ENSEMBLES, ensemble_weights, linear_logits, pair_weights, sigmoid
from open_clip_medclip.findings import CHEXPERT_FINDINGS

# Short names for MedCLIP's packaged prompt sets (any packaged file stem or JSON path works too).
PROMPT_SET_ALIASES = {"chexpert": "medclip_chexpert", "covid": "medclip_covid", "rsna": "medclip_rsna",
                      "rsna-corrected": "rsna_corrected"}
PAIRS = "chexzero"  # prompts("chexzero", findings): {finding: [positive, negative]}
ACTIVATIONS = ("softmax", "sigmoid")


def prompts(name_or_mapping: str | Path | Mapping[str, Sequence[str]], classes: Sequence[str] | None = None,
            per_class: int | None = None, seed: int | None = 42) -> dict[str, list[str]]:
    """Per-class prompt sentences: a packaged MedCLIP set by name ('chexpert', 'covid', 'rsna', 'rsna-corrected'),
    a JSON file (our prompt-file format or a plain `{class: [sentences]}`), your own mapping, or 'chexzero' for
    CheXzero-style `{finding: [positive, negative]}` pairs (default: the 14 CheXpert findings).

    `classes` picks and orders classes; `per_class` draws that many prompts per class with `seed` (MedCLIP's
    seeded `random.sample`; all prompts when None).
    """
    if isinstance(name_or_mapping, str) and name_or_mapping.lower() == PAIRS:
        return {cls: list(pair) for cls, pair in chexzero_pairs(list(classes or CHEXPERT_FINDINGS)).items()}
    if isinstance(name_or_mapping, Mapping):
        full = {str(k): [str(t) for t in v] for k, v in name_or_mapping.items()}
    else:
        full = _load_named(name_or_mapping)
    if classes is not None:
        full = select_classes(full, list(classes), where=f"prompts {name_or_mapping!r}" if isinstance(
            name_or_mapping, (str, Path)) else "prompts")
    if any(not texts for texts in full.values()):
        raise ValueError("every class needs at least one prompt")
    return sample_prompts(full, per_class, seed)


def _load_named(name: str | Path) -> dict[str, list[str]]:
    name = PROMPT_SET_ALIASES.get(str(name).lower(), str(name))
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "classes" not in data and all(isinstance(v, list) for v in data.values()):
            return {str(k): [str(t) for t in v] for k, v in data.items()}
    try:
        return load_prompt_set(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt set {str(name)!r}: no such JSON file and no packaged set of that name "
                                f"(names: {', '.join([*PROMPT_SET_ALIASES, PAIRS])})") from None


def default_prompt_set(classes: Sequence[str]) -> str | None:
    """The packaged MedCLIP prompt set that covers all `classes` (chexpert, covid, rsna), or None."""
    for alias, stem in PROMPT_SET_ALIASES.items():
        if stem in available_prompt_sets() and set(classes) <= set(load_prompt_set(stem)):
            return alias
    return None


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


@torch.no_grad()
def build_zero_shot_classifier(model: nn.Module, tokenizer: Callable, class_prompts: Mapping[str, Sequence[str]],
                               ensemble: str = "logit", device: str | torch.device | None = None) -> torch.Tensor:
    """(dim, classes) weights from class-specific prompts: `logit` = MedCLIP's `PromptClassifier(ensemble=True)`
    (mean of normalised prompt embeddings), `embed` = OpenCLIP's (that mean re-normalised). Computed once per call:
    keep the result (or a `ZeroShotClassifier`) to score any number of images without touching the text tower."""
    if ensemble not in LINEAR_ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {LINEAR_ENSEMBLES}")
    model = unwrap(model)
    device = device or _device_of(model)
    classes = list(class_prompts)

    texts = [t for c in classes for t in class_prompts[c]]
    with evaluation_mode(model):
        feats = embed_texts(model, tokenizer, texts, device)
    bounds = np.cumsum([0] + [len(class_prompts[c]) for c in classes])
    weights = ensemble_weights([feats[a:b] for a, b in zip(bounds[:-1], bounds[1:])], ensemble)
    return torch.from_numpy(weights).to(device)


@torch.no_grad()
def build_multilabel_classifier(model: nn.Module, tokenizer: Callable,
                                pairs: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
                                device: str | torch.device | None = None) -> torch.Tensor:
    """(dim, findings) weights whose logit is a finding's positive minus negative prompt logit, so that
    sigmoid(logit) = softmax over the pair (CheXzero; what `medclip eval zeroshot` scores multi-label suites with).
    `pairs`: `{finding: [positive, negative]}` or finding names (default: the 14 CheXpert findings)."""
    if pairs is None or not isinstance(pairs, Mapping):
        pairs = prompts(PAIRS, classes=pairs)
    for cls, pair in pairs.items():
        if len(pair) != 2:
            raise ValueError(f"finding {cls!r}: expected [positive, negative] prompts, got {len(pair)}")
    model = unwrap(model)
    device = device or _device_of(model)

    with evaluation_mode(model):
        pos = embed_texts(model, tokenizer, [p for p, _ in pairs.values()], device)
        neg = embed_texts(model, tokenizer, [n for _, n in pairs.values()], device)
    return torch.from_numpy(pair_weights(pos, neg)).to(device)


@runtime_checkable
class ImageClassifier(Protocol):
    """What `predict` and `medclip predict` need from a classifier (zero-shot here; a fine-tuned head elsewhere)."""

    classes: list[str]
    activation: str

    def logits(self, images: torch.Tensor) -> torch.Tensor: ...

    def provenance(self) -> dict: ...


class ZeroShotClassifier(nn.Module):
    """Image batch -> logits `scale x normalised image embedding @ weights`; probabilities by `activation`
    (softmax for one class per image, sigmoid for independent findings)."""

    def __init__(self, model: nn.Module, weights: torch.Tensor, classes: Sequence[str], activation: str = "softmax",
                 scale: float | None = None, description: Mapping | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r}: choose one of {ACTIVATIONS}")
        if weights.shape[1] != len(classes):
            raise ValueError(f"weights have {weights.shape[1]} columns for {len(classes)} classes")
        self.model = unwrap(model)
        self.register_buffer("weights", weights.detach().float())
        self.classes = list(classes)
        self.activation = activation
        self.scale = float(logit_scale(self.model) if scale is None else scale)
        self.description = dict(description or {})

    @classmethod
    def from_prompts(cls, model: nn.Module, tokenizer: Callable, class_prompts: Mapping[str, Sequence[str]],
                     ensemble: str = "logit") -> ZeroShotClassifier:
        """Multi-class (softmax) over class-specific prompt ensembles."""
        weights = build_zero_shot_classifier(model, tokenizer, class_prompts, ensemble)
        return cls(model, weights, list(class_prompts), "softmax", description={
            "task": "multi-class", "ensemble": ensemble, "prompts_sha256": prompts_hash(class_prompts),
            "prompts_per_class": {c: len(v) for c, v in class_prompts.items()}})

    @classmethod
    def multilabel(cls, model: nn.Module, tokenizer: Callable,
                   findings: Sequence[str] | Mapping[str, Sequence[str]] | None = None) -> ZeroShotClassifier:
        """Independent probabilities per finding from positive/negative prompt pairs (default: 14 CheXpert)."""
        pairs = findings if isinstance(findings, Mapping) else prompts(PAIRS, classes=findings)
        weights = build_multilabel_classifier(model, tokenizer, pairs)
        return cls(model, weights, list(pairs), "sigmoid", description={
            "task": "multi-label", "ensemble": "pairs", "prompts_sha256": prompts_hash(pairs),
            "pairs": {k: list(v) for k, v in pairs.items()}})

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return linear_logits(features, self.weights.to(features.device), self.scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(encode_normalized(self.model, images, self.weights.device))

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Inference logits: the model in eval mode (no dropout / drop-path), its previous mode restored."""
        with evaluation_mode(self.model):
            return self(images)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.logits(images)
        return logits.softmax(-1) if self.activation == "softmax" else logits.sigmoid()

    @torch.no_grad()
    def heatmaps(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, h, w) additive shares: their mean over locations is each class's logit (see `heatmap`)."""
        from open_clip_medclip.heatmaps import logit_shares

        with evaluation_mode(self.model):
            return logit_shares(self.model, images.to(self.weights.device), self.weights, self.scale)

    def provenance(self) -> dict:
        return {"classifier": "zero-shot", "classes": self.classes, "activation": self.activation,
                "logit_scale": self.scale, **self.description}


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """Probabilities from logits: softmax over classes or an independent sigmoid per finding."""
    return softmax(logits) if activation == "softmax" else sigmoid(logits)


@dataclass
class Predictions:
    """Per-image results in input order: `logits` and `probabilities` (n, C); `rejected` [{image, error}]."""

    items: list[str]
    classes: list[str]
    activation: str
    logits: np.ndarray
    probabilities: np.ndarray
    rejected: list[dict] = field(default_factory=list)

    @property
    def top_classes(self) -> list[str]:
        return [self.classes[i] for i in self.probabilities.argmax(axis=1)] if len(self.items) else []

    def as_dicts(self) -> list[dict]:
        """One `{image, <class>: probability, ..., top_class}` dict per image."""
        return [{"image": item, **{c: float(p) for c, p in zip(self.classes, row)}, "top_class": top}
                for item, row, top in zip(self.items, self.probabilities, self.top_classes)]


def default_preprocess(model: nn.Module) -> Callable:
    """The model's OpenCLIP validation transform (what `create_model_and_transforms` returns third)."""
    import open_clip

    cfg = dict(unwrap(model).visual.preprocess_cfg)
    keys = ("mean", "std", "resize_mode", "interpolation", "fill_color")
    return open_clip.image_transform(cfg["size"], is_train=False, **{k: cfg[k] for k in keys if k in cfg})


def _as_paths(images) -> list[Path] | None:
    if isinstance(images, (str, Path)):
        images = [images]
    if isinstance(images, (list, tuple)) and all(isinstance(i, (str, Path)) for i in images):
        from open_clip_medclip.image_inputs import collect_inputs

        return collect_inputs([str(i) for i in images])
    return None


@torch.no_grad()
def predict(model: nn.Module, images, classifier: ImageClassifier | None = None, *, tokenizer: Callable | None = None,
            preprocess: Callable | None = None, batch_size: int = 32, num_workers: int = 0) -> Predictions:
    """Predictions for image files or folders (decoded like the shard builder: PNG/JPEG 8/16-bit, DICOM), PIL images,
    or a preprocessed tensor batch. Default classifier: the 14 CheXpert findings, multi-label (needs `tokenizer`).
    A fine-tuned classifier (`eval.classifier.load_classifier`) is its own model: `predict(classifier, images)`, with
    its own preprocessing. Unreadable files are listed in `rejected`, the rest predicted."""
    if classifier is None and isinstance(model, ImageClassifier):
        classifier = model
    if classifier is None:
        if tokenizer is None:
            raise ValueError("predict: pass a classifier, or a tokenizer for the default CheXpert multi-label one")
        classifier = ZeroShotClassifier.multilabel(model, tokenizer)
    preprocess = preprocess or getattr(classifier, "preprocess", None) or default_preprocess(model)
    paths = _as_paths(images)
    logits, items, rejected = [], [], []
    if paths is not None:
        for batch, kept, failed in image_batches(paths, preprocess, batch_size, num_workers):
            rejected += failed
            if batch is not None:
                logits.append(classifier.logits(batch).float().cpu().numpy())
                items += [str(paths[i]) for i in kept]
    else:
        if isinstance(images, torch.Tensor):
            batch = images if images.ndim == 4 else images.unsqueeze(0)
        else:
            from open_clip_medclip.shards.images import to_grayscale_8bit

            pictures = list(images) if isinstance(images, (list, tuple)) else [images]
            batch = torch.stack([preprocess(to_grayscale_8bit(p).convert("RGB")) for p in pictures])
        for start in range(0, len(batch), batch_size):
            logits.append(classifier.logits(batch[start:start + batch_size]).float().cpu().numpy())
        items = [f"<image {i}>" for i in range(len(batch))]
    scores = np.concatenate(logits) if logits else np.zeros((0, len(classifier.classes)), np.float32)
    return Predictions(items, list(classifier.classes), classifier.activation, scores,
                       activate(scores, classifier.activation), rejected)


@torch.no_grad()
def heatmap(model: nn.Module, classifier: ZeroShotClassifier, image, preprocess: Callable | None = None) -> np.ndarray:
    """(C, h, w) per-location shares of each class's logit for one image (path, PIL image or preprocessed tensor):
    their mean over the h x w feature grid equals the logit exactly (pooling and projection commute)."""
    preprocess = preprocess or default_preprocess(model)
    if isinstance(image, (str, Path)):
        from open_clip_medclip.eval.suites.build import load_image

        image = load_image(image)
    if not isinstance(image, torch.Tensor):
        from open_clip_medclip.shards.images import to_grayscale_8bit

        image = preprocess(to_grayscale_8bit(image).convert("RGB"))
    batch = image if image.ndim == 4 else image.unsqueeze(0)
    return classifier.heatmaps(batch)[0].cpu().numpy()
