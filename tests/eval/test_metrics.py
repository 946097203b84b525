from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from open_clip_medclip.eval import metrics as M


@pytest.fixture
def multiclass():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 250)
    scores = rng.normal(size=(250, 4)) + 1.2 * np.eye(4)[y]
    return y, scores


def test_classification_metrics_agree_with_sklearn(multiclass):
    y, scores = multiclass
    out = M.classification_metrics(y, scores, ["a", "b", "c", "d"], num_resamples=200)
    pred = scores.argmax(1)
    probabilities = M.softmax(scores)
    assert out["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["balanced_accuracy"]["value"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert out["macro_f1"]["value"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert out["macro_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, probabilities, multi_class="ovr"))
    for c, name in enumerate("abcd"):
        assert out["per_class"][name]["auc"]["value"] == pytest.approx(skm.roc_auc_score(y == c, probabilities[:, c]))
        assert out["per_class"][name]["f1"]["value"] == pytest.approx(skm.f1_score(y, pred, average=None)[c])
    assert out["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        low, high = out[key]["ci95"]
        assert low <= out[key]["value"] <= high and high - low > 0


def test_edge_cases_follow_sklearn():
    y = np.array([0, 0, 1, 1, 2])
    scores = np.eye(3)[[0, 1, 1, 1, 1]]  # class 2 never predicted, class 0 half right
    out = M.classification_metrics(y, scores, ["a", "b", "c"], num_resamples=0)
    pred = scores.argmax(1)
    assert out["balanced_accuracy"]["value"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert out["macro_f1"]["value"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert out["accuracy"]["ci95"] == [None, None]


def test_binary_auc_is_scale_free_and_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    logits = rng.normal(size=(120, 2)) + np.eye(2)[y]
    a = M.classification_metrics(y, logits, ["neg", "pos"], num_resamples=0)
    b = M.classification_metrics(y, 7.5 * logits, ["neg", "pos"], num_resamples=0)
    assert a["auc"]["value"] == pytest.approx(skm.roc_auc_score(y, logits[:, 1] - logits[:, 0]))
    assert a["auc"]["value"] == pytest.approx(b["auc"]["value"])


def test_bootstrap_is_seeded(multiclass):
    y, scores = multiclass
    first = M.classification_metrics(y, scores, list("abcd"), num_resamples=300, seed=5)
    assert first == M.classification_metrics(y, scores, list("abcd"), num_resamples=300, seed=5)
    assert first["accuracy"]["ci95"] != M.classification_metrics(y, scores, list("abcd"), 300, seed=6)["accuracy"]["ci95"]


def test_multilabel_auc_matches_sklearn():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, (90, 3))
    scores = rng.normal(size=(90, 3)) + targets
    out = M.multilabel_auc(targets, scores, ["x", "y", "z"], num_resamples=100)
    assert out["macro_auc"]["value"] == pytest.approx(skm.roc_auc_score(targets, scores, average="macro"))


def test_retrieval_precision_recall_hit_by_brute_force():
    rng = np.random.default_rng(2)
    sim = rng.normal(size=(30, 40))
    q, c = rng.integers(0, 3, 30), rng.integers(0, 3, 40)
    out = M.retrieval_metrics(sim, q, c, ks=(1, 5), num_resamples=50)
    for k in (1, 5):
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        rel = c[top] == q[:, None]
        assert out[f"precision@{k}"]["value"] == pytest.approx(rel.mean())
        assert out[f"hit@{k}"]["value"] == pytest.approx(rel.any(1).mean())
        assert out[f"recall@{k}"]["value"] == pytest.approx((rel.sum(1) / (c[None, :] == q[:, None]).sum(1)).mean())


def test_markdown_table():
    table = M.markdown_table([("s", {"accuracy": {"value": 0.5, "ci95": [0.4, 0.6]}})], ["accuracy", "macro_auc"])
    assert "| s | 0.500 [0.400, 0.600] | n/a |" in table


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        M.classification_metrics([0, 1], np.zeros((2, 3)), ["a", "b"])
