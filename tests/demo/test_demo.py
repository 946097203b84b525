"""`medclip demo` end to end on the bundled sample, with a tiny budget (the full run is README command 1)."""
from __future__ import annotations

import json

import open_clip
import pytest

import open_clip_medclip  # noqa: F401
from open_clip_medclip.demo import main as demo_main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_loadable_checkpoints(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_main(["--out", str(out), "--model", "medclip-tiny", "--epochs", "1", "--samples-per-epoch", "64",
                      "--batch-size", "16", "--bootstrap", "20", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| held-out suite | loss | ACC [95% CI] | AUC [95% CI] | n |" in printed
    summary = json.loads((out / "demo_results.json").read_text())
    assert set(summary["results"]) == {"nih-pneumonia", "pediatric-pneumonia"}
    for suite, by_loss in summary["results"].items():
        assert set(by_loss) == {"soft", "clip"}
        assert by_loss["soft"]["num_images"] == (60 if suite == "nih-pneumonia" else 200)  # held-out images only
        assert all(0.0 <= r["auc"]["value"] <= 1.0 for r in by_loss.values())
    for checkpoint in summary["checkpoints"].values():
        model, _, _ = open_clip.create_model_and_transforms("medclip-tiny", pretrained=checkpoint)
        assert type(model).__name__ == "CustomTextCLIP"
    # a rerun reuses every finished step
    assert demo_main(["--out", str(out), "--model", "medclip-tiny", "--epochs", "1", "--samples-per-epoch", "64",
                      "--batch-size", "16", "--bootstrap", "20", "--workers", "0"]) == 0
    assert "reusing" in capsys.readouterr().out
