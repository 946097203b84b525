"""The demo's paired comparison: verdicts from the CI of the difference, multi-label AUCs, determinism, no NaN."""
from __future__ import annotations

import json

import numpy as np
import pytest

from open_clip_medclip.demo_stats import auc_rows, mean_roc, paired_comparison, verdict


def _scores(rng, positives, signal, seeds=3):
    return np.stack([signal * positives + rng.normal(size=positives.shape) for _ in range(seeds)])


def test_identical_losses_tie_with_a_zero_difference():
    rng = np.random.default_rng(0)
    positives = rng.random(80) < 0.5
    same = _scores(rng, positives, 1.0)
    result = paired_comparison({"soft": same, "clip": same.copy()}, positives, "soft", "clip", 200)
    assert result["difference"]["value"] == 0 and result["difference"]["ci95"] == [0.0, 0.0]
    assert result["verdict"] == "tie"
    assert result["auc"]["soft"] == result["auc"]["clip"]


def test_verdict_follows_the_paired_ci_not_the_point_estimates():
    rng = np.random.default_rng(1)
    positives = rng.random(200) < 0.5
    good, bad = _scores(rng, positives, 2.0), _scores(rng, positives, 0.3)
    assert paired_comparison({"soft": good, "clip": bad}, positives, "soft", "clip", 300)["verdict"] == "soft"
    assert paired_comparison({"soft": bad, "clip": good}, positives, "soft", "clip", 300)["verdict"] == "clip"
    # a small point-estimate lead on noisy scores is still a tie
    close = good + rng.normal(scale=0.5, size=good.shape)
    result = paired_comparison({"soft": close, "clip": good}, positives[:], "soft", "clip", 300)
    low, high = result["difference"]["ci95"]
    assert (result["verdict"] == "tie") == (low <= 0 <= high)
    assert verdict([-0.01, 0.02], "soft", "clip") == "tie" and verdict([None, None], "soft", "clip") == "tie"


def test_seed_spread_widens_the_ci_beyond_images_only():
    rng = np.random.default_rng(2)
    positives = rng.random(150) < 0.5
    base = _scores(rng, positives, 1.0, seeds=1)[0]
    soft = np.stack([base + shift * positives for shift in (-1.0, 0.0, 1.5)])  # seeds disagree strongly
    clip = np.stack([base] * 3)
    result = paired_comparison({"soft": soft, "clip": clip}, positives, "soft", "clip", 400)
    joint, images = result["difference"]["ci95"], result["difference"]["ci95_images_only"]
    assert joint[1] - joint[0] > images[1] - images[0]
    assert len(result["difference"]["per_seed"]) == 3 and result["num_seeds"] == 3


def test_multilabel_auc_is_the_mean_of_finding_aucs_and_skips_undefined_ones():
    positives = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=bool)  # finding 2 has no positive: undefined
    scores = np.array([[0.9, 0.1], [0.2, 0.5], [0.4, 0.3], [0.5, 0.2]])
    assert auc_rows(scores, positives, None)[0] == pytest.approx(0.75)
    rows = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])  # the second resample has no positive at all -> NaN, not an error
    out = auc_rows(scores, positives, rows)
    assert out[0] == 1.0 and np.isnan(out[1])


def test_results_are_deterministic_and_json_clean():
    rng = np.random.default_rng(3)
    positives = rng.random((40, 3)) < 0.3
    positives[:, 2] = False  # a finding without positives must not put NaN into the result
    scores = {k: rng.normal(size=(2, 40, 3)) for k in ("soft", "clip")}
    first = paired_comparison(scores, positives, "soft", "clip", 100, seed=5)
    second = paired_comparison(scores, positives, "soft", "clip", 100, seed=5)
    assert json.dumps(first, allow_nan=False) == json.dumps(second, allow_nan=False)


def test_mean_roc_band_contains_the_curve():
    rng = np.random.default_rng(4)
    positives = rng.random(100) < 0.4
    roc = mean_roc(_scores(rng, positives, 1.5), positives, num_resamples=100)
    assert roc["fpr"][0] == 0 and roc["fpr"][-1] == 1 and roc["tpr"][-1] == pytest.approx(1.0)
    assert np.all(np.diff(roc["tpr"]) >= -1e-12)
    inside = (roc["tpr_low"] - 1e-9 <= roc["tpr"]) & (roc["tpr"] <= roc["tpr_high"] + 1e-9)
    assert inside.mean() > 0.9


def test_accuracy_metric_gives_mean_accuracy_and_its_paired_difference():
    from open_clip_medclip.demo_stats import accuracy_rows

    rng = np.random.default_rng(3)
    first = (rng.random((2, 50)) < 0.8).astype(float)  # per-seed, per-image correctness
    second = (rng.random((2, 50)) < 0.6).astype(float)
    result = paired_comparison({"a": first, "b": second}, None, "a", "b", 200, metric=accuracy_rows,
                               name="accuracy")
    assert result["accuracy"]["a"]["value"] == pytest.approx(first.mean())
    assert result["accuracy"]["a"]["per_seed"] == pytest.approx(first.mean(axis=1).tolist())
    assert result["difference"]["value"] == pytest.approx(first.mean() - second.mean())
    low, high = result["accuracy"]["b"]["ci95"]
    assert low < second.mean() < high and "auc" not in result
