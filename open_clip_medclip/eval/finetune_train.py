"""Fine-tuning one classifier: the splits (validation carved from the train split), AdamW with warm-up and cosine
decay, validation selection and early stopping, `progress.pt` written after every epoch and resumed from; and
`--freeze`, the linear probe turned into the classifier's head. The test split is never an argument here."""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from open_clip_medclip.checkpoints import atomic_save, unreadable_reason
from open_clip_medclip.eval.classifier import ImageClassifier
from open_clip_medclip.eval.embed import _collate, _ImageFiles
from open_clip_medclip.eval.linear_probe import fit_linear_probe, per_class_sample
from open_clip_medclip.eval.metrics import classification_metrics, multilabel_auc
from open_clip_medclip.eval.options import EvalOptions
from open_clip_medclip.eval.suites.definitions import SuiteError
from open_clip_medclip.eval.suites.load import Suite, SuiteEntry
from open_clip_medclip.frozen import warmup_cosine_lr

PROGRESS_FILE = "progress.pt"


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


def _optimizer(classifier: nn.Module, options: EvalOptions) -> torch.optim.Optimizer:
    decay = [p for p in classifier.parameters() if p.ndim >= 2]
    no_decay = [p for p in classifier.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=options.lr)


def train_classifier(classifier: ImageClassifier, suite: Suite, train: Sequence[SuiteEntry],
                     val: Sequence[SuiteEntry], options: EvalOptions, seed: int, device: str | torch.device,
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
    warmup_steps = int(round(options.warmup_fraction * total_steps))
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
                group["lr"] = warmup_cosine_lr(epoch * len(loader) + step, total_steps, options.lr, warmup_steps)
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


def _frozen_classifier(classifier: ImageClassifier, suite: Suite, options: EvalOptions, seed: int,
                       device: str | torch.device, progress: bool) -> dict:
    """`--freeze`: the linear probe (`fit_linear_probe`, unchanged) turned into the classifier's head."""
    if suite.multilabel:
        raise SuiteError(f"{suite.source}: --freeze (the linear probe) needs a multiclass suite")
    classifier.to(device)
    fit = fit_linear_probe(_EncodeImage(classifier.tower), suite, suite.split("train"), classifier.preprocess, device,
                           replace(options, seed=seed, progress=progress, autocast=_autocast(device, options.precision)))
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
