"""Pictures written next to each result JSON: t-SNE of image embeddings, ROC curves, confusion matrix."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def tsne_png(features: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str | Path,
             title: str = "", seed: int = 0) -> Path | None:
    """2-D t-SNE of image embeddings coloured by class; None when there are too few images (< 5)."""
    from sklearn.manifold import TSNE

    if len(features) < 5:
        return None
    perplexity = float(min(30.0, (len(features) - 1) / 3))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    labels = np.asarray(labels)
    for c, name in enumerate(class_names):
        mask = labels[:, c] > 0 if labels.ndim == 2 else labels == c
        ax.scatter(points[mask, 0], points[mask, 1], s=10, label=f"{name} ({int(mask.sum())})")
    ax.set_title(title or "t-SNE of image embeddings")
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def roc_png(targets: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], path: str | Path,
            title: str = "") -> Path:
    """One-vs-rest ROC curve per class (binary suites: the positive class only)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    targets = np.asarray(targets)
    onehot = targets if targets.ndim == 2 else np.eye(len(class_names), dtype=int)[targets]
    indices = [1] if len(class_names) == 2 and targets.ndim == 1 else range(len(class_names))
    for c in indices:
        if onehot[:, c].min() == onehot[:, c].max():
            continue
        fpr, tpr, _ = roc_curve(onehot[:, c], probabilities[:, c])
        ax.plot(fpr, tpr, label=f"{class_names[c]} (AUC {roc_auc_score(onehot[:, c], probabilities[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate"), ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def confusion_png(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Confusion matrix with counts (rows = true class, columns = predicted)."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    size = 1.2 + 0.9 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black", fontsize=8)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
