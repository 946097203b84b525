"""`medclip label INPUT --out OUT.csv`: label reports with the 14 CheXpert findings.

Writes a CheXpert-labeler-compatible CSV (optional id column, `Reports`, the 14 findings as 1.0 / 0.0 / -1.0 /
blank; with `--sentences` one row per labelled sentence, `Reports` holding the sentence) and
`OUT.csv.provenance.json` beside it (labeler version, rules hash, input, options, counts). Both are written to a
hidden temporary file first and renamed, so an existing output is never left half-written; a temporary file
left by a killed run is removed by the next run.

Input faults are one-line errors naming the file and row (exit 2 through `medclip`): bytes that are not valid
`--encoding` (default UTF-8, strict), XML that is not an IU/OpenI report, a missing column. Reports may be of any
length. Duplicate report ids are not an error (rows are labelled and written as they are) but are reported: a
warning line on stderr with the count and the first examples, and `duplicate_ids` in the provenance.

`--part I/N` labels only the I-th of N contiguous, equal (±1) ranges of the input's reports, in input order
(reports counted as the reader yields them), so the N outputs concatenated in part order (one header) are the
single run's output. `--workers N` labels in N processes; they die with this process (SIGTERM, SIGKILL, Ctrl-C).

This module imports only the standard library at start-up; `--help` is instant and labelling never imports
torch, open_clip or spaCy (unless a scispaCy option asks for the spaCy pipeline).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from open_clip_medclip.errors import UserError, handling_signal
from open_clip_medclip.findings import CHEXPERT_FINDINGS, NUM_FINDINGS
from open_clip_medclip.parts import parse_part, part_json

PROVENANCE_SUFFIX = ".provenance.json"
# Label-count columns per finding; index = position in COUNT_KEYS.
COUNT_KEYS = ("positive", "negative", "uncertain", "blank")
_COUNT_INDEX = {1.0: 0, 0.0: 1, -1.0: 2, None: 3}
DEFAULT_SECTIONS = ("findings", "impression")  # = components.DEFAULT_LABEL_SECTIONS (kept here: --help is light)
CHUNK_SIZE = 512
DUPLICATE_EXAMPLES = 3
SCISPACY_HINT = "pip install 'open_clip_medclip[scispacy]'"


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
    parser.add_argument("--encoding", default="utf-8",
                        help="text encoding of CSV/.txt input (default utf-8, strict: an undecodable byte is an "
                             "error naming the row); XML follows its own declaration")
    parser.add_argument("--sentences", action="store_true", help="write one row per labelled sentence")
    parser.add_argument("--workers", type=int, default=1, help="label in N processes (default 1)")
    parser.add_argument("--part", default=None, metavar="I/N",
                        help="label only part I of N (contiguous ranges of the input's reports, in order; the N "
                             "outputs concatenated in part order equal the single run's), e.g. for array jobs")
    parser.add_argument("--sections", nargs="+", default=list(DEFAULT_SECTIONS),
                        help="sections to label when present (default: findings impression)")
    parser.add_argument("--rules-dir", default=None, help="folder of rule files (default: the bundled rules)")
    parser.add_argument("--scispacy-model", default=None,
                        help="build the pipeline on an installed scispaCy model, e.g. en_core_sci_sm (slower; "
                             f"needs {SCISPACY_HINT})")
    parser.add_argument("--umls-linker", action="store_true",
                        help="add scispaCy's UMLS linker; linked entities in rules/umls_cuis.json become mentions "
                             f"(needs {SCISPACY_HINT})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def part_range(count: int, index: int, total: int) -> tuple[int, int]:
    """[start, stop) of part `index` (1-based) of `total` contiguous ranges over `count` items (sizes differ by at
    most one). The labeller splits by position, not by id hash (`parts.part_of`, used by `medclip shards build`):
    its output is an ordered CSV, and reports need not have ids."""
    return (index - 1) * count // total, index * count // total


def check_scispacy(args: argparse.Namespace) -> None:
    """The scispaCy options need the `[scispacy]` extra: one line saying so when it is missing."""
    if not (args.scispacy_model or args.umls_linker):
        return
    import importlib.util

    flag = "--umls-linker" if args.umls_linker else "--scispacy-model"
    if importlib.util.find_spec("scispacy") is None:
        raise UserError(f"{flag} needs scispaCy, which is an optional extra: {SCISPACY_HINT}")


class _Terminated(SystemExit):
    """SIGTERM: unwind like an exit (workers terminated, temporary output removed)."""


def _on_sigterm(signum, frame):
    raise _Terminated(128 + signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    part = parse_part(args.part)
    check_scispacy(args)
    with handling_signal(signal.SIGTERM, _on_sigterm):  # `finally` blocks stop the workers and clean up
        return _run(args, part)


def _run(args: argparse.Namespace, part: tuple[int, int] | None) -> int:
    from open_clip_medclip.atomic import atomic_write, write_text
    from open_clip_medclip.knowledge.labeler import Labeler, chunked
    from open_clip_medclip.knowledge.rules import RuleFileError
    from open_clip_medclip.labels import CSV_TEXT, VALUE_MEANINGS
    from open_clip_medclip.sources.reports import iter_reports

    input_path, out_path = Path(args.input), Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        labeler = Labeler(rules_dir=args.rules_dir, sections=args.sections, scispacy_model=args.scispacy_model,
                          umls_linker=args.umls_linker)
    except (RuleFileError, FileNotFoundError, RuntimeError, ValueError) as exc:
        raise UserError(str(exc)) from exc

    def read() -> Iterator[tuple[str | None, str]]:
        return iter_reports(input_path, args.text_column, args.id_column, header=not args.no_header,
                            encoding=args.encoding)

    started = time.perf_counter()
    duplicates = _DuplicateIds()
    selected = available = None
    if part is not None:  # a first pass counts the reports (and checks ids over the whole input)
        available = 0
        for available, (report_id, _) in enumerate(read(), start=1):
            duplicates.add(report_id, available - 1)
        selected = part_range(available, *part)
    items = read()
    first = next(items, None)
    if first is None:  # iter_reports raises for an empty input; kept for readers that yield nothing
        raise UserError(f"{input_path}: no reports found (empty input)")
    id_column = args.id_column or ("id" if first[0] is not None else None)
    header = ([id_column] if id_column else []) + (["report_index", "sentence_index"] if args.sentences
                                                  else []) + ["Reports", *CHEXPERT_FINDINGS]
    indexed = _numbered(_prepend(first, items), selected, duplicates if id_column and part is None else None)
    counts = [[0] * len(COUNT_KEYS) for _ in CHEXPERT_FINDINGS]
    reports = rows = 0
    with atomic_write(out_path, "w", newline="") as handle:
        csv.writer(handle).writerow(header)
        progress = _progress(args.quiet)
        formatter = _SentenceRows if args.sentences else _ReportRows
        chunks = chunked(indexed, CHUNK_SIZE)
        for text, chunk_counts, chunk_reports, chunk_rows in labeler.map_chunks(
                formatter(bool(id_column)), chunks, workers=args.workers):
            handle.write(text)
            for finding, values in zip(counts, chunk_counts):
                for key, value in enumerate(values):
                    finding[key] += value
            reports += chunk_reports
            rows += chunk_rows
            progress(chunk_reports)
        progress(0, close=True)
    elapsed = time.perf_counter() - started

    provenance = {
        "tool": "medclip label",
        **labeler.provenance(),
        "input": str(input_path.resolve()),
        "output": str(out_path.resolve()),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "text_column": args.text_column, "id_column": id_column, "header": not args.no_header,
        "encoding": args.encoding, "sentences_mode": args.sentences, "workers": args.workers,
        "part": None if part is None else {**part_json(part), "first_report": selected[0] + 1,
                                           "last_report": selected[1], "reports_in_input": available},
        "reports": reports, "rows": rows, "elapsed_s": round(elapsed, 3),
        "duplicate_ids": duplicates.summary(),
        "label_counts": {name: dict(zip(COUNT_KEYS, values)) for name, values in zip(CHEXPERT_FINDINGS, counts)},
        "value_coding": {CSV_TEXT[value]: meaning for value, meaning in VALUE_MEANINGS.items()},
    }
    provenance_path = out_path.with_name(out_path.name + PROVENANCE_SUFFIX)
    write_text(provenance_path, json.dumps(provenance, indent=2) + "\n")

    if duplicates.count:
        print(f"medclip label: warning: {duplicates.describe(input_path)}; their rows are written as they are",
              file=sys.stderr)
    positives = ", ".join(f"{name} {values[0]}" for name, values in zip(CHEXPERT_FINDINGS, counts) if values[0]) \
        or "none"
    unit = "sentences" if args.sentences else "reports"
    scope = "" if part is None else f" (part {part[0]}/{part[1]}: reports {selected[0] + 1}-{selected[1]} of " \
                                    f"{available})"
    print(f"Labelled {reports} reports from {input_path}{scope} in {elapsed:.1f} s ({reports / max(elapsed, 1e-9):.0f} "
          f"reports/s, {args.workers} worker(s)) with {labeler.name} {labeler.version} (rules {labeler.rules_hash[:19]}"
          f"…); wrote {rows} rows to {out_path} and provenance to {provenance_path}. Positive {unit}: {positives}.")
    return 0


class _DuplicateIds:
    """Counts report ids seen more than once and keeps the first few examples with their report numbers."""

    def __init__(self):
        self.first_seen: dict[str, int] = {}
        self.count = 0
        self.examples: list[tuple[str, int, int]] = []

    def add(self, report_id: str | None, index: int) -> None:
        if report_id is None:
            return
        first = self.first_seen.setdefault(report_id, index)
        if first != index:
            self.count += 1
            if len(self.examples) < DUPLICATE_EXAMPLES:
                self.examples.append((report_id, first + 1, index + 1))

    def describe(self, where) -> str:
        shown = ", ".join(f"{rid!r} (reports {a} and {b})" for rid, a, b in self.examples)
        more = ", ..." if self.count > len(self.examples) else ""
        return f"{where}: {self.count} report(s) repeat an earlier report id, e.g. {shown}{more}"

    def summary(self) -> dict:
        return {"count": self.count, "examples": [{"id": rid, "first_report": a, "repeated_at_report": b}
                                                  for rid, a, b in self.examples]}


def _numbered(items: Iterable[tuple[str | None, str]], selected: tuple[int, int] | None,
              duplicates: _DuplicateIds | None) -> Iterator[tuple[int, str | None, str]]:
    """(input-wide report index, id, text) of the selected range (all by default), checking ids on the way."""
    start, stop = selected if selected is not None else (0, None)
    for index, (report_id, text) in enumerate(items):
        if stop is not None and index >= stop:
            break
        if duplicates is not None:
            duplicates.add(report_id, index)
        if index >= start:
            yield index, report_id, text


class _ReportRows:
    """Worker-side formatting: one CSV row per report. Picklable (module-level class, plain state)."""

    def __init__(self, with_id: bool):
        self.with_id = with_id

    def __call__(self, labeler, chunk: list[tuple[int, str | None, str]]) -> tuple[str, list, int, int]:
        from open_clip_medclip.labels import CSV_TEXT

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        counts = [[0] * len(COUNT_KEYS) for _ in range(NUM_FINDINGS)]
        for _, report_id, text in chunk:
            labels = labeler.label_report(text, with_sentences=False).labels
            prefix = [report_id if report_id is not None else ""] if self.with_id else []
            writer.writerow(prefix + [text] + [CSV_TEXT[value] for value in labels])
            _count(counts, labels)
        return buffer.getvalue(), counts, len(chunk), len(chunk)


class _SentenceRows(_ReportRows):
    """Worker-side formatting: one CSV row per labelled sentence (`report_index` is the input-wide index)."""

    def __call__(self, labeler, chunk: list[tuple[int, str | None, str]]) -> tuple[str, list, int, int]:
        from open_clip_medclip.labels import CSV_TEXT

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        counts = [[0] * len(COUNT_KEYS) for _ in range(NUM_FINDINGS)]
        rows = 0
        for index, report_id, text in chunk:
            prefix = [report_id if report_id is not None else ""] if self.with_id else []
            for number, sentence in enumerate(labeler.label_report(text).sentences):
                writer.writerow(prefix + [index, number, sentence.text] +
                                [CSV_TEXT[value] for value in sentence.labels])
                _count(counts, sentence.labels)
                rows += 1
        return buffer.getvalue(), counts, len(chunk), rows


def _count(counts: list[list[int]], labels) -> None:
    for finding, value in zip(counts, labels):
        finding[_COUNT_INDEX[value]] += 1


def _prepend(first, rest) -> Iterator:
    yield first
    yield from rest


def _progress(quiet: bool):
    """update(n) / update(0, close=True): a tqdm bar on stderr unless quiet (tqdm imported only then)."""
    if quiet:
        return lambda n, close=False: None
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread, so worker processes can be forked
    bar = tqdm(desc="labelling", unit=" reports", file=sys.stderr)

    def update(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()

    return update


if __name__ == "__main__":
    from open_clip_medclip.cli import run_command

    sys.exit(run_command("label", main))
