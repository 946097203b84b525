"""Linear probe on frozen image embeddings (the supervised table's protocol, with a frozen encoder).

Train = the suite's `train` split (CheXpert/MIMIC-5x200: the other 1000 images of the 2000 drawn, as the
reference's fine-tune set), optionally a seeded fraction of it per class; a multinomial logistic regression
whose C is picked by stratified cross-validation; test metrics with bootstrap CIs like zero-shot.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from open_clip_medclip.eval.embed import embed_images, evaluation_mode
from open_clip_medclip.eval.metrics import classification_metrics
from open_clip_medclip.eval.options import EvalOptions, EvalResult
from open_clip_medclip.eval.suites.definitions import SuiteError
from open_clip_medclip.eval.suites.load import Suite, load_suite


def per_class_sample(labels: np.ndarray, fraction: float, seed: int, leave_one: bool = False) -> np.ndarray:
    """Sorted rows of a seeded per-class fraction: at least one per class, or, with `leave_one`, at most all but one
    (so carving a validation set never empties a class). Multi-label targets (n, C) are grouped by label set."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        count = max(1, int(round(len(rows) * fraction)))
        if leave_one:
            count = min(count, len(rows) - 1)
        keep += list(rng.permutation(rows)[:count])
    return np.sort(np.array(keep, np.int64))


@dataclass
class ProbeFit:
    """A fitted probe and what it was fitted on (`fit_linear_probe`)."""

    classifier: object  # sklearn LogisticRegression
    best_c: float
    folds: int
    num_train: int
    failures: list[dict]


def fit_linear_probe(model: torch.nn.Module, suite: Suite, entries: Sequence, preprocess: Callable,
                     device: str | torch.device = "cpu", options: EvalOptions | None = None) -> ProbeFit:
    """Embed `entries` (the train split) with the frozen tower, take the seeded per-class `train_fraction` and fit a
    logistic regression whose C (from `cs`) is picked by stratified cross-validation. `eval finetune --freeze` shares
    this."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    o = options or EvalOptions()
    with evaluation_mode(model) as model:
        x_train, kept, failures = embed_images(model, preprocess, [e.image_path for e in entries], device,
                                               o.batch_size, o.workers, o.progress, o.autocast)
    y_train = suite.label_index([entries[i] for i in kept])
    if o.train_fraction < 1.0:
        rows = per_class_sample(y_train, o.train_fraction, o.seed)
        x_train, y_train = x_train[rows], y_train[rows]
    if len(np.unique(y_train)) < 2:
        raise SuiteError(f"{suite.source}: the train split has fewer than 2 classes")
    folds = int(min(5, np.bincount(y_train).min()))
    classifier = LogisticRegression(max_iter=2000)
    if folds >= 2 and len(o.cs) > 1:
        search = GridSearchCV(classifier, {"C": list(o.cs)}, scoring="balanced_accuracy",
                              cv=StratifiedKFold(folds, shuffle=True, random_state=o.seed))
        search.fit(x_train, y_train)
        best_c, classifier = float(search.best_params_["C"]), search.best_estimator_
    else:
        best_c = float(o.cs[len(o.cs) // 2])
        classifier.set_params(C=best_c).fit(x_train, y_train)
    return ProbeFit(classifier, best_c, folds, int(len(y_train)), failures)


def run_linear_probe(model: torch.nn.Module, suite: Suite | str, preprocess: Callable,
                     device: str | torch.device = "cpu", options: EvalOptions | None = None) -> EvalResult:
    """Fit on train embeddings, score test (all of it: `max_images` is not read); the result's scores are the test
    logits."""
    o = options or EvalOptions()
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    if suite.multilabel:
        raise SuiteError(f"{suite.source}: the linear probe needs a multiclass suite")
    train_entries, test_entries = suite.split("train"), suite.split("test")
    if not train_entries:
        raise SuiteError(f"{suite.source}: the suite has no train split; rebuild it or add split=train rows")
    suite.check_images(train_entries + test_entries)
    fit = fit_linear_probe(model, suite, train_entries, preprocess, device, o)
    with evaluation_mode(model) as model:
        x_test, kept, test_failures = embed_images(model, preprocess, [e.image_path for e in test_entries], device,
                                                   o.batch_size, o.workers, o.progress, o.autocast)
    y_test = suite.label_index([test_entries[i] for i in kept])
    logits = np.full((len(x_test), len(suite.classes)), -np.inf)
    logits[:, fit.classifier.classes_] = fit.classifier.predict_log_proba(x_test)
    metrics = classification_metrics(y_test, np.maximum(logits, -1e9), suite.classes, o.bootstrap, o.seed)
    metrics.update({"suite": suite.name, "classes": suite.classes, "manifest_sha256": suite.manifest_sha256,
                    "probe": {"model": "LogisticRegression", "C": fit.best_c, "cv_folds": fit.folds,
                              "train_fraction": o.train_fraction, "num_train": fit.num_train, "seed": o.seed},
                    "num_images": len(test_entries),
                    "num_excluded_corrupt": len(fit.failures) + len(test_failures),
                    "excluded_corrupt": fit.failures + test_failures})
    return EvalResult(metrics=metrics, features=x_test, targets=y_test, scores=logits,
                      entries=[test_entries[i] for i in kept])
