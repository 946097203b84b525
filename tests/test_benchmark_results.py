"""The README's numbers stay traceable: committed benchmark results name their machine and are documented with the
command that made them; benchmarks use no absolute machine paths; the provenance writer records what it promises."""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "tests" / "benchmarks"
RESULTS = BENCHMARKS / "results"
CITED = re.compile(r"tests/benchmarks/results/[\w.*-]+\.json")


def _documented_patterns() -> list[str]:
    text = (BENCHMARKS / "README.md").read_text(encoding="utf-8")
    return [name.split("/", 1)[1] for name in re.findall(r"`(results/[\w.*-]+\.json)`", text)]


def test_every_results_file_names_its_machine_and_is_documented_with_its_command():
    patterns = _documented_patterns()
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(record, dict) and record.get("machine"), f"{path}: no 'machine' entry"
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns), (
            f"{path}: not in tests/benchmarks/README.md's table (add a row: script, command, README figures)")


def test_results_files_cited_in_the_readme_exist():
    for cited in CITED.findall((REPO / "README.md").read_text(encoding="utf-8")):
        assert (REPO / cited).is_file(), f"README.md cites {cited}, which is not committed"


def test_benchmarks_use_no_absolute_machine_paths():
    machine_path = re.compile(r"""["'](?:/work|/home|/Users|/mnt|/data)/""")
    for path in sorted([*BENCHMARKS.glob("*.py"), *BENCHMARKS.glob("*.sh")]):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not machine_path.search(line), f"{path}:{number}: absolute machine path: {line.strip()}"


def test_results_writer_records_command_machine_and_versions(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_eval", BENCHMARKS / "bench_eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "bench_eval.json"
    assert script.main(["--images", "40", "--resamples", "5", "--out", str(out), "--machine", "test box"]) == 0
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["command"] == (f"python tests/benchmarks/bench_eval.py --images 40 --resamples 5 --out {out} "
                                 "--machine 'test box'")
    assert record["script"] == "tests/benchmarks/bench_eval.py"
    assert record["machine"]["description"] == "test box" and record["machine"]["usable_cpus"] >= 1
    assert record["libraries"]["numpy"] and record["date"]
    assert record["results"]["resamples"] == 5 and record["results"]["speed_up"] > 0
    assert script.main(["--images", "40", "--resamples", "5", "--out", str(tmp_path / "no.json"), "--no-out"]) == 0
    assert not (tmp_path / "no.json").exists()
