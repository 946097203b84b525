"""Bootstrap CIs: the vectorised numpy implementation vs a per-resample scikit-learn loop, side by side.

    python tests/benchmarks/bench_eval.py [--images 1000] [--resamples 1000] [--out PATH | --no-out] [--machine TEXT]

Writes the timings and the speed-up to tests/benchmarks/results/bench_eval.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import add_output_arguments, write_results  # noqa: E402

from open_clip_medclip.eval.metrics import bootstrap_indices, classification_metrics, softmax  # noqa: E402


def sklearn_loop(y: np.ndarray, scores: np.ndarray, resamples: int) -> None:
    probabilities = softmax(scores)
    pred = scores.argmax(1)
    for rows in bootstrap_indices(len(y), resamples, 0):
        skm.accuracy_score(y[rows], pred[rows])
        skm.balanced_accuracy_score(y[rows], pred[rows])
        skm.f1_score(y[rows], pred[rows], average="macro", zero_division=0)
        if len(np.unique(y[rows])) == probabilities.shape[1]:
            skm.roc_auc_score(y[rows], probabilities[rows], multi_class="ovr")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=1000)
    add_output_arguments(parser, "bench_eval")
    args = parser.parse_args(argv)
    n, resamples = args.images, args.resamples
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
    write_results(args, {"images": n, "resamples": resamples, "classes": 5,
                         "metrics": ["accuracy", "balanced accuracy", "macro-F1", "one-vs-rest AUC"],
                         "vectorised_numpy_s": vectorised, "sklearn_loop_s": loop, "speed_up": loop / vectorised},
                  argv, __file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
