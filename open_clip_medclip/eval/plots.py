"""Pictures written next to each result JSON: ROC curves, confusion matrices, t-SNE of image embeddings.

Conventions (what a clinician reads): ROC axes are sensitivity against 1 − specificity; confusion matrices are
coloured from 0 with the count and the row percentage in every cell, in a text colour chosen against the cell's
colour; titles say which model, checkpoint and suite. `roc_compare_png` puts several models (e.g. two losses)
on one ROC plot with their AUC, CI and a CI band.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

SENSITIVITY = "Sensitivity (true positive rate)"
ONE_MINUS_SPECIFICITY = "1 − Specificity (false positive rate)"
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _title(ax, title: str, default: str) -> None:
    ax.set_title(title or default, fontsize=9, wrap=True)


def _save(fig, path: str | Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return Path(path)


def _tsne(features: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def _scatter_groups(ax, points: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
    labels = np.asarray(labels)
    for c, name in enumerate(class_names):
        mask = labels[:, c] > 0 if labels.ndim == 2 else labels == c
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=12, alpha=0.75, color=COLOURS[c % len(COLOURS)],
                       label=f"{name} (n={int(mask.sum())})", edgecolors="none")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_xlabel("t-SNE 1", fontsize=8), ax.set_ylabel("t-SNE 2", fontsize=8)


def tsne_png(features: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str | Path,
             title: str = "", seed: int = 0) -> Path | None:
    """2-D t-SNE of image embeddings coloured by class / finding; None when there are too few images (< 5).

    Multi-label `labels` (n, C) draw an image once per positive finding (overlapping markers).
    """
    if len(features) < 5:
        return None
    points = _tsne(np.asarray(features), seed)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    _scatter_groups(ax, points, labels, class_names)
    _title(ax, title, f"t-SNE of {len(features)} image embeddings")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="finding", title_fontsize=7)
    return _save(fig, path)


def tsne_compare_png(panels: Mapping[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str],
                     path: str | Path, title: str = "", seed: int = 0) -> Path | None:
    """Side-by-side t-SNEs of the same images embedded by several models (panel name -> (n, d) features)."""
    if not panels or min(len(f) for f in panels.values()) < 5:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.6, 4.6), squeeze=False)
    for ax, (name, features) in zip(axes[0], panels.items(), strict=True):
        _scatter_groups(ax, _tsne(np.asarray(features), seed), labels, class_names)
        ax.set_title(name, fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="finding",
                       title_fontsize=7)
    fig.suptitle(title or "t-SNE of image embeddings", fontsize=10)
    return _save(fig, path)


def _roc_axes(ax) -> None:
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=0.8, label="chance (AUC 0.5)")
    ax.set_xlim(-0.01, 1.01), ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(ONE_MINUS_SPECIFICITY, fontsize=9), ax.set_ylabel(SENSITIVITY, fontsize=9)
    ax.grid(alpha=0.25)


def roc_png(targets: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], path: str | Path,
            title: str = "") -> Path:
    """One-vs-rest ROC curve per class (binary suites: the positive class only), AUC and counts in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    targets = np.asarray(targets)
    onehot = targets if targets.ndim == 2 else np.eye(len(class_names), dtype=int)[targets]
    indices = [1] if len(class_names) == 2 and targets.ndim == 1 else range(len(class_names))
    for c in indices:
        if onehot[:, c].min() == onehot[:, c].max():
            continue
        fpr, tpr, _ = roc_curve(onehot[:, c], probabilities[:, c])
        auc = roc_auc_score(onehot[:, c], probabilities[:, c])
        positives = int(onehot[:, c].sum())
        ax.plot(fpr, tpr, color=COLOURS[c % len(COLOURS)], linewidth=1.6,
                label=f"{class_names[c]}: AUC {auc:.3f} ({positives} pos / {len(onehot) - positives} neg)")
    _roc_axes(ax)
    _title(ax, title, "ROC")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def roc_compare_png(curves: Sequence[Mapping], path: str | Path, title: str = "", note: str = "") -> Path:
    """Several models' ROC curves on one plot, each with its CI band.

    Each curve: {"label", "fpr" (grid), "tpr" (mean), "tpr_low", "tpr_high", "auc", "ci95": [low, high]};
    the legend reads "label: AUC 0.812 [0.741, 0.873]". `note` goes under the axes (e.g. what the band is).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.8, 6.0))
    for i, curve in enumerate(curves):
        colour = COLOURS[i % len(COLOURS)]
        low, high = curve["ci95"]
        ax.fill_between(curve["fpr"], curve["tpr_low"], curve["tpr_high"], color=colour, alpha=0.18, linewidth=0)
        ax.plot(curve["fpr"], curve["tpr"], color=colour, linewidth=1.8,
                label=f"{curve['label']}: AUC {curve['auc']:.3f} [{low:.3f}, {high:.3f}]")
    _roc_axes(ax)
    _title(ax, title, "ROC")
    ax.legend(fontsize=7.5, loc="lower right", title="AUC [95% CI]", title_fontsize=7.5)
    if note:
        fig.text(0.5, -0.01, note, ha="center", va="top", fontsize=7, wrap=True)
    return _save(fig, path)


def cell_text_colour(fraction: float, cmap_name: str = "Blues") -> str:
    """'white' on dark cells, 'black' on light ones: by the luminance of the cell colour at `fraction` of the scale."""
    r, g, b, _ = _pyplot().get_cmap(cmap_name)(float(fraction))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.55 else "black"


def confusion_png(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Confusion matrix (rows = true class, columns = predicted): count and row percentage per cell, colour from 0."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    size = 1.6 + 1.1 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    cmap = plt.get_cmap("Blues")
    vmax = max(int(matrix.max()), 1)
    image = ax.imshow(matrix, cmap=cmap, vmin=0, vmax=vmax)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), [f"{n}\n(n={int(r)})" for n, r in zip(class_names, rows[:, 0],
                                                                                 strict=True)], fontsize=8)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{int(value)}\n{100 * share[i, j]:.0f}% of row", ha="center", va="center",
                color=cell_text_colour(value / vmax), fontsize=8)
    ax.set_xlabel("Predicted class", fontsize=9), ax.set_ylabel("True class", fontsize=9)
    _title(ax, title, "Confusion matrix")
    bar = fig.colorbar(image, ax=ax, fraction=0.046)
    bar.set_label("images", fontsize=8)
    return _save(fig, path)
