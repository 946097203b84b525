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
                        "--steps", "1", "--warmup-steps", "1", "--profile", "1", "--iu-reports", "30",
                        "--distinct-batches", "2", "--padding-free", "both"]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    result, free, ratio = lines[0], lines[1], lines[2]
    assert result["samples_per_s"] > 0 and result["model_tflop_per_step"] > 0 and result["mfu"] is None
    # --padding-free both: the same model timed padded, then padding-free (fewer FLOPs), and the ratio printed
    assert (result["padding_free"], free["padding_free"]) == (False, True)
    assert 0 < free["model_flop_per_step"] < result["model_flop_per_step"]
    assert ratio["padding_free_over_padded_samples_per_s"] > 0 and "padding-free text tower, soft loss" in out
    # real IU sentences, trimmed per batch (a multiple of 8, far below OpenCLIP's 77), SDPA in the text tower
    assert len(result["widths"]) == 2 and all(w % 8 == 0 and w < 77 for w in result["widths"])
    assert result["text_attention"] == "sdpa"
    assert result["profiled_step_ms"] > 0 and "Self CPU time total" in out  # the profile table was printed


def test_loss_benchmark_runs(capsys):
    assert _load("bench_loss").main(["--batch-sizes", "16", "--dim", "8", "--repeats", "1", "--labels", "random",
                                     "--kernels", "auto", "rows", "--no-out"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["soft_auto/auto_time_ratio"] > 0 and row["soft_rows/dense_time_ratio"] > 0
    assert row["soft_auto/auto_used"] == "dense"  # random labels: every row distinct, no groups to use


def test_loss_benchmark_on_iu_labels_with_simulated_local_loss(tmp_path, capsys):
    out = tmp_path / "loss.json"
    assert _load("bench_loss").main(["--batch-sizes", "32", "--dim", "8", "--repeats", "1", "--iu-reports", "40",
                                     "--local-loss-batch", "128", "--world-size", "4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]["rows"]
    local = rows[-1]
    assert local["local_loss"] and local["rows_per_rank"] == 32 and local["world_size"] == 4
    assert local["soft_auto/auto_used"] == "grouped" and local["soft_auto/dense_used"] == "dense"
    assert local["clip_peak_mib"] > 0 and local["soft_auto/auto_memory_ratio"] > 0
    assert "simulated ranks" in capsys.readouterr().out


def test_suite_benchmark_runs_both_ways_and_compares_the_same_tests(tmp_path, capsys):
    out = tmp_path / "suite.json"
    _load("bench_suite").main(["--out", str(out), "--", "tests/sources/test_registry.py"])
    results = json.loads(out.read_text())["results"]
    assert results["serial"]["counts"] == results["parallel"]["counts"] and results["serial"]["counts"]["passed"] > 5
    assert len(results["serial"]["runs"]) == 2 and results["parallel"]["runs"][0]["args"][:2] == ["-n", "2"]
    assert results["parallel_over_serial_wall"] > 0 and "parallel / serial wall time" in capsys.readouterr().out


def test_text_tower_benchmark_times_three_layouts_with_equal_features(tmp_path, capsys):
    out = tmp_path / "tower.json"
    assert _load("bench_text_tower").main(["--model", "medclip-tiny", "--batch-size", "4", "--batches", "1",
                                           "--repeats", "1", "--iu-reports", "30", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results["time_ratio_over_padded"]) == {"trimmed", "padding_free"}
    assert results["max_feature_difference"] <= 1e-5 and results["mean_width_trimmed"] % 8 == 0
    assert "padding-free" in capsys.readouterr().out
