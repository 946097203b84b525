"""Classification and retrieval metrics with seeded, vectorised bootstrap 95% confidence intervals.

Peers report ACC or AUC on one unseeded draw; every number here carries a percentile bootstrap CI over
resampled test images (one `numpy` index matrix, no Python loop over resamples). Point estimates follow
scikit-learn's definitions (tests compare them): balanced accuracy = mean recall over classes present in
`y_true`; macro-F1 over the labels present in `y_true` or `y_pred`, 0 where undefined; one-vs-rest AUC per
class (Mann-Whitney with mid-ranks for ties) and their mean over classes with both outcomes present.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

DEFAULT_BOOTSTRAP = 1000
DEFAULT_SEED = 0
RETRIEVAL_KS: tuple[int, ...] = (1, 2, 5, 10)


def nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """`np.nanmean` that returns NaN for all-NaN slices without a RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _confusion_batch(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrices for a batch of label rows: (B, n) -> (B, C, C) with [b, true, pred] counts."""
    batch = y_true.shape[0]
    flat = (np.arange(batch)[:, None] * num_classes * num_classes + y_true * num_classes + y_pred).ravel()
    counts = np.bincount(flat, minlength=batch * num_classes * num_classes)
    return counts.reshape(batch, num_classes, num_classes).astype(np.float64)


def _accuracy(cm: np.ndarray) -> np.ndarray:
    return np.trace(cm, axis1=1, axis2=2) / cm.sum(axis=(1, 2))


def _balanced_accuracy(cm: np.ndarray) -> np.ndarray:
    support = cm.sum(axis=2)
    correct = np.diagonal(cm, axis1=1, axis2=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, correct / support, np.nan)
    return nanmean(recall, axis=1)


def _per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 per class (B, C), 0 where precision+recall is undefined, NaN for labels absent from truth and prediction."""
    correct = np.diagonal(cm, axis1=1, axis2=2)
    true_count = cm.sum(axis=2)
    pred_count = cm.sum(axis=1)
    denom = true_count + pred_count
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * correct / denom, np.nan)
    return f1


def _macro_f1(cm: np.ndarray) -> np.ndarray:
    return nanmean(_per_class_f1(cm), axis=1)


def binary_auc_batch(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """ROC AUC per row: scores (B, n) float, positives (B, n) bool; NaN where a row lacks either outcome."""
    ranks = rankdata(scores, axis=1)
    n_pos = positives.sum(axis=1).astype(np.float64)
    n_neg = positives.shape[1] - n_pos
    rank_sum = np.where(positives, ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def quantile_ci(samples: np.ndarray, level: float = 0.95) -> list[float | None]:
    """[low, high] quantile interval of the finite `samples` ([None, None] when none is finite)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [None, None]
    alpha = (1 - level) / 2
    return [float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))]


def finite_or_none(point: float | np.floating) -> float | None:
    return None if not np.isfinite(point) else float(point)


def _with_ci(point: float, samples: np.ndarray) -> dict:
    return {"value": finite_or_none(point), "ci95": quantile_ci(samples)}


def bootstrap_indices(n: int, num_resamples: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(num_resamples, n) row indices drawn with replacement, seeded so reruns give the same CIs."""
    return np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))


