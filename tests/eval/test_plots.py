"""Plots a person reads: colour scale from 0, legible counts, clinician ROC axes, both losses on one ROC."""
from __future__ import annotations

import numpy as np
import pytest

from open_clip_medclip.eval import plots


def test_text_colour_contrasts_with_the_cell():
    assert plots.cell_text_colour(0.0) == "black"  # white cell
    assert plots.cell_text_colour(1.0) == "white"  # darkest blue
    # the case: a count of 11 in a matrix whose counts are 8..11 was white on white; from 0 it is dark
    assert plots.cell_text_colour(11 / 11) == "white" and plots.cell_text_colour(8 / 11) == "white"


def test_confusion_roc_and_tsne_pngs(tmp_path, monkeypatch):
    seen = {}
    plt = plots._pyplot()
    original = plt.Axes.imshow

    def spy(self, data, **kwargs):
        seen.update(kwargs)
        return original(self, data, **kwargs)

    monkeypatch.setattr(plt.Axes, "imshow", spy)
    path = plots.confusion_png([[8, 9], [10, 11]], ["Normal", "Pneumonia"], tmp_path / "c.png", "m, ckpt, suite")
    assert path.stat().st_size > 0 and seen["vmin"] == 0 and seen["vmax"] == 11

    labels = np.array([0] * 20 + [1] * 20)
    probabilities = np.stack([1 - np.linspace(0, 1, 40), np.linspace(0, 1, 40)], axis=1)
    assert plots.roc_png(labels, probabilities, ["Normal", "Pneumonia"], tmp_path / "r.png").stat().st_size > 0
    assert plots.SENSITIVITY.startswith("Sensitivity") and plots.ONE_MINUS_SPECIFICITY.startswith("1 − Specificity")

    grid = np.linspace(0, 1, 11)
    curve = {"fpr": grid, "tpr": np.sqrt(grid), "tpr_low": grid, "tpr_high": np.minimum(1, np.sqrt(grid) + 0.1),
             "auc": 0.66, "ci95": [0.6, 0.7]}
    out = plots.roc_compare_png([{**curve, "label": "soft"}, {**curve, "label": "InfoNCE"}], tmp_path / "rc.png",
                                "model, checkpoints, suite", note="bands: bootstrap")
    assert out.stat().st_size > 0

    rng = np.random.default_rng(0)
    panels = {"soft": rng.normal(size=(12, 8)), "InfoNCE": rng.normal(size=(12, 8))}
    assert plots.tsne_compare_png(panels, np.arange(12) % 3, ["a", "b", "c"], tmp_path / "t.png").stat().st_size > 0
    assert plots.tsne_compare_png({"x": np.zeros((3, 2))}, np.zeros(3), ["a"], tmp_path / "none.png") is None


@pytest.mark.parametrize("multilabel", [False, True])
def test_tsne_png_single_and_multilabel(tmp_path, multilabel):
    rng = np.random.default_rng(1)
    labels = (rng.random((15, 2)) < 0.5).astype(int) if multilabel else np.arange(15) % 2
    assert plots.tsne_png(rng.normal(size=(15, 4)), labels, ["a", "b"], tmp_path / "t.png", "t").stat().st_size > 0
