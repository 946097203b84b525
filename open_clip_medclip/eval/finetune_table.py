"""The fine-tuning comparison: per start, accuracy and mean AUC over seeds with bootstrap CIs over test images and
seeds, the paired difference to the first start, and the paper-style markdown table."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from open_clip_medclip.eval.metrics import format_ci, softmax
from open_clip_medclip.eval.suites.load import Suite


def _spread(values: Sequence[float | None]) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "min": None, "max": None, "per_seed": list(values)}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
            "min": float(min(finite)), "max": float(max(finite)), "per_seed": list(values)}


def compare_starts(suite: Suite, targets: np.ndarray, logits: dict[str, np.ndarray], bootstrap: int, seed: int
                   ) -> dict:
    """Per start (logits (S, n, C) over seeds): accuracy and mean AUC over seeds with bootstrap CIs over test images
    and seeds, and the paired difference start − first start (`demo_stats.paired_comparison`)."""
    from scipy.special import expit

    from open_clip_medclip.demo_stats import accuracy_rows, auc_rows, paired_comparison

    starts = list(logits)
    first = starts[0]
    if suite.multilabel:
        views = {"macro_auc": ({s: expit(v) for s, v in logits.items()}, targets.astype(bool), auc_rows)}
    else:
        one_hot = np.eye(len(suite.classes), dtype=bool)[targets]
        views = {"accuracy": ({s: (v.argmax(axis=2) == targets).astype(np.float64) for s, v in logits.items()},
                              None, accuracy_rows),
                 "macro_auc": ({s: np.stack([softmax(x) for x in v]) for s, v in logits.items()}, one_hot, auc_rows)}
    out: dict = {}
    for start in starts:
        out[start] = {}
        for metric, (scores, positives, rows) in views.items():
            result = paired_comparison(scores, positives, start, first, bootstrap, seed, metric=rows, name=metric)
            out[start][metric] = result[metric][start]
            if start != first:
                out[start][f"{metric}_difference"] = result["difference"]
    return out


def comparison_table(summary: dict) -> str:
    """Rows = starts, columns = the metrics (mean over seeds [95% CI]) and the paired differences to the first."""
    starts = list(summary["starts"])
    first = starts[0]
    metrics = ["macro_auc"] if summary["multilabel"] else ["accuracy", "macro_auc"]
    names = {"accuracy": "ACC", "macro_auc": "mean AUC" if summary["multilabel"] else "AUC"}
    header = ["start"]
    for metric in metrics:
        header += [f"{names[metric]} [95% CI]", f"Δ {names[metric]} vs {first} [95% CI]"]
    header += ["macro-F1 (mean ± sd)"] if not summary["multilabel"] else []
    header += ["selected epochs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for start in starts:
        row = summary["starts"][start]
        cells = [start]
        for metric in metrics:
            cells += [format_ci(row["paired"][metric]),
                      "—" if start == first else format_ci(row["paired"][f"{metric}_difference"], signed=True)]
        if not summary["multilabel"]:
            f1 = row["spread"]["macro_f1"]
            cells.append("n/a" if f1["mean"] is None else f"{f1['mean']:.3f} ± {f1['std']:.3f}")
        cells.append(", ".join(str(e) for e in row["selected_epochs"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
