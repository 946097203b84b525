"""Linear probe on frozen image embeddings (the supervised table's protocol, with a frozen encoder).

Train = the suite's `train` split (CheXpert/MIMIC-5x200: the other 1000 images of the 2000 drawn, as the
reference's fine-tune set), optionally a seeded fraction of it per class; a multinomial logistic regression
whose C is picked by stratified cross-validation; test metrics with bootstrap CIs like zero-shot.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from open_clip_medclip.eval.embed import embed_images, evaluation_mode
from open_clip_medclip.eval.metrics import DEFAULT_BOOTSTRAP, classification_metrics
from open_clip_medclip.eval.suites import Suite, SuiteError, load_suite

DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)


def _subsample(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded per-class fraction of the training rows (at least one per class)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        keep += list(rng.permutation(rows)[:max(1, int(round(len(rows) * fraction)))])
    return np.sort(np.array(keep, np.int64))


def run_linear_probe(model: torch.nn.Module, suite: Suite | str, preprocess: Callable,
                     device: str | torch.device = "cpu", *, train_fraction: float = 1.0, cs: Sequence[float] = DEFAULT_CS,
                     seed: int = 0, batch_size: int = 32, num_workers: int = 0, num_resamples: int = DEFAULT_BOOTSTRAP,
                     progress: bool = True, autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                     ) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Fit on train embeddings, score test; returns (metrics, test features, test targets, test logits)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    if suite.multilabel:
        raise SuiteError(f"{suite.source}: the linear probe needs a multiclass suite")
    train_entries, test_entries = suite.split("train"), suite.split("test")
    if not train_entries:
        raise SuiteError(f"{suite.source}: the suite has no train split; rebuild it or add split=train rows")
    suite.check_images(train_entries + test_entries)
    with evaluation_mode(model) as model:
        embedded = {}
        for name, entries in (("train", train_entries), ("test", test_entries)):
            features, kept, failures = embed_images(model, preprocess, [e.image_path for e in entries], device,
                                                    batch_size, num_workers, progress, autocast)
            embedded[name] = (features, suite.label_index([entries[i] for i in kept]), failures)
    x_train, y_train, train_failures = embedded["train"]
    x_test, y_test, test_failures = embedded["test"]
    if train_fraction < 1.0:
        rows = _subsample(y_train, train_fraction, seed)
        x_train, y_train = x_train[rows], y_train[rows]
    if len(np.unique(y_train)) < 2:
        raise SuiteError(f"{suite.source}: the train split has fewer than 2 classes")
    folds = int(min(5, np.bincount(y_train).min()))
    classifier = LogisticRegression(max_iter=2000)
    if folds >= 2 and len(cs) > 1:
        search = GridSearchCV(classifier, {"C": list(cs)}, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                              scoring="balanced_accuracy")
        search.fit(x_train, y_train)
        best_c, classifier = float(search.best_params_["C"]), search.best_estimator_
    else:
        best_c = float(cs[len(cs) // 2])
        classifier.set_params(C=best_c).fit(x_train, y_train)
    logits = np.full((len(x_test), len(suite.classes)), -np.inf)
    logits[:, classifier.classes_] = classifier.predict_log_proba(x_test)
    metrics = classification_metrics(y_test, np.maximum(logits, -1e9), suite.classes, num_resamples, seed)
    metrics.update({"suite": suite.name, "classes": suite.classes, "manifest_sha256": suite.manifest_sha256,
                    "probe": {"model": "LogisticRegression", "C": best_c, "cv_folds": folds, "train_fraction": train_fraction,
                              "num_train": int(len(y_train)), "seed": seed},
                    "num_images": len(test_entries),
                    "num_excluded_corrupt": len(train_failures) + len(test_failures),
                    "excluded_corrupt": train_failures + test_failures})
    return metrics, x_test, y_test, logits
