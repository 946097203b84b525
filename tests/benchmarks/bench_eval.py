"""Bootstrap CIs: the vectorised numpy implementation vs a per-resample scikit-learn loop, side by side.

Run: python tests/benchmarks/bench_eval.py [n_images] [n_resamples]
"""
from __future__ import annotations

import sys
import time

import numpy as np
from sklearn import metrics as skm

from open_clip_medclip.eval.metrics import bootstrap_indices, classification_metrics, softmax


def sklearn_loop(y: np.ndarray, scores: np.ndarray, resamples: int) -> None:
    probabilities = softmax(scores)
    pred = scores.argmax(1)
    for rows in bootstrap_indices(len(y), resamples, 0):
        skm.accuracy_score(y[rows], pred[rows])
        skm.balanced_accuracy_score(y[rows], pred[rows])
        skm.f1_score(y[rows], pred[rows], average="macro", zero_division=0)
        if len(np.unique(y[rows])) == probabilities.shape[1]:
            skm.roc_auc_score(y[rows], probabilities[rows], multi_class="ovr")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    resamples = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, n)
    scores = rng.normal(size=(n, 5)) + np.eye(5)[y]
    start = time.perf_counter()
    classification_metrics(y, scores, list("abcde"), num_resamples=resamples)
    vectorised = time.perf_counter() - start
    start = time.perf_counter()
    sklearn_loop(y, scores, resamples)
    loop = time.perf_counter() - start
    print(f"{n} images x {resamples} resamples, 5 classes (acc, bal-acc, macro-F1, OvR AUC):")
    print(f"  vectorised numpy : {vectorised:8.3f} s")
    print(f"  sklearn loop     : {loop:8.3f} s")
    print(f"  speed-up         : {loop / vectorised:8.1f}x")


if __name__ == "__main__":
    main()
