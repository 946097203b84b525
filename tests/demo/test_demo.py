"""`medclip demo --full-towers` (the paper's setting) end to end on the bundled sample with a tiny budget (the frozen-tower
default: test_frozen.py; the full run is README command 1):
paired table and verdict, every held-out image, loadable checkpoints, and reproducibility (same seed, same
machine -> a byte-identical results JSON)."""
from __future__ import annotations

import json
import shutil

import open_clip
import pytest

import open_clip_medclip  # noqa: F401
from open_clip_medclip.demo import RESULTS_FILE
from open_clip_medclip.demo import main as demo_main
from open_clip_medclip.demo_results import comparison_table

TINY = ["--model", "medclip-tiny", "--full-towers", "--seeds", "2", "--epochs", "1", "--samples-per-epoch", "32",
        "--batch-size", "16", "--bootstrap", "30"]


@pytest.mark.slow
def test_demo_end_to_end_is_reproducible_and_reuses_finished_steps(tmp_path, capsys):
    first = tmp_path / "first"
    assert demo_main(["--out", str(first), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "difference semantic matching − InfoNCE [95% CI]" in printed and "Verdict from the paired 95% CIs" in printed
    summary = json.loads((first / RESULTS_FILE).read_text())
    assert set(summary["suites"]) >= {"nih-pneumonia", "pediatric-pneumonia"}
    assert summary["suites"]["nih-pneumonia"]["num_images"] == 60  # every held-out image of the sample
    assert summary["suites"]["pediatric-pneumonia"]["num_images"] == 200
    for result in summary["suites"].values():
        assert result["num_seeds"] == 2 and result["verdict"] in ("soft", "clip", "tie")
        low, high = result["difference"]["ci95"]
        assert (result["verdict"] == "tie") == (low <= 0 <= high)
    findings = summary["suites"].get("nih-findings", {}).get("findings", {})
    assert all(n >= 5 for n in findings.values()) and "No Finding" not in findings
    env = summary["environment"]
    assert env["device"] == "cpu" and env["versions"]["torch"] and env["code_revision"]
    assert "NaN" not in (first / RESULTS_FILE).read_text()
    assert summary["table"] == comparison_table(summary["suites"], ["soft", "clip"])
    assert len(summary["checkpoints"]) == 4
    model, _, _ = open_clip.create_model_and_transforms("medclip-tiny",
                                                        pretrained=str(first / summary["checkpoints"]["soft/seed0"]))
    assert type(model).__name__ == "CustomTextCLIP"

    # same seeds, same machine, a fresh work folder (labels, shards and suites copied to save time): same bytes
    second = tmp_path / "second"
    second.mkdir()
    for folder in ("labels", "shards", "suites"):
        shutil.copytree(first / folder, second / folder)
    assert demo_main(["--out", str(second), *TINY, "--no-plots"]) == 0
    a, b = json.loads((first / RESULTS_FILE).read_text()), json.loads((second / RESULTS_FILE).read_text())
    assert a.pop("plots") and b.pop("plots") == []
    assert json.dumps(a) == json.dumps(b)

    # a rerun reuses every finished run and writes the same results
    before = (first / RESULTS_FILE).read_bytes()
    capsys.readouterr()
    assert demo_main(["--out", str(first), *TINY]) == 0
    assert "reusing" in capsys.readouterr().out
    assert (first / RESULTS_FILE).read_bytes() == before


def test_demo_rejects_bad_flags():
    with pytest.raises(SystemExit, match="--seeds must be at least 1"):
        demo_main(["--seeds", "0"])
    with pytest.raises(SystemExit, match="two different losses"):
        demo_main(["--losses", "soft", "soft"])
    with pytest.raises(SystemExit, match="--nih-share"):
        demo_main(["--nih-share", "1"])
    with pytest.raises(SystemExit, match="--views"):
        demo_main(["--views", "0"])
    with pytest.raises(SystemExit, match="temperatures above 0"):
        demo_main(["--temperature-candidates", "0.5,0"])
    with pytest.raises(SystemExit, match="--validation-fraction"):
        demo_main(["--validation-fraction", "1"])
