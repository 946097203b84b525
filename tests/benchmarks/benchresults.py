"""Where benchmark numbers go: one JSON file per script under tests/benchmarks/results/, with provenance.

Every figure the README states is backed by one of these files (see tests/benchmarks/README.md). Each file
records the command that produced it, the date, the git commit, the machine and the library versions, so a
figure can be traced and rerun. Versions are read from package metadata, so recording them imports nothing.

    from benchresults import add_output_arguments, write_results
    add_output_arguments(parser, "bench_x")          # --out PATH (default results/bench_x.json), --no-out, --machine
    write_results(args, {"figure": 1.0}, argv)       # prints where it wrote
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[2]
LIBRARIES = ("open_clip_medclip", "open_clip_torch", "torch", "torchvision", "timm", "transformers", "numpy",
             "scikit-learn", "spacy", "pillow", "webdataset")


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", default=str(RESULTS_DIR / f"{name}.json"),
                        help="results JSON (default: tests/benchmarks/results/%(prog)s's file)")
    parser.add_argument("--no-out", action="store_true", help="print only, write no results file")
    parser.add_argument("--machine", default=None,
                        help="how to describe this machine in the results, e.g. '2-core CPU dev box (shared with "
                             "other jobs during this run)'; default: CPU count and model")


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine(description: str | None) -> dict:
    cpus = usable_cpus()
    return {
        "description": description or f"{cpus}-core CPU ({cpu_model() or 'unknown model'})",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "usable_cpus": cpus,
        "os_cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def libraries() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{' (uncommitted changes in the tree)' if dirty else ''}"


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as typed from the repository root (`python tests/benchmarks/x.py ARGS`)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        shown = Path(script).resolve().relative_to(REPO)
    except ValueError:
        shown = Path(script)
    return shlex.join(["python", str(shown), *args])


def provenance(script: str, argv: list[str] | None, description: str | None) -> dict:
    return {
        "script": command_line(script, []).split(" ", 1)[1],
        "command": command_line(script, argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine(description),
        "libraries": libraries(),
    }


def write_results(args: argparse.Namespace, results: dict, argv: list[str] | None, script: str,
                  notes: list[str] | None = None) -> Path | None:
    """Write provenance + results to args.out (unless --no-out); returns the path written."""
    if args.no_out:
        return None
    record = provenance(script, argv, args.machine)
    if notes:
        record["notes"] = notes
    record["results"] = results
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    temporary.replace(path)
    print(f"results written to {path}")
    return path


def rss_mb() -> float:
    """This process's resident set (MB, from /proc; NaN where that is missing): the memory figure benchmarks record."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
