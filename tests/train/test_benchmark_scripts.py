"""The benchmark scripts run (tiny CPU settings): they must keep working for the GPU session that uses them."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_throughput_script_runs_a_tiny_cpu_step(capsys):
    script = _load("gpu_train_throughput")
    assert script.main(["--model", "medclip-tiny", "--device", "cpu", "--precision", "fp32", "--batch-size", "2",
                        "--steps", "1", "--warmup-steps", "1", "--profile", "1"]) == 0
    out = capsys.readouterr().out
    result = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert result["samples_per_s"] > 0 and result["model_tflop_per_step"] > 0 and result["mfu"] is None
    assert result["profiled_step_ms"] > 0 and "Self CPU time total" in out  # the profile table was printed


def test_loss_benchmark_runs(capsys):
    assert _load("bench_loss").main(["--batch-sizes", "16", "--dim", "8", "--repeats", "1",
                                     "--kernels", "auto", "rows"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["ratio_auto"] > 0 and row["ratio_rows"] > 0