def classification_metrics(y_true: Sequence[int], scores: np.ndarray, class_names: Sequence[str],
                           num_resamples: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class and macro OvR AUC, each with a bootstrap 95% CI.

    `scores` are logits (n, C) (for zero-shot: logit scale x cosine); prediction = argmax. AUCs are computed
    on softmax(scores), the probabilities scikit-learn's `roc_auc_score(multi_class="ovr")` expects; for two
    classes this ranks by the logit margin, so the AUC does not depend on the logit scale.
    """
    y = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    num_classes = len(class_names)
    if scores.ndim != 2 or scores.shape != (len(y), num_classes):
        raise ValueError(f"scores must have shape ({len(y)}, {num_classes}), got {scores.shape}")
    if len(y) == 0:
        raise ValueError("no samples to score")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got {y.min()}..{y.max()}")
    pred = scores.argmax(axis=1)
    probabilities = softmax(scores)
    idx = bootstrap_indices(len(y), num_resamples, seed) if num_resamples > 0 else np.zeros((0, len(y)), np.int64)
    y_all = np.vstack([y[None, :], y[idx]])
    pred_all = np.vstack([pred[None, :], pred[idx]])
    cm = _confusion_batch(y_all, pred_all, num_classes)

    out: dict = {"num_samples": int(len(y)), "num_resamples": int(num_resamples), "bootstrap_seed": int(seed)}
    for name, fn in (("accuracy", _accuracy), ("balanced_accuracy", _balanced_accuracy), ("macro_f1", _macro_f1)):
        values = fn(cm)
        out[name] = _with_ci(values[0], values[1:])

    f1 = _per_class_f1(cm)
    support = cm[0].sum(axis=1)
    per_class: dict = {}
    auc_columns = []
    for c, cls in enumerate(class_names):
        positives = y_all == c
        auc = binary_auc_batch(probabilities[:, c][np.vstack([np.arange(len(y))[None, :], idx])], positives)
        auc_columns.append(auc)
        recall = cm[:, c, c] / np.maximum(cm[:, c, :].sum(axis=1), 1)
        per_class[cls] = {
            "support": int(support[c]),
            "auc": _with_ci(auc[0], auc[1:]),
            "recall": _with_ci(recall[0] if support[c] else np.nan, recall[1:]),
            "f1": _with_ci(f1[0, c] if np.isfinite(f1[0, c]) else np.nan, f1[1:, c]),
        }
    auc_matrix = np.stack(auc_columns, axis=1)
    if num_classes == 2:
        # Binary suites: class index 1 is the positive class (sklearn's binary roc_auc_score).
        out["auc"] = _with_ci(auc_matrix[0, 1], auc_matrix[1:, 1])
    macro = nanmean(auc_matrix, axis=1)
    out["macro_auc"] = _with_ci(macro[0], macro[1:])
    out["per_class"] = per_class
    out["confusion_matrix"] = cm[0].astype(int).tolist()
    return out


def multilabel_auc(targets: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
                   num_resamples: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED) -> dict:
    """Per-label and mean ROC AUC for multi-label targets (n, C) in {0,1}, with bootstrap CIs."""
    targets = np.asarray(targets, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if targets.shape != scores.shape or targets.ndim != 2 or targets.shape[1] != len(class_names):
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} must both be (n, {len(class_names)})")
    n = targets.shape[0]
    rows = np.vstack([np.arange(n)[None, :], bootstrap_indices(n, num_resamples, seed)])
    per_label, columns = {}, []
    for c, cls in enumerate(class_names):
        auc = binary_auc_batch(scores[:, c][rows], targets[:, c][rows])
        columns.append(auc)
        per_label[cls] = {"support": int(targets[:, c].sum()), "auc": _with_ci(auc[0], auc[1:])}
    matrix = np.stack(columns, axis=1)
    mean = nanmean(matrix, axis=1)
    return {"num_samples": int(n), "num_resamples": int(num_resamples), "bootstrap_seed": int(seed),
            "macro_auc": _with_ci(mean[0], mean[1:]), "per_class": per_label}


def retrieval_metrics(similarity: np.ndarray, query_labels: Sequence[int], candidate_labels: Sequence[int],
                      ks: Sequence[int] = RETRIEVAL_KS, num_resamples: int = DEFAULT_BOOTSTRAP,
                      seed: int = DEFAULT_SEED) -> dict:
    """Class-based retrieval from a labelled pool: a candidate is relevant when its class equals the query's.

    For each query the candidates are ranked by `similarity` (n_query, n_candidate) (ties broken by pool
    order), then averaged over queries with bootstrap CIs:
    - `precision@k`: fraction of the top k with the query's class (MedCLIP's P@k, as the paper defines it);
    - `recall@k`: fraction of all relevant candidates found in the top k (information-retrieval recall);
    - `hit@k`: 1 if any of the top k is relevant (what CLIP_benchmark calls recall@k).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    q = np.asarray(query_labels)
    c = np.asarray(candidate_labels)
    if sim.shape != (len(q), len(c)):
        raise ValueError(f"similarity must be ({len(q)}, {len(c)}), got {sim.shape}")
    order = np.argsort(-sim, axis=1, kind="stable")
    relevant_sorted = c[order] == q[:, None]
    relevant_total = relevant_sorted.sum(axis=1)
    idx = bootstrap_indices(len(q), num_resamples, seed) if num_resamples > 0 else np.zeros((0, len(q)), np.int64)
    out: dict = {"num_queries": int(len(q)), "num_candidates": int(len(c)), "num_resamples": int(num_resamples),
                 "bootstrap_seed": int(seed)}
    for k in ks:
        k_eff = min(k, len(c))
        found = relevant_sorted[:, :k_eff].sum(axis=1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_query = {
                f"precision@{k}": found / k_eff,
                f"recall@{k}": np.where(relevant_total > 0, found / np.maximum(relevant_total, 1), np.nan),
                f"hit@{k}": (found > 0).astype(np.float64),
            }
        for name, values in per_query.items():
            boot = nanmean(values[idx], axis=1) if len(idx) else np.zeros(0)
            out[name] = _with_ci(nanmean(values, axis=0), boot)
    return out


def format_ci(entry: dict | None, signed: bool = False) -> str:
    """A metric entry as "value [low, high]" (3 decimals; `signed`: with its sign), "n/a" without a value."""
    if not entry or entry.get("value") is None:
        return "n/a"
    form = "{:+.3f}" if signed else "{:.3f}"
    low, high = entry["ci95"]
    if low is None:
        return form.format(entry["value"])
    return f"{form.format(entry['value'])} [{form.format(low)}, {form.format(high)}]"


def markdown_table(rows: Sequence[tuple[str, dict]], columns: Sequence[str]) -> str:
    """A markdown table: one row per (label, metrics dict), one column per metric key ("value [CI]")."""
    header = "| suite | " + " | ".join(columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    lines = [header, rule]
    for label, metrics in rows:
        lines.append(f"| {label} | " + " | ".join(format_ci(metrics.get(col)) for col in columns) + " |")
    return "\n".join(lines)
