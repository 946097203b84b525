"""Test-suite wall time: one pytest process (as CI ran it before) vs pytest-xdist workers (as tests/run.sh runs it).

    python tests/benchmarks/bench_suite.py [--workers 2] [--omp-threads 1] [--machine "..."] [-- PYTEST ARGS]

Both runs use the current venv and the same selection (the whole suite by default, slow tests included), one after
the other in this run: serial = `pytest -m "not slow"` then `pytest -m slow` (tests/run.sh until this change),
parallel = `pytest -n WORKERS --dist worksteal` with OMP_NUM_THREADS=OMP_THREADS (tests/run.sh now). Prints wall and
CPU seconds, test counts and the ratio; writes results/bench_suite.json. Needs the reference environment (.ci/ref)
that tests/run.sh installs, or the parity tests skip on both sides. Install time is not included (the same for both).
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchresults import add_output_arguments, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected)")


def pytest_run(args: list[str], env: dict[str, str]) -> dict:
    """Wall s, CPU s (this pytest and its children) and the summary counts of `python -m pytest ARGS`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
                            env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in SUMMARY.findall(last)}
    if result.returncode not in (0, 5):
        sys.exit(f"bench_suite: pytest {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}")
    return {"args": args, "wall_s": round(wall, 1), "cpu_s": round(after.ru_utime + after.ru_stime
                                                                     - before.ru_utime - before.ru_stime, 1),
            "counts": counts, "summary": last}


def add_up(runs: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for run in runs:
        for kind, n in run["counts"].items():
            if kind != "deselected":
                counts[kind] = counts.get(kind, 0) + n
    return {"wall_s": round(sum(r["wall_s"] for r in runs), 1), "cpu_s": round(sum(r["cpu_s"] for r in runs), 1),
            "counts": counts, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="2", help="pytest-xdist workers for the parallel run (default 2)")
    parser.add_argument("--omp-threads", default="1",
                        help="OMP_NUM_THREADS for the parallel run, as tests/run.sh sets it (default 1; the serial run "
                             "keeps this environment's setting)")
    add_output_arguments(parser, "bench_suite")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print(f"bench_suite: serial (default suite, then slow), then {args.workers} xdist workers; this takes a while",
          flush=True)
    serial = add_up([pytest_run(["-m", "not slow", *extra], env), pytest_run(["-m", "slow", *extra], env)])
    print(f"serial:   {serial['wall_s']:.0f} s wall, {serial['cpu_s']:.0f} s CPU, {serial['counts']}", flush=True)
    parallel = add_up([pytest_run(["-n", args.workers, "--dist", "worksteal", *extra],
                                  {**env, "OMP_NUM_THREADS": args.omp_threads})])
    print(f"parallel: {parallel['wall_s']:.0f} s wall, {parallel['cpu_s']:.0f} s CPU, {parallel['counts']}")
    if serial["counts"] != parallel["counts"]:
        sys.exit(f"bench_suite: the two runs selected different tests: {serial['counts']} vs {parallel['counts']}")
    ratio = parallel["wall_s"] / serial["wall_s"]
    print(f"parallel / serial wall time: {ratio:.2f}x")
    write_results(args, {"benchmark": "bench_suite", "workers": args.workers, "parallel_omp_threads": args.omp_threads,
                         "serial_omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "pytest_args": extra,
                         "serial": serial, "parallel": parallel, "parallel_over_serial_wall": round(ratio, 3)}, argv, __file__)


if __name__ == "__main__":
    main()
