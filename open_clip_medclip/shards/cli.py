"""`medclip shards build|validate|index|merge`: labelled WebDataset shards from dataset files, their spec check,
their index, and the merge of part builds.

Examples:
  medclip shards build --source nih --csv sample_data/nih_cxr14/labels.csv --out shards/nih
  medclip shards build --source pediatric --root chest_xray --out shards/ped --workers 4
  medclip shards build --source iu-reports --reports NLMCXR_reports.tgz --out shards/iu --text-unit sentence
  medclip shards build --source generic-csv --csv pairs.csv --image-column path --report-column report \
      --kind paired --out shards/pairs
  medclip shards validate shards/nih
  medclip shards index shards/old-build            # index a build made before the index existed
  medclip shards build --source nih --csv labels.csv --out shards/nih-p1 --part 1/4   # ... 4/4 on other machines
  medclip shards merge shards/nih-p1 shards/nih-p2 shards/nih-p3 shards/nih-p4 --out shards/nih
Prints a JSON summary on stdout and a one-paragraph account on stderr; exit 0 ok, 1 validation failed,
2 bad input or options.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from open_clip_medclip.errors import UserError, WorkNotDone
from open_clip_medclip.labels import DEFAULT_BUILD_POLICY, POLICIES
from open_clip_medclip.parts import parse_part
from open_clip_medclip.shards.builder import BuildError, BuildOptions, build_shards
from open_clip_medclip.shards.format import DEFAULT_IMAGE_SIZE, IMAGE_FORMATS, KINDS, TEXT_KINDS
from open_clip_medclip.shards.validate import validate_shards
from open_clip_medclip.sources.records import SourceError
from open_clip_medclip.sources.registry import ALIASES, SOURCES, get_source


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclip shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write labelled shards",
                                description="sources:\n" + "\n".join(f"  {name:<13} {source.reads}" for name, source
                                                                     in SOURCES.items())
                                + "\n(deprecated aliases: " + ", ".join(f"{a} = {n}" for a, n in ALIASES.items()) + ")",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--source", required=True, metavar="SOURCE", help=f"one of: {', '.join(SOURCES)}")
    build.add_argument("--out", required=True, type=Path, help="output folder for the shards")
    build.add_argument("--csv", type=Path, help="the source's table")
    build.add_argument("--root", type=Path, help="image root folder (default: depends on the source)")
    build.add_argument("--labels", type=Path, help="MIMIC label table (chexpert.csv or negbio.csv)")
    build.add_argument("--metadata", type=Path, help="MIMIC metadata table")
    build.add_argument("--reports", type=Path, help="MIMIC reports folder, or the reports for iu-reports")
    build.add_argument("--class-info", type=Path, help="RSNA stage_2_detailed_class_info.csv")
    build.add_argument("--image-column", help="generic-csv: image path column")
    build.add_argument("--report-column", help="generic-csv: report text column (makes paired/text possible)")
    build.add_argument("--label-columns", help="generic-csv: comma list of COLUMN or COLUMN=Finding")
    build.add_argument("--class-column", help="generic-csv: column whose value names a finding")
    build.add_argument("--id-column", help="id column (generic-csv, labelled-csv, iu-reports CSV)")
    build.add_argument("--text-column", default="Reports", help="text column of CSV reports (default Reports)")
    build.add_argument("--source-name", help="name written as `source` (default: the dataset family)")
    build.add_argument("--kind", help=f"comma list of sample kinds ({', '.join(KINDS)}); default per source")
    build.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="longer side in px (default 256)")
    build.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpg")
    build.add_argument("--samples-per-shard", type=int, default=1000)
    build.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    build.add_argument("--uncertainty", choices=POLICIES, default=DEFAULT_BUILD_POLICY,
                       help="label policy applied when writing: raw (default: 1/0/-1/blank kept; training applies "
                            "--medclip-uncertain), zeros (-1 and blank -> 0), ones (-1 -> 1), keep (-1 kept)")
    build.add_argument("--text-unit", choices=("report", "sentence"), default="report",
                       help="text kind: one sample per report or per labelled sentence")
    build.add_argument("--split", help="only rows whose split column/folder equals this (e.g. train)")
    build.add_argument("--limit", type=int, help="only the first N records (after --split)")
    build.add_argument("--prefix", help="shard file prefix (default: the source name)")
    build.add_argument("--licence", help="licence text for provenance.json (default: known per source)")
    build.add_argument("--overwrite", action="store_true", help="replace a different build in --out")
    build.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    build.add_argument("--part", help="I/N: build only part I of N (1-based) of the inputs, split by source and "
                                      "id; merge the N folders with 'medclip shards merge'")
    validate = commands.add_parser("validate", help="check a shard folder against the spec")
    validate.add_argument("folder", type=Path)
    validate.add_argument("--no-decode", action="store_true", help="check image magic bytes only (faster)")
    index = commands.add_parser("index", help="write the index of a finished build (builds made before the index)")
    index.add_argument("folder", type=Path)
    merge = commands.add_parser("merge", help="combine the part folders of one build into one folder and index")
    merge.add_argument("parts", nargs="+", type=Path, help="the part folders (all N parts of --part I/N builds)")
    merge.add_argument("--out", required=True, type=Path, help="new or empty output folder")
    return parser


def _select(items: Iterable, split: str | None, limit: int | None) -> Iterable:
    count = 0
    for item in items:
        if split is not None and getattr(item, "meta", {}).get("split", split) != split:
            continue
        if limit is not None and count >= limit:
            return
        count += 1
        yield item


def run_build(args: argparse.Namespace) -> int:
    args.source = get_source(args.source).name
    kinds = tuple(k.strip() for k in args.kind.split(",")) if args.kind else SOURCES[args.source].default_kinds
    options = BuildOptions(kinds=kinds, image_size=args.image_size, image_format=args.image_format,
                           samples_per_shard=args.samples_per_shard, workers=args.workers,
                           uncertainty=args.uncertainty, prefix=args.prefix or args.source.replace("-", "_"),
                           text_unit=args.text_unit, licence=args.licence, overwrite=args.overwrite,
                           progress=not args.no_progress, part=parse_part(args.part))
    labeler = None
    if args.source != "labelled-csv" and any(kind in TEXT_KINDS for kind in kinds):
        from open_clip_medclip.knowledge import Labeler

        labeler = Labeler()
    items = _select(get_source(args.source).items(args), args.split, args.limit)  # the part split is applied by build_shards
    summary = build_shards(items, args.out, options, labeler=labeler)
    print(json.dumps(summary.to_json(), sort_keys=True))
    reasons = ", ".join(f"{count} {reason}" for reason, count in summary.reject_reasons.items()) or "none"
    state = "was already complete" if summary.already_complete else (
        f"took {summary.seconds:.1f} s ({summary.samples_per_second:.0f} samples/s"
        + (f", {summary.resumed_shards} shard(s) kept from an earlier run)" if summary.resumed_shards else ")"))
    print(f"shards: {summary.line()}. Kinds: {summary.kinds or 'none'}. Rejects by reason: {reasons} "
          f"(details in rejects.jsonl). The build {state}; check it with 'medclip shards validate {args.out}'.",
          file=sys.stderr)
    if not summary.written and (summary.inputs or options.part is None):  # an empty part of a split build is fine
        raise WorkNotDone(f"0 samples written to {args.out}: " + (
            f"all {summary.inputs} input(s) rejected ({reasons}; see {args.out}/rejects.jsonl)" if summary.inputs
            else f"the source {args.source!r} gave no input (check --csv/--root/--split/--limit)"))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    report = validate_shards(args.folder, decode_images=not args.no_decode)
    print(json.dumps(report.to_json(), sort_keys=True))
    verdict = "conforms to shard spec v1" if report.ok else f"has {len(report.problems)} problem(s)"
    print(f"validate: {args.folder} {verdict} (index included): {report.shards} shard(s), {report.samples} sample(s), kinds "
          f"{report.kinds or 'none'}.", file=sys.stderr)
    for problem in report.problems[:50]:
        print(f"  {problem}", file=sys.stderr)
    if len(report.problems) > 50:
        print(f"  ... and {len(report.problems) - 50} more (all in the JSON output)", file=sys.stderr)
    return 0 if report.ok else 1


def run_index(args: argparse.Namespace) -> int:
    from open_clip_medclip.shards.merge import write_index

    index = write_index(args.folder)
    print(json.dumps({"index": index.location, "shards": len(index.shards), "samples": index.samples,
                      "kinds": index.kinds, "bank_entries": index.bank["entries"],
                      "label_policy": index.label_policy}, sort_keys=True))
    print(f"index: wrote {index.location} ({len(index.shards)} shard(s), {index.samples} sample(s), "
          f"{index.bank['entries']} bank entries, label policy {index.label_policy}).", file=sys.stderr)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from open_clip_medclip.shards.merge import merge_builds

    summary = merge_builds(args.parts, args.out)
    print(json.dumps(summary.to_json(), sort_keys=True))
    print(f"merge: {summary.line()} ({summary.linked} hard-linked, {summary.copied} copied); check it with "
          f"'medclip shards validate {args.out}'.", file=sys.stderr)
    if not summary.written:
        raise WorkNotDone(f"0 samples written to {args.out}: the {summary.parts} part(s) hold no sample")
    return 0


COMMANDS = {"build": run_build, "validate": run_validate, "index": run_index, "merge": run_merge}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (SourceError, BuildError, UserError) as exc:
        print(f"medclip shards: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)


if __name__ == "__main__":
    raise SystemExit(main())
