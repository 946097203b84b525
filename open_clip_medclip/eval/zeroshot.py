"""Zero-shot classification on a suite: per-class prompt ensembles, MedCLIP's and OpenCLIP's ensembling.

Ensembling (MedCLIP 0.0.3, `medclip/modeling_medclip.py`): `logit` = MedCLIP's `PromptClassifier(ensemble=True)`,
the mean over a class's prompts of scale x cos(image, prompt) = scale x image . mean(normalised prompt embeddings), *not*
re-normalised; `embed` = OpenCLIP / CLIP_benchmark, the mean embedding re-normalised; `max` = MedCLIP's
default `ensemble=False`. Multi-label suites use CheXzero-style positive/negative prompt pairs: P(finding) =
softmax over (scale x cos(image, "{finding}"), scale x cos(image, "no {finding}")).

`zero_shot_metrics(model, suite_or_dir, tokenizer, preprocess, device)` is the flat-dict entry point that
training hooks call (master rank only; it unwraps DDP and restores the model's train/eval mode).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from open_clip_medclip.eval.embed import embed_images, embed_texts, evaluation_mode, logit_scale
from open_clip_medclip.eval.metrics import classification_metrics, multilabel_auc
from open_clip_medclip.eval.options import EvalOptions, EvalResult
from open_clip_medclip.eval.prompts import chexzero_pairs, prompts_hash, select_classes
from open_clip_medclip.eval.suites.definitions import suite_prompts
from open_clip_medclip.eval.suites.load import Suite, load_suite

ENSEMBLES = ("logit", "embed", "max")
LINEAR_ENSEMBLES = ("logit", "embed")
SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "auc")


def ensemble_weights(prompt_features: Sequence[np.ndarray], ensemble: str = "logit") -> np.ndarray:
    """(d, C) class weights of a linear ensemble: `logit` = mean of the normalised prompt embeddings, `embed` = that
    mean re-normalised. `max` is not linear in the image embedding, so it has no weight matrix."""
    if ensemble not in LINEAR_ENSEMBLES:
        raise ValueError(f"ensemble {ensemble!r} has no class weight matrix; use one of {LINEAR_ENSEMBLES}")
    columns = []
    for feats in prompt_features:
        mean = feats.mean(axis=0)
        columns.append(mean / np.linalg.norm(mean) if ensemble == "embed" else mean)
    return np.stack(columns, axis=1)


def pair_weights(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """(d, C) weights whose logit is a finding's positive minus negative prompt logit (CheXzero pairs): its sigmoid
    is the softmax over the (positive, negative) pair."""
    return (positive - negative).T


def linear_logits(image_features, weights, scale: float):
    """The one scoring rule: scale x (normalised image features @ class weights). numpy or torch alike, so
    `medclip eval zeroshot`, `medclip predict`, the Python API and CLIP_benchmark's AUROC all score through it."""
    return scale * (image_features @ weights)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def class_scores(image_features: np.ndarray, prompt_features: Sequence[np.ndarray], ensemble: str = "logit",
                 scale: float = 100.0) -> np.ndarray:
    """(n, C) logits from normalised image features and each class's normalised prompt features."""
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {ENSEMBLES}")
    if ensemble == "max":
        return scale * np.stack([(image_features @ feats.T).max(axis=1) for feats in prompt_features], axis=1)
    return linear_logits(image_features, ensemble_weights(prompt_features, ensemble), scale)


def pair_probabilities(image_features: np.ndarray, positive: np.ndarray, negative: np.ndarray,
                       scale: float = 100.0) -> np.ndarray:
    """(n, C) CheXzero probabilities: softmax over each finding's (positive, negative) prompt logits."""
    return sigmoid(linear_logits(image_features, pair_weights(positive, negative), scale))


CLIP_BENCHMARK_SCALE = 100.0  # CLIP_benchmark's fixed logit scale (`100. * image_features @ classifier`)


