"""Paired comparison of two arms over seeds (the demo's two training losses, `eval finetune`'s starts): AUCs (or
accuracies, `accuracy_rows`), the paired difference and its bootstrap CI.

Scores come as (seeds, images) for a binary suite or (seeds, images, findings) for a multi-label one (the AUC
is then the mean of the per-finding AUCs). One bootstrap draws, per resample, the held-out images with
replacement (the same images for both losses and every seed: paired) and the seeds with replacement, so the CI
of the difference covers both the finite test set and the seed-to-seed spread. Point estimates are means over
seeds of the AUC on all images. The verdict comes from the CI of the difference only: it excludes 0 -> the loss
it favours is better; otherwise a tie.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from open_clip_medclip.eval.metrics import binary_auc_batch, finite_or_none, nanmean, quantile_ci

TIE = "tie"


def auc_rows(scores: np.ndarray, positives: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """AUC for each row of image indices `rows` (R, m); `rows=None` = all images once -> shape (1,).

    `scores`/`positives` (n,) for binary, (n, F) for multi-label (mean of the finding AUCs that are defined).
    """
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    rows = np.arange(len(scores))[None, :] if rows is None else rows
    if scores.ndim == 1:
        return binary_auc_batch(scores[rows], positives[rows])
    per_finding = np.stack([binary_auc_batch(scores[:, f][rows], positives[:, f][rows])
                            for f in range(scores.shape[1])], axis=1)
    return nanmean(per_finding, axis=1)  # an all-NaN mean is NaN on purpose and is dropped from CIs


def verdict(ci: Sequence[float | None], better: str, worse: str) -> str:
    """`better` when the CI of (better − worse) is above 0, `worse` when below, else 'tie'."""
    low, high = ci
    if low is None or high is None:
        return TIE
    if low > 0:
        return better
    if high < 0:
        return worse
    return TIE


def accuracy_rows(correct: np.ndarray, _positives: np.ndarray | None, rows: np.ndarray | None) -> np.ndarray:
    """Accuracy for each row of image indices `rows` (R, m) from per-image correctness (n,); `rows=None` -> (1,)."""
    correct = np.asarray(correct, dtype=np.float64)
    return correct[None, :].mean(axis=1) if rows is None else correct[rows].mean(axis=1)


def paired_comparison(scores: Mapping[str, np.ndarray], positives: np.ndarray, first: str, second: str,
                      num_resamples: int = 1000, seed: int = 0, metric: Callable = auc_rows,
                      name: str = "auc") -> dict:
    """Per-arm metric (AUC by default) and the paired difference `first − second`, with bootstrap 95% CIs (see
    module doc). The per-arm values are under `name`.

    `scores[arm]`: (S, n) or (S, n, F), the same images in the same order for every arm and seed; `metric(scores,
    positives, rows)` is `auc_rows` or another function of that form (`accuracy_rows`: scores = 0/1 correctness).
    """
    first_scores, second_scores = np.asarray(scores[first]), np.asarray(scores[second])
    if first_scores.shape != second_scores.shape:
        raise ValueError(f"scores of {first!r} {first_scores.shape} and {second!r} {second_scores.shape} differ")
    num_seeds, n = first_scores.shape[:2]
    rng = np.random.default_rng(seed)
    image_rows = rng.integers(0, n, size=(num_resamples, n))
    seed_rows = rng.integers(0, num_seeds, size=(num_resamples, num_seeds))
    point, boot = {}, {}
    for loss in (first, second):
        values = np.asarray(scores[loss])
        point[loss] = np.array([metric(values[s], positives, None)[0] for s in range(num_seeds)])
        boot[loss] = np.stack([metric(values[s], positives, image_rows) for s in range(num_seeds)], axis=1)

    def over_seeds(matrix: np.ndarray) -> np.ndarray:  # (R, S) -> (R,) mean over the resampled seeds
        return nanmean(np.take_along_axis(matrix, seed_rows, axis=1), axis=1)

    diff_point = point[first] - point[second]
    diff_boot = boot[first] - boot[second]
    images_only = nanmean(diff_boot, axis=1)
    difference = {
        "value": finite_or_none(np.mean(diff_point)),
        "ci95": quantile_ci(over_seeds(diff_boot)),
        "ci95_images_only": quantile_ci(images_only),
        "per_seed": [{"value": finite_or_none(diff_point[s]), "ci95": quantile_ci(diff_boot[:, s])}
                     for s in range(num_seeds)],
    }
    return {
        "num_images": int(n),
        "num_seeds": int(num_seeds),
        "num_resamples": int(num_resamples),
        name: {loss: {"value": finite_or_none(np.mean(point[loss])), "ci95": quantile_ci(over_seeds(boot[loss])),
                       "per_seed": [finite_or_none(v) for v in point[loss]]} for loss in (first, second)},
        "difference": difference,
        "verdict": verdict(difference["ci95"], first, second),
    }


def mean_roc(scores: np.ndarray, positives: np.ndarray, num_resamples: int = 200, seed: int = 0,
             grid_size: int = 101) -> dict:
    """Seed-averaged ROC (sensitivity at each 1 − specificity of a grid) with a bootstrap 95% band.

    `scores` (S, n) of one binary suite; the band resamples images and seeds as `paired_comparison` does.
    """
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    grid = np.linspace(0.0, 1.0, grid_size)
    num_seeds, n = scores.shape
    rng = np.random.default_rng(seed)

    def tpr_at(s: np.ndarray, p: np.ndarray) -> np.ndarray:
        order = np.argsort(-s, kind="stable")
        s, p = s[order], p[order]
        distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
        tps, fps = np.cumsum(p)[distinct], np.cumsum(~p)[distinct]
        if tps[-1] == 0 or fps[-1] == 0:
            return np.full(grid_size, np.nan)
        tpr, fpr = np.r_[0.0, tps / tps[-1]], np.r_[0.0, fps / fps[-1]]
        return np.interp(grid, fpr, tpr)

    curve = np.mean([tpr_at(scores[s], positives) for s in range(num_seeds)], axis=0)
    samples = []
    for _ in range(num_resamples):
        rows = rng.integers(0, n, size=n)
        seeds = rng.integers(0, num_seeds, size=num_seeds)
        samples.append(np.mean([tpr_at(scores[s][rows], positives[rows]) for s in seeds], axis=0))
    samples = np.asarray(samples)
    samples = samples[np.isfinite(samples).all(axis=1)]
    low, high = (np.quantile(samples, [0.025, 0.975], axis=0) if len(samples) else (curve, curve))
    return {"fpr": grid, "tpr": curve, "tpr_low": low, "tpr_high": high}
