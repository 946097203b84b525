"""Label quality against the IU/OpenI gold labels (NegBio's manual 14-finding annotation, ChestX-ray14 names).

The acceptance measure: macro-F1 over 7 findings both vocabularies share (positive = 1, everything else
negative; a variant also counts uncertain -1 as positive), plus Lung Lesion vs Mass or Nodule and No Finding vs
`normal`, reported separately.
"""
from __future__ import annotations

import csv
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from open_clip_medclip.findings import FINDING_INDEX
from open_clip_medclip.knowledge.rules import resolve_rules_dir
from open_clip_medclip.labels import POSITIVE, UNCERTAIN
from open_clip_medclip.sources import SAMPLE_DATA_DIR

IU_REPORTS_TGZ = SAMPLE_DATA_DIR / "iu_reports" / "NLMCXR_reports.tgz"
IU_GOLD_DEV_CSV = SAMPLE_DATA_DIR / "iu_gold" / "labels_dev.csv"

# CheXpert finding -> gold columns whose union is the gold positive.
MACRO_FINDINGS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("Atelectasis",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Pleural Effusion": ("Effusion",),
    "Pneumonia": ("Pneumonia",),
    "Pneumothorax": ("Pneumothorax",),
    "Consolidation": ("Consolidation",),
    "Edema": ("Edema",),
}
EXTRA_FINDINGS: dict[str, tuple[str, ...]] = {
    "Lung Lesion": ("Mass", "Nodule"),
    "No Finding": ("normal",),
}


# CheXpert conventions on which the IU coders differ, as rule lines (file -> line prefixes). Dropping one from a
# copy of the rules measures what following CheXpert costs on this gold; the labeler itself keeps them all.
CHEXPERT_CONVENTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "Edema surrogates (vascular/pulmonary congestion, vascular prominence, indistinctness)": {
        "mentions_edema.txt": ("(vascular|pulmonary) congestion", "indistinctness", "vascular prominence")},
    "'versus' is a hedge (uncertain)": {
        "uncertainty_pre.txt": ("(versus|vs|vs.)",), "uncertainty_post.txt": ("(versus|vs|vs.)",)},
}


def rules_without(drop: Mapping[str, Sequence[str]], target: str | Path, rules_dir: str | Path | None = None) -> Path:
    """Copy the rules folder to `target` without the lines starting with the given prefixes (per file).

    Raises ValueError naming the file and prefix when a prefix matches no line, so an ablation cannot silently
    measure nothing after the rule files change.
    """
    target = Path(target)
    shutil.copytree(resolve_rules_dir(rules_dir), target)
    for name, prefixes in drop.items():
        path = target / name
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        for prefix in prefixes:
            if not any(line.startswith(prefix) for line in lines):
                raise ValueError(f"{path}: no rule line starts with {prefix!r}")
        path.write_text("".join(line for line in lines if not line.startswith(tuple(prefixes))), encoding="utf-8")
    return target


def read_gold(path: str | Path = IU_GOLD_DEV_CSV) -> dict[str, dict[str, int]]:
    """uid -> {gold column: 0/1} from a NegBio gold CSV keyed by `filename`."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return {row["filename"]: {k: int(float(v)) for k, v in row.items() if k != "filename" and v != ""}
                for row in csv.DictReader(handle)}


def prf(predicted: Sequence[bool], gold: Sequence[bool]) -> dict[str, float]:
    tp = sum(p and g for p, g in zip(predicted, gold))
    fp = sum(p and not g for p, g in zip(predicted, gold))
    fn = sum(g and not p for p, g in zip(predicted, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn,
            "gold_positives": tp + fn}


def compare_with_gold(predictions: Mapping[str, Sequence[float | None]], gold: Mapping[str, Mapping[str, int]],
                      uncertain_positive: bool = False) -> dict:
    """Per-finding P/R/F1 and the 7-finding macro-F1 over the uids present in both."""
    uids = sorted(set(predictions) & set(gold))
    positive_values = (POSITIVE, UNCERTAIN) if uncertain_positive else (POSITIVE,)
    table: dict[str, dict[str, float]] = {}
    for finding, columns in {**MACRO_FINDINGS, **EXTRA_FINDINGS}.items():
        index = FINDING_INDEX[finding]
        predicted = [predictions[uid][index] in positive_values for uid in uids]
        truth = [any(gold[uid].get(column, 0) == 1 for column in columns) for uid in uids]
        table[finding] = prf(predicted, truth)
    macro = sum(table[name]["f1"] for name in MACRO_FINDINGS) / len(MACRO_FINDINGS)
    return {"reports": len(uids), "uncertain_positive": uncertain_positive, "per_finding": table, "macro_f1": macro}


def format_table(result: dict, title: str) -> str:
    lines = [f"{title} ({result['reports']} reports; positive = 1{' or -1' if result['uncertain_positive'] else ''})",
             f"  {'finding':<18} {'P':>6} {'R':>6} {'F1':>6} {'gold+':>6}"]
    for name, scores in result["per_finding"].items():
        marker = "" if name in MACRO_FINDINGS else "  (not in macro)"
        lines.append(f"  {name:<18} {scores['precision']:6.3f} {scores['recall']:6.3f} {scores['f1']:6.3f} "
                     f"{scores['gold_positives']:6d}{marker}")
    lines.append(f"  macro-F1 over {len(MACRO_FINDINGS)} findings: {result['macro_f1']:.4f}")
    return "\n".join(lines)


def evaluate_on_iu(label_many: Callable[[list[str]], Iterable[Sequence[float | None]]],
                   reports_path: str | Path = IU_REPORTS_TGZ, gold_path: str | Path = IU_GOLD_DEV_CSV,
                   uncertain_positive: bool = False) -> dict:
    """Label every gold-labelled IU report with `label_many(texts) -> label vectors` and compare."""
    from open_clip_medclip.sources.reports import iter_reports

    gold = read_gold(gold_path)
    reports = [(uid, text) for uid, text in iter_reports(reports_path) if uid in gold]
    labels = list(label_many([text for _, text in reports]))
    return compare_with_gold({uid: vector for (uid, _), vector in zip(reports, labels)}, gold, uncertain_positive)