def auroc_summary(targets: np.ndarray, logits: np.ndarray, classes: Sequence[str], scale: float,
                  logits_scale: float = CLIP_BENCHMARK_SCALE) -> dict:
    """Flat AUROC entries for a results file whose `logits` were computed at `logits_scale` (CLIP_benchmark: 100):
    rescaled to the model's own `scale`, they are exactly `medclip eval zeroshot`'s scores, so the AUROCs (OvR on
    softmax for single-label targets (n,), per label for multi-label targets (n, C)) equal its AUCs.
    Keys: `auroc_macro`, `auroc_per_class` {class: value} and, for two classes, `auroc` (class 1 positive)."""
    scores = np.asarray(logits, dtype=np.float64) * (scale / logits_scale)
    targets = np.asarray(targets)
    metrics = (multilabel_auc(targets, scores, classes, 0) if targets.ndim == 2
               else classification_metrics(targets, scores, classes, 0))
    out = {"auroc_macro": metrics["macro_auc"]["value"],
           "auroc_per_class": {c: metrics["per_class"][c]["auc"]["value"] for c in classes}}
    if "auc" in metrics:
        out["auroc"] = metrics["auc"]["value"]
    return out


def _resolve_prompts(suite: Suite, prompts: str | Mapping | None, per_class, seed: int) -> dict[str, list[str]]:
    if isinstance(prompts, Mapping):
        return select_classes(prompts, suite.classes, where="prompts")
    return suite_prompts(suite.definition, prompts, per_class, seed)


def suite_class_prompts(suite: Suite) -> tuple[dict[str, list[str]], str]:
    """(the class prompts `run_zeroshot` uses by default: its first draw, the suite's ensembling) of a binary or
    multi-class suite; for scoring cached features the same way (`open_clip_medclip.frozen`)."""
    spec = suite.definition.get("prompts") or {}
    return (_resolve_prompts(suite, None, "default", int(spec.get("seed", 42))),
            suite.definition.get("ensemble", "logit"))


