"""Labeler benchmark: speed and quality on the bundled IU reports, side by side with a plain regex labeler.

    python tests/benchmarks/bench_labeler.py [--repeats 3] [--workers 2] [--out PATH | --no-out] [--machine TEXT]

Speed: all 3955 IU reports, every sentence of findings + impression labelled, one core, best of N runs, for
(a) `Labeler.label_report` (fast path), (b) a plain-Python keyword + negation regex labeler written here, both
in this process; also the spaCy Doc pipeline on a subset. Quality: the dev gold (NegBio, 3080 reports): P/R/F1
per finding and macro-F1 over the 7 shared findings for both labelers (positive = 1; variant: -1 counts too).
Then what each CheXpert convention the IU coders do not share costs: macro-F1 of a rules copy without it.
Writes everything, with the command and machine, to tests/benchmarks/results/bench_labeler.json.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchresults import add_output_arguments, write_results  # noqa: E402

from open_clip_medclip.findings import CHEXPERT_FINDINGS, NUM_FINDINGS  # noqa: E402
from open_clip_medclip.knowledge import Labeler, iter_reports  # noqa: E402
from open_clip_medclip.knowledge.evaluation import (  # noqa: E402
    CHEXPERT_CONVENTIONS,
    IU_REPORTS_TGZ,
    compare_with_gold,
    format_table,
    read_gold,
    rules_without,
)

# --- the baseline: a plain keyword + NegEx-style regex labeler --------------------------------------------------
BASELINE_KEYWORDS = {
    "Cardiomegaly": r"cardiomegaly|enlarged heart|cardiac enlargement|heart (?:size )?is enlarged",
    "Lung Lesion": r"mass|nodules?",
    "Lung Opacity": r"opacit(?:y|ies)|infiltrates?|airspace disease",
    "Edema": r"edema",
    "Consolidation": r"consolidation",
    "Pneumonia": r"pneumonia|infection",
    "Atelectasis": r"atelectasis|atelectatic",
    "Pneumothorax": r"pneumothorax|pneumothoraces",
    "Pleural Effusion": r"effusions?",
    "Fracture": r"fractures?",
    "Support Devices": r"pacemaker|catheter|tube|picc|line",
}
BASELINE_FINDINGS = re.compile("|".join(f"(?P<f{CHEXPERT_FINDINGS.index(name)}>\\b(?:{pattern})\\b)"
                                        for name, pattern in BASELINE_KEYWORDS.items()), re.IGNORECASE)
BASELINE_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|clear of)\b", re.IGNORECASE)
BASELINE_UNCERTAIN = re.compile(r"\b(?:may|possible|possibly|likely|probable|suggest\w*|versus|cannot exclude)\b",
                                re.IGNORECASE)
BASELINE_SECTIONS = re.compile(r"(?:FINDINGS|IMPRESSION):(.*?)(?=\n\n[A-Z ]+:|\Z)", re.DOTALL)
BASELINE_SENTENCES = re.compile(r"[^.!?]+")


def baseline_label_report(text: str) -> tuple[list[float | None], list[tuple[str, list[float | None]]]]:
    """Report and sentence labels: a keyword hit is negative after a negation word, uncertain after a hedge."""
    body = " ".join(BASELINE_SECTIONS.findall(text)) or text
    report: list[float | None] = [None] * NUM_FINDINGS
    sentences = []
    for sentence in BASELINE_SENTENCES.findall(body):
        labels: list[float | None] = [None] * NUM_FINDINGS
        for match in BASELINE_FINDINGS.finditer(sentence):
            before = sentence[:match.start()]
            value = 0.0 if BASELINE_NEGATION.search(before) else -1.0 if BASELINE_UNCERTAIN.search(before) else 1.0
            index = int(match.lastgroup[1:])
            labels[index] = value if labels[index] is None else max(labels[index], value, key=_rank)
        sentences.append((sentence, labels))
        for index, value in enumerate(labels):
            if value is not None:
                report[index] = value if report[index] is None else max(report[index], value, key=_rank)
    report[0] = None if any(v in (1.0, -1.0) for v in report[1:13]) else 1.0
    return report, sentences


def _rank(value: float) -> int:
    return {0.0: 1, -1.0: 2, 1.0: 3}[value]


# --- measurement ---------------------------------------------------------------------------------------------------
def best_rate(function, texts: list[str], repeats: int, before_each=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        started = time.perf_counter()
        for text in texts:
            function(text)
        best = min(best, time.perf_counter() - started)
    return len(texts) / best


def f1_summary(comparison: dict) -> dict:
    """The figures of one gold comparison worth keeping: macro-F1 and per-finding P/R/F1 with counts."""
    return {"reports": comparison["reports"], "macro_f1": comparison["macro_f1"],
            "per_finding": comparison["per_finding"]}


def convention_costs(texts_by_uid: dict[str, str], gold: dict, baseline: dict) -> dict[str, dict]:
    """Print and return macro-F1 (and per-finding F1) on the gold with each CheXpert convention taken out."""
    variants = dict(CHEXPERT_CONVENTIONS)
    merged: dict[str, tuple[str, ...]] = {}
    for drop in CHEXPERT_CONVENTIONS.values():
        for file, prefixes in drop.items():
            merged[file] = merged.get(file, ()) + tuple(prefixes)
    variants["all of the above"] = merged
    print(f"cost of CheXpert conventions the IU coders do not share (positive = 1; labeler as shipped: "
          f"{baseline['macro_f1']:.4f})")
    scores = {}
    with tempfile.TemporaryDirectory() as scratch:
        for number, (name, drop) in enumerate(variants.items()):
            labeler = Labeler(rules_dir=rules_without(drop, Path(scratch) / f"rules{number}"))
            result = compare_with_gold({uid: labeler.label_report(text).labels
                                        for uid, text in texts_by_uid.items()}, gold)
            changed = ", ".join(f"{finding} {baseline['per_finding'][finding]['f1']:.3f}->{score['f1']:.3f}"
                                for finding, score in result["per_finding"].items()
                                if abs(score["f1"] - baseline["per_finding"][finding]["f1"]) >= 0.0005)
            print(f"  without {name:<84} macro-F1 {result['macro_f1']:.4f}  ({changed})")
            scores[name] = {"dropped_rule_lines": {file: list(prefixes) for file, prefixes in drop.items()},
                            "macro_f1": result["macro_f1"],
                            "f1": {finding: score["f1"] for finding, score in result["per_finding"].items()}}
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="also time label_reports with N processes")
    parser.add_argument("--pipeline-subset", type=int, default=500, help="reports for the spaCy Doc pipeline timing")
    add_output_arguments(parser, "bench_labeler")
    args = parser.parse_args(argv)

    reports = list(iter_reports(IU_REPORTS_TGZ))
    texts = [text for _, text in reports]
    labeler = Labeler()
    print(f"labeler {labeler.name} {labeler.version}, rules {labeler.rules_hash}")
    print(f"IU reports: {len(texts)} (findings + impression labelled, every sentence)")

    results = {"reports": len(texts), "labeler": labeler.name, "labeler_version": labeler.version,
               "rules_hash": labeler.rules_hash}
    # each timed pass starts with an empty sentence cache: one pass over the corpus, as `medclip label` makes
    labeler_rate = best_rate(labeler.label_report, texts, args.repeats, labeler.clear_sentence_cache)
    uncached = Labeler()
    uncached.sentence_cache_size = 0
    uncached_rate = best_rate(uncached.label_report, texts, args.repeats)
    baseline_rate = best_rate(baseline_label_report, texts, args.repeats)
    subset = texts[:args.pipeline_subset]
    pipeline_rate = best_rate(labeler.label_report_with_pipeline, subset, 1)
    sentences = sum(len(labeler.label_report(text).sentences) for text in texts)
    results["sentences"] = sentences
    results["speed"] = {"how": f"one process, in-process calls (no start-up), best of {args.repeats}; the labeler's "
                               "sentence cache is emptied before each pass (uncached: cache off)",
                        "labeler_reports_per_s": labeler_rate, "labeler_uncached_reports_per_s": uncached_rate,
                        "baseline_reports_per_s": baseline_rate,
                        "ratio_labeler_to_baseline": labeler_rate / baseline_rate,
                        "pipeline_reports": len(subset), "pipeline_reports_per_s": pipeline_rate}
    print(f"\nspeed (one core, best of {args.repeats}):")
    print(f"  medclip labeler (fast path)   {labeler_rate:9.0f} reports/s  ({sentences} sentences)")
    print(f"  same, sentence cache off      {uncached_rate:9.0f} reports/s")
    print(f"  plain regex baseline          {baseline_rate:9.0f} reports/s")
    print(f"  ratio labeler / baseline      {labeler_rate / baseline_rate:9.2f}")
    print(f"  spaCy Doc pipeline ({len(subset)} rep.) {pipeline_rate:9.0f} reports/s  "
          f"(same labels; fast path is {labeler_rate / pipeline_rate:.1f}x)")
    if args.workers > 1:  # on the corpus repeated 10x, so process start-up does not dominate
        corpus = texts * 10
        rates = {}
        for workers in (1, args.workers):
            started = time.perf_counter()
            labeler.label_reports(corpus, workers=workers)
            rates[workers] = len(corpus) / (time.perf_counter() - started)
            print(f"  label_reports(workers={workers}), {len(corpus)} reports {rates[workers]:9.0f} reports/s")
        print(f"  ratio workers={args.workers} / workers=1        {rates[args.workers] / rates[1]:9.2f} "
              f"(incl. process start-up and sending sentence labels back)")
        results["speed"]["label_reports_corpus"] = len(corpus)
        results["speed"]["label_reports_per_s_by_workers"] = rates

    gold = read_gold()
    by_uid = {uid: text for uid, text in reports if uid in gold}
    ours = {uid: labeler.label_report(text).labels for uid, text in by_uid.items()}
    theirs = {uid: baseline_label_report(text)[0] for uid, text in by_uid.items()}
    print()
    quality = {}
    for uncertain_positive in (False, True):
        for key, name, predictions in (("labeler", "medclip labeler", ours), ("regex_baseline", "regex baseline", theirs)):
            comparison = compare_with_gold(predictions, gold, uncertain_positive)
            print(format_table(comparison, f"{name} vs IU dev gold"))
            quality[f"{key}{'_uncertain_positive' if uncertain_positive else ''}"] = f1_summary(comparison)
        print()
    results["quality_iu_dev_gold"] = quality
    results["without_convention"] = convention_costs(by_uid, gold, compare_with_gold(ours, gold))
    write_results(args, results, argv, __file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
