"""CLIP_benchmark integration: our `medclip` model type runs CLIP_benchmark on a built suite (must run in CI)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from open_clip_medclip import benchmark
from open_clip_medclip.eval.embed import embed_texts
from open_clip_medclip.eval.zeroshot import run_zeroshot


def test_plugin_registers_the_model_type():
    from open_clip_medclip.plugins import clip_benchmark as glue

    assert "medclip" in glue.cb_models.MODEL_TYPES and glue.cb_cli.MODEL_TYPES is glue.cb_models.MODEL_TYPES
    glue.register()
    assert glue.cb_models.MODEL_TYPES.count("medclip") == 1


def test_prepare_argv_adds_type_and_suite_templates(tiny_suite):
    argv = benchmark.prepare_argv(["eval", "--dataset", "wds/nih-tiny", "--dataset_root", str(tiny_suite / "wds")])
    assert argv[argv.index("--model_type") + 1] == "medclip"
    assert argv[argv.index("--custom_template_file") + 1].endswith("custom_templates.json")


def test_clip_benchmark_runs_on_a_tiny_suite_and_agrees_with_the_harness(tiny_suite, tiny_checkpoint, tiny_model,
                                                                         tmp_path):
    out, clf = tmp_path / "cb.json", tmp_path / "clf.pt"
    benchmark.main(["eval", "--save_clf", str(clf), "--model", "medclip-tiny", "--pretrained", str(tiny_checkpoint), "--dataset",
                    "wds/nih-tiny", "--dataset_root", str(tiny_suite / "wds"), "--no_amp", "--num_workers", "0",
                    "--batch_size", "8", "--output", str(out), "--dump_templates", "--quiet"])
    result = json.loads(out.read_text())
    assert result["model"] == "medclip-tiny" and set(result["templates"]) == {"No Finding", "Pneumonia"}
    metrics = result["metrics"]
    assert 0.0 <= metrics["acc1"] <= 1.0 and np.isnan(metrics["acc5"])  # fewer than 5 classes
    model, preprocess, tokenizer = tiny_model
    # Same class embeddings as our `embed` ensemble (mean of normalised prompt embeddings, renormalised).
    theirs = torch.load(clf, map_location="cpu").numpy()
    for c, name in enumerate(["No Finding", "Pneumonia"]):
        mean = embed_texts(model, tokenizer, result["templates"][name]).mean(0)
        assert np.allclose(theirs[:, c], mean / np.linalg.norm(mean), atol=1e-5)
    ours = run_zeroshot(model, tiny_suite, tokenizer, preprocess, ensemble="embed", num_resamples=0, progress=False,
                        prompts=result["templates"])
    assert ours.metrics["accuracy"]["value"] == pytest.approx(metrics["acc1"])
    assert ours.metrics["balanced_accuracy"]["value"] == pytest.approx(metrics["mean_per_class_recall"])
