"""Start-up and end-to-end `medclip label` benchmark, side by side with the previous behaviour (issue 13).

    python tests/benchmarks/bench_startup.py [--before-rev 5ccd27d] [--repeats 5] [--json OUT.json]

Measured in one run, each command in a fresh interpreter (wall time, and the CPU time of the command and its
workers):
- start-up: `medclip --help` and `medclip label --help` (goal <= 0.5 s);
- `medclip label` end to end on all bundled IU reports x10 (39,550 reports, CSV) with one worker, start-up
  included (goal >= 5,000 reports/s);
- `--workers 2` vs one worker on IU x52 (205,660 reports; goal >= 1.6x).
"Before" is the package as of `--before-rev` (default: the commit before the fast start), exported with
`git archive` into a temporary folder and put first on PYTHONPATH; it imported torch and open_clip at start-up
and sent every report's labels back from its workers as objects. Without git, `--before-rev none` skips it.
Timings on a shared machine are noisy: the load average at the start is recorded with the numbers.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DEFAULT_BEFORE_REV = "5ccd27d"  # main before the fast start (imports torch + open_clip in every subcommand)
ENTRY = "import sys; from open_clip_medclip.cli import main; sys.exit(main())"


def export_before(rev: str, folder: Path) -> Path:
    """The package as of `rev`, laid out as installed (plugins/ inside the package), under `folder`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "open_clip_medclip", "plugins"],
                             capture_output=True, check=True).stdout
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    shutil.move(str(folder / "plugins"), str(folder / "open_clip_medclip" / "plugins"))
    return folder


def run(argv: list[str], pythonpath: Path | None) -> tuple[float, float]:
    """(wall s, CPU s of the command and its children) for `medclip ARGV` in a fresh interpreter (run outside
    the checkout, so `python -c` does not find the package through the current folder)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    else:
        env.pop("PYTHONPATH", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", ENTRY, *argv], env=env, capture_output=True, text=True,
                            cwd=tempfile.gettempdir())
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"medclip {' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def package_file(pythonpath: Path | None) -> str:
    env = dict(os.environ, PYTHONPATH=str(pythonpath)) if pythonpath else {k: v for k, v in os.environ.items()
                                                                           if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", "import open_clip_medclip.cli as c; print(c.__file__)"], env=env,
                          capture_output=True, text=True, check=True, cwd=tempfile.gettempdir()).stdout.strip()


def write_corpus(path: Path, reports: list[tuple[str, str]], times: int) -> int:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "Reports"])
        for copy in range(times):
            writer.writerows((f"{report_id}-{copy}", text) for report_id, text in reports)
    return len(reports) * times


def machine_name() -> str:
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {platform.system()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-rev", default=DEFAULT_BEFORE_REV, help="git revision of 'before' ('none': skip)")
    parser.add_argument("--repeats", type=int, default=5, help="start-up runs per command (best and median kept)")
    parser.add_argument("--scale", type=int, default=10, help="IU copies for the one-worker run (default 10)")
    parser.add_argument("--big-scale", type=int, default=52, help="IU copies for workers 1 vs 2 (default 52)")
    parser.add_argument("--machine", default=None, help="machine description for the JSON (default: CPU count)")
    parser.add_argument("--json", default=None, help="write the numbers as JSON")
    args = parser.parse_args(argv)

    from open_clip_medclip.knowledge import iter_reports
    from open_clip_medclip.knowledge.evaluation import IU_REPORTS_TGZ

    results: dict = {"machine": args.machine or machine_name(), "load_average_at_start": list(os.getloadavg()),
                     "before_rev": None if args.before_rev == "none" else args.before_rev,
                     "command": "python tests/benchmarks/bench_startup.py " + " ".join(argv or sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="bench_startup-") as scratch_name:
        scratch = Path(scratch_name)
        variants: dict[str, Path | None] = {"after": None}
        if args.before_rev != "none":
            variants = {"before": export_before(args.before_rev, scratch / "before"), "after": None}
            assert package_file(variants["before"]).startswith(str(scratch)), "'before' package not picked up"
        assert package_file(None).startswith(str(REPO)), "run from this checkout's environment"

        reports = list(iter_reports(IU_REPORTS_TGZ))
        corpus = scratch / "iu_x.csv"
        big = scratch / "iu_big.csv"
        n_small = write_corpus(corpus, reports, args.scale)
        n_big = write_corpus(big, reports, args.big_scale)
        results.update(reports_small=n_small, reports_big=n_big)

        print(f"machine: {results['machine']}; load average {results['load_average_at_start']}")
        print(f"start-up (best / median of {args.repeats} runs, wall s; best CPU s)")
        startup: dict = {}
        for label, command in (("medclip --help", ["--help"]), ("medclip label --help", ["label", "--help"])):
            row = {}
            for variant, path in variants.items():
                timings = sorted(run(command, path) for _ in range(args.repeats))
                walls = [wall for wall, _ in timings]
                row[variant] = {"best_s": walls[0], "median_s": walls[len(walls) // 2],
                                "best_cpu_s": min(cpu for _, cpu in timings)}
            startup[label] = row
            print(f"  {label:<22}" + "".join(f"  {variant} {row[variant]['best_s']:6.2f} / "
                                             f"{row[variant]['median_s']:6.2f} (CPU {row[variant]['best_cpu_s']:5.2f})"
                                             for variant in variants))
        results["startup"] = startup

        def label_run(variant: str, path: Path | None, source: Path, count: int, workers: int) -> dict:
            out = scratch / f"out-{variant}-{workers}.csv"
            wall, cpu = run(["label", str(source), "--id-column", "id", "--out", str(out), "--quiet",
                             "--workers", str(workers)], path)
            return {"reports": count, "workers": workers, "wall_s": wall, "cpu_s": cpu, "reports_per_s": count / wall}

        print(f"\nmedclip label end to end, start-up included ({n_small} reports, one worker)")
        labelling = {variant: label_run(variant, path, corpus, n_small, 1) for variant, path in variants.items()}
        for variant, row in labelling.items():
            print(f"  {variant:<7} {row['wall_s']:7.2f} s  {row['reports_per_s']:8.0f} reports/s  "
                  f"(CPU {row['cpu_s']:.1f} s)")
        results["label_one_worker"] = labelling

        print(f"\nmedclip label --workers 2 vs 1 ({n_big} reports)")
        scaling: dict = {}
        for variant, path in variants.items():
            one = label_run(variant, path, big, n_big, 1)
            two = label_run(variant, path, big, n_big, 2)
            scaling[variant] = {"workers_1": one, "workers_2": two, "speedup": one["wall_s"] / two["wall_s"]}
            print(f"  {variant:<7} 1 worker {one['reports_per_s']:7.0f}/s   2 workers {two['reports_per_s']:7.0f}/s"
                  f"   speed-up {scaling[variant]['speedup']:.2f}x   (CPU {one['cpu_s']:.1f} s vs "
                  f"{two['cpu_s']:.1f} s)")
        results["workers_scaling"] = scaling
        if "before" in variants:
            same = (scratch / "out-before-1.csv").read_bytes() == (scratch / "out-after-1.csv").read_bytes()
            results["outputs_identical_before_after"] = same
            print(f"\noutputs identical before/after: {same}")
    results["load_average_at_end"] = list(os.getloadavg())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