def pair_scores(model: torch.nn.Module, tokenizer: Callable, image_features: np.ndarray, classes: Sequence[str],
                scale: float, device: str | torch.device = "cpu",
                autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> np.ndarray:
    """(n, C) multi-label scores of normalised image features: each class's CheXzero prompt pair embedded by
    `model` (in its current mode), then `pair_probabilities`."""
    pairs = chexzero_pairs(classes)
    pos = embed_texts(model, tokenizer, [p for p, _ in pairs.values()], device, autocast=autocast)
    neg = embed_texts(model, tokenizer, [n for _, n in pairs.values()], device, autocast=autocast)
    return pair_probabilities(image_features, pos, neg, scale)


def run_zeroshot(model: torch.nn.Module, suite: Suite | str, tokenizer: Callable, preprocess: Callable,
                 device: str | torch.device = "cpu", options: EvalOptions | None = None) -> EvalResult:
    """Zero-shot metrics of `model` on the suite's test split (bootstrap CIs on the first prompt draw)."""
    o = options or EvalOptions()
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    spec = suite.definition.get("prompts") or {}
    ensemble = o.ensemble or suite.definition.get("ensemble", "logit")
    seed = int(spec.get("seed", 42) if o.prompt_seed is None else o.prompt_seed)
    runs = int(o.prompt_runs or spec.get("runs", 1) or 1)
    entries = suite.split("test")
    if o.max_images is not None:
        entries = entries[:o.max_images]
    if not entries:
        raise ValueError(f"{suite.source}: the suite has no test images")
    suite.check_images(entries, verify_hashes=o.verify_hashes)
    with evaluation_mode(model) as model:
        features, kept, failures = embed_images(model, preprocess, [e.image_path for e in entries], device,
                                                o.batch_size, o.workers, o.progress, o.autocast)
        scale = logit_scale(model)
        if len(kept) == 0:
            raise ValueError(f"{suite.source}: none of the {len(entries)} test images could be decoded")
        kept_entries = [entries[i] for i in kept]
        targets = suite.label_index(kept_entries)
        if suite.multilabel:
            scores = pair_scores(model, tokenizer, features, suite.classes, scale, device, o.autocast)
            metrics = multilabel_auc(targets, scores, suite.classes, o.bootstrap, o.seed)
            prompt_record: dict = {"pairs": {k: list(v) for k, v in chexzero_pairs(suite.classes).items()}}
            run_values: list[dict] = []
        else:
            draws = [_resolve_prompts(suite, o.prompts, o.prompts_per_class, seed + r) for r in range(runs)]
            unique = sorted({t for draw in draws for texts in draw.values() for t in texts})
            text_features = embed_texts(model, tokenizer, unique, device, autocast=o.autocast)
            row = {t: i for i, t in enumerate(unique)}
            run_values, scores, metrics = [], None, {}
            for r, draw in enumerate(draws):
                per_class = [text_features[[row[t] for t in draw[c]]] for c in suite.classes]
                run_scores = class_scores(features, per_class, ensemble, scale)
                run_metrics = classification_metrics(targets, run_scores, suite.classes,
                                                     o.bootstrap if r == 0 else 0, o.seed)
                if r == 0:
                    scores, metrics = run_scores, run_metrics
                run_values.append({k: run_metrics[k]["value"] for k in SUMMARY_KEYS if k in run_metrics})
            prompt_record = {"per_class": draws[0], "sha256": prompts_hash(draws[0]), "seed": seed, "runs": runs,
                             "set": o.prompts if isinstance(o.prompts, str) else spec.get("set")}
    metrics.update({
        "suite": suite.name, "task": suite.task, "classes": suite.classes, "ensemble": ensemble,
        "logit_scale": scale, "manifest_sha256": suite.manifest_sha256, "prompts": prompt_record,
        "num_images": len(entries), "num_excluded_corrupt": len(failures), "excluded_corrupt": failures,
    })
    if len(run_values) > 1:
        metrics["prompt_runs"] = {k: {"mean": float(np.mean([v[k] for v in run_values if v.get(k) is not None])),
                                      "std": float(np.std([v[k] for v in run_values if v.get(k) is not None])),
                                      "values": [v.get(k) for v in run_values]}
                                  for k in run_values[0] if run_values[0][k] is not None}
    return EvalResult(metrics=metrics, features=features, targets=targets, scores=scores, entries=kept_entries)


def flatten_metrics(metrics: Mapping, prefix: str) -> dict[str, float]:
    """Scalar metrics for logs: {'<prefix>-accuracy': 0.41, ..., '<prefix>-auc-Edema': ...}."""
    out: dict[str, float] = {}
    for key in (*SUMMARY_KEYS, "num_excluded_corrupt"):
        value = metrics.get(key)
        if isinstance(value, Mapping):
            value = value.get("value")
        if value is not None:
            out[f"{prefix}-{key.replace('_', '-')}"] = float(value)
    for cls, entry in (metrics.get("per_class") or {}).items():
        if entry.get("auc", {}).get("value") is not None:
            out[f"{prefix}-auc-{cls}"] = float(entry["auc"]["value"])
    return out


def zero_shot_metrics(model: torch.nn.Module, suite_or_dir: Suite | str, tokenizer: Callable, preprocess: Callable,
                      device: str | torch.device = "cpu", *, prefix: str | None = None, num_resamples: int = 0,
                      batch_size: int = 32, num_workers: int = 0, ensemble: str | None = None,
                      autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                      progress: bool = False) -> dict[str, float]:
    """Flat zero-shot metrics for training logs: keys '<suite>-zeroshot-accuracy', '-balanced-accuracy', ...

    Call on the master rank only; cheap by default (no bootstrap, one prompt draw).
    """
    suite = suite_or_dir if isinstance(suite_or_dir, Suite) else load_suite(suite_or_dir)
    options = EvalOptions(prompt_runs=1, ensemble=ensemble, batch_size=batch_size, workers=num_workers,
                          bootstrap=num_resamples, progress=progress, autocast=autocast)
    result = run_zeroshot(model, suite, tokenizer, preprocess, device, options)
    return flatten_metrics(result.metrics, prefix or f"{suite.name}-zeroshot")
