"""`medclip label INPUT --out OUT.csv`: label reports with the 14 CheXpert findings.

Writes a CheXpert-labeler-compatible CSV (optional id column, `Reports`, the 14 findings as 1.0 / 0.0 / -1.0 /
blank; with `--sentences` one row per labelled sentence, `Reports` holding the sentence) and
`OUT.csv.provenance.json` beside it (labeler version, rules hash, input, options, counts). Both are written to a
temporary file first and renamed, so an existing output is never left half-written.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from open_clip_medclip.findings import CHEXPERT_FINDINGS
from open_clip_medclip.knowledge.components import DEFAULT_LABEL_SECTIONS
from open_clip_medclip.knowledge.labeler import Labeler
from open_clip_medclip.knowledge.readers import ReportInputError, iter_reports
from open_clip_medclip.knowledge.rules import RuleFileError

PROVENANCE_SUFFIX = ".provenance.json"
VALUE_TEXT = {1.0: "1.0", 0.0: "0.0", -1.0: "-1.0", None: ""}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medclip label",
        description="Label radiology reports with the 14 CheXpert findings (1 positive, 0 negative, -1 uncertain, "
                    "blank not mentioned), CheXpert-labeler compatible.")
    parser.add_argument("input", help="a CSV, an IU/OpenI XML file, folder or .tgz, or a folder of .txt reports")
    parser.add_argument("--out", required=True, help="output CSV; provenance goes to OUT.provenance.json")
    parser.add_argument("--text-column", default="Reports", help="CSV column with the report text (default Reports)")
    parser.add_argument("--id-column", default=None, help="CSV column with a report id to copy to the output")
    parser.add_argument("--no-header", action="store_true",
                        help="the CSV has no header row; its first column is the report (CheXpert sample format)")
    parser.add_argument("--sentences", action="store_true", help="write one row per labelled sentence")
    parser.add_argument("--workers", type=int, default=1, help="label in N processes (default 1)")
    parser.add_argument("--sections", nargs="+", default=list(DEFAULT_LABEL_SECTIONS),
                        help="sections to label when present (default: findings impression)")
    parser.add_argument("--rules-dir", default=None, help="folder of rule files (default: the bundled rules)")
    parser.add_argument("--scispacy-model", default=None,
                        help="build the pipeline on an installed scispaCy model, e.g. en_core_sci_sm (slower)")
    parser.add_argument("--umls-linker", action="store_true",
                        help="add scispaCy's UMLS linker; linked entities in rules/umls_cuis.json become mentions")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _atomic_writer(path: Path):
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    return temporary, temporary.open("w", newline="", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("medclip label: error: --workers must be at least 1", file=sys.stderr)
        return 2
    input_path, out_path = Path(args.input), Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        labeler = Labeler(rules_dir=args.rules_dir, sections=args.sections, scispacy_model=args.scispacy_model,
                          umls_linker=args.umls_linker)
    except (RuleFileError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"medclip label: error: {exc}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    temporary, handle = _atomic_writer(out_path)
    counts = {name: {"positive": 0, "negative": 0, "uncertain": 0, "blank": 0} for name in CHEXPERT_FINDINGS}
    reports = rows = 0
    id_column: str | None = None
    try:
        with handle:
            writer = csv.writer(handle)
            items = iter_reports(input_path, args.text_column, args.id_column, header=not args.no_header)
            first = next(items)
            id_column = args.id_column or ("id" if first[0] is not None else None)
            header = ([id_column] if id_column else []) + (["report_index", "sentence_index"] if args.sentences
                                                          else []) + ["Reports", *CHEXPERT_FINDINGS]
            writer.writerow(header)
            pairs = _prepend(first, items)
            ids: list[str | None] = []
            texts_seen: list[str] = []

            def texts() -> Iterator[str]:
                for report_id, text in pairs:
                    ids.append(report_id)
                    texts_seen.append(text)
                    yield text

            tqdm.monitor_interval = 0  # no monitor thread, so worker processes can be forked
            progress = tqdm(labeler.imap(texts(), workers=args.workers), desc="labelling", unit=" reports",
                            disable=args.quiet, file=sys.stderr)
            for index, result in enumerate(progress):
                report_id, text = ids[index], texts_seen[index]
                ids[index] = texts_seen[index] = None  # keep memory flat on large inputs
                prefix = [report_id if report_id is not None else ""] if id_column else []
                if args.sentences:
                    for number, sentence in enumerate(result.sentences):
                        writer.writerow(prefix + [index, number, sentence.text] + _values(sentence.labels))
                        _count(counts, sentence.labels)
                        rows += 1
                else:
                    writer.writerow(prefix + [text] + _values(result.labels))
                    _count(counts, result.labels)
                    rows += 1
                reports += 1
        os.replace(temporary, out_path)
    except StopIteration:
        temporary.unlink(missing_ok=True)
        print(f"medclip label: error: {input_path}: no reports found (empty input)", file=sys.stderr)
        return 2
    except (ReportInputError, OSError) as exc:
        temporary.unlink(missing_ok=True)
        print(f"medclip label: error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    elapsed = time.perf_counter() - started

    provenance = {
        "tool": "medclip label",
        **labeler.provenance(),
        "input": str(input_path.resolve()),
        "output": str(out_path.resolve()),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "text_column": args.text_column, "id_column": id_column, "header": not args.no_header,
        "sentences_mode": args.sentences, "workers": args.workers,
        "reports": reports, "rows": rows, "elapsed_s": round(elapsed, 3),
        "label_counts": counts,
        "value_coding": {"1.0": "positive", "0.0": "negative", "-1.0": "uncertain", "": "not mentioned"},
    }
    provenance_path = out_path.with_name(out_path.name + PROVENANCE_SUFFIX)
    temporary_provenance = provenance_path.with_name(f".{provenance_path.name}.tmp-{os.getpid()}")
    temporary_provenance.write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary_provenance, provenance_path)

    positives = ", ".join(f"{name} {c['positive']}" for name, c in counts.items() if c["positive"]) or "none"
    unit = "sentences" if args.sentences else "reports"
    print(f"Labelled {reports} reports from {input_path} in {elapsed:.1f} s ({reports / max(elapsed, 1e-9):.0f} "
          f"reports/s, {args.workers} worker(s)) with {labeler.name} {labeler.version} (rules {labeler.rules_hash[:19]}"
          f"…); wrote {rows} rows to {out_path} and provenance to {provenance_path}. Positive {unit}: {positives}.")
    return 0


def _prepend(first, rest) -> Iterator:
    yield first
    yield from rest


def _values(labels) -> list[str]:
    return [VALUE_TEXT[value] for value in labels]


def _count(counts: dict, labels) -> None:
    for name, value in zip(CHEXPERT_FINDINGS, labels):
        key = "blank" if value is None else "positive" if value == 1.0 else "uncertain" if value == -1.0 \
            else "negative"
        counts[name][key] += 1


if __name__ == "__main__":
    sys.exit(main())
