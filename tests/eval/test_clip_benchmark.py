"""CLIP_benchmark both ways on a suite built from the bundled sample (must run in CI):
`python -m open_clip_medclip.benchmark eval` (our front door) and plain `clip_benchmark eval` (the host's own CLI,
with the opt-in autoload), each with CLIP_benchmark's default 4 workers, agreeing with `medclip eval zeroshot
--ensemble embed` on the same checkpoint; the suite's prompts are used, no NaN in the results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from open_clip_medclip import benchmark
from open_clip_medclip.eval import cli as eval_cli
from open_clip_medclip.eval.embed import embed_texts
from open_clip_medclip.eval.suites.definitions import suite_prompts
from open_clip_medclip.eval.suites.export import CUSTOM_TEMPLATES_JSON, TEMPLATES_TXT
from open_clip_medclip.eval.suites.load import load_suite

REPO = Path(__file__).resolve().parents[2]


def strict_json(path: Path) -> dict:
    """JSON as a strict parser reads it: NaN/Infinity are an error (CLIP_benchmark used to write acc5: NaN)."""
    def reject(constant):
        raise AssertionError(f"{path}: {constant} in the results")

    return json.loads(Path(path).read_text(), parse_constant=reject)


def harness_embed(suite: Path, checkpoint: Path, out: Path) -> dict:
    """`medclip eval zeroshot --ensemble embed` on the same checkpoint (no bootstrap)."""
    code = eval_cli.main(["zeroshot", "--model", "medclip-tiny", "--pretrained", str(checkpoint), "--suite", str(suite),
                          "--ensemble", "embed", "--bootstrap", "0", "--no-plots", "--quiet", "--device", "cpu",
                          "--out", str(out)])
    assert code == 0
    return json.loads((out / load_suite(suite).name / "zeroshot.json").read_text())


def assert_same_auroc(ours: dict, theirs: dict) -> None:
    """CLIP_benchmark's AUROC entries equal `medclip eval zeroshot`'s AUCs to 1e-6 (same checkpoint and suite)."""
    assert abs(theirs["auroc_macro"] - ours["macro_auc"]["value"]) < 1e-6
    assert abs(theirs["auroc"] - ours["auc"]["value"]) < 1e-6
    assert set(theirs["auroc_per_class"]) == set(ours["per_class"])
    for cls, value in theirs["auroc_per_class"].items():
        assert abs(value - ours["per_class"][cls]["auc"]["value"]) < 1e-6
    assert 0.0 < theirs["auroc_macro"] < 1.0


def test_plugin_registers_the_model_type():
    import clip_benchmark.models as cb_models
    from open_clip_medclip.plugins import clip_benchmark as glue

    cb_cli = glue.register()
    assert "medclip" in cb_cli.MODEL_TYPES and cb_cli.MODEL_TYPES is cb_models.MODEL_TYPES
    glue.register()
    assert cb_cli.MODEL_TYPES.count("medclip") == 1


def test_built_suite_ships_prompts_where_clip_benchmark_reads_them(tiny_suite, tmp_path):
    wds = tiny_suite / "wds"
    assert int((wds / "test/nshards.txt").read_text()) >= benchmark.CLIP_BENCHMARK_DEFAULT_WORKERS
    prompts = json.loads((wds / CUSTOM_TEMPLATES_JSON).read_text())["wds/nih-tiny"]
    assert prompts == suite_prompts(load_suite(tiny_suite).definition)
    # class-specific prompts have no txt form: no `{c}` file that would silently prompt with bare class names
    assert not (wds / TEMPLATES_TXT).exists()
    # a CSV suite prompts with class names: exactly CLIP_benchmark's `{c}` template
    first, second = sorted((tiny_suite / "images").iterdir())[:2]
    (tmp_path / "suite.csv").write_text(f"image,label\n{first},a\n{second},b\n")
    eval_cli.main(["build-suite", str(tmp_path / "suite.csv"), "--out", str(tmp_path / "built"), "--quiet"])
    assert (tmp_path / "built/wds" / TEMPLATES_TXT).read_text() == "{c}\n"


def test_workers_are_capped_at_the_shard_count(tmp_path, capsys):
    (tmp_path / "test").mkdir()
    (tmp_path / "test/nshards.txt").write_text("1\n")
    argv = benchmark.prepare_argv(["eval", "--dataset", "wds/x", "--dataset_root", str(tmp_path)])
    assert argv[argv.index("--model_type") + 1] == "medclip"
    assert argv[argv.index("--num_workers") + 1] == "1"  # CLIP_benchmark's default 4 would stop the run
    assert "--num_workers 4 -> 1" in capsys.readouterr().err
    argv = benchmark.prepare_argv(["eval", "--dataset", "wds/x", "--dataset_root", str(tmp_path), "--num_workers", "0"])
    assert argv.count("--num_workers") == 1 and argv[argv.index("--num_workers") + 1] == "0"


def test_front_door_default_workers_agrees_with_the_harness(tiny_suite, prompt_sensitive_checkpoint, tmp_path):
    out, clf = tmp_path / "cb.json", tmp_path / "clf.pt"
    code = benchmark.main(["eval", "--model", "medclip-tiny", "--pretrained", str(prompt_sensitive_checkpoint),
                           "--dataset", "wds/nih-tiny", "--dataset_root", str(tiny_suite / "wds"), "--no_amp",
                           "--device", "cpu", "--batch_size", "8", "--output", str(out), "--dump_templates",
                           "--save_clf", str(clf), "--quiet"])
    assert code == 0
    result = strict_json(out)
    assert result["templates"] == suite_prompts(load_suite(tiny_suite).definition)
    # acc5 is undefined with 2 classes; AUROC is added by our hook
    assert set(result["metrics"]) == {"acc1", "mean_per_class_recall", "auroc", "auroc_macro", "auroc_per_class"}
    ours = harness_embed(tiny_suite, prompt_sensitive_checkpoint, tmp_path / "harness")
    assert ours["accuracy"]["value"] == pytest.approx(result["metrics"]["acc1"])
    assert ours["balanced_accuracy"]["value"] == pytest.approx(result["metrics"]["mean_per_class_recall"])
    assert_same_auroc(ours, result["metrics"])
    # the same class embeddings as our `embed` ensemble (mean of normalised prompt embeddings, renormalised)
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms("medclip-tiny", pretrained=str(prompt_sensitive_checkpoint))
    tokenizer = open_clip.get_tokenizer("medclip-tiny")
    theirs = torch.load(clf, map_location="cpu").numpy()
    for c, name in enumerate(["No Finding", "Pneumonia"]):
        mean = embed_texts(model.eval(), tokenizer, result["templates"][name]).mean(0)
        assert np.allclose(theirs[:, c], mean / np.linalg.norm(mean), atol=1e-5)


def test_front_door_device_and_model_faults_are_one_line(tiny_suite, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    common = ["eval", "--dataset", "wds/nih-tiny", "--dataset_root", str(tiny_suite / "wds"), "--output",
              str(tmp_path / "x.json")]
    assert benchmark.main([*common, "--model", "medclip-tiny", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == (f"{benchmark.PROG}: --device cuda: this machine has no CUDA device; "
                                               "use --device cpu")
    assert benchmark.main([*common, "--model", "medclip-tinyy", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{benchmark.PROG}: unknown model 'medclip-tinyy' (did you mean: medclip-tiny")
    assert not any("Traceback" in line for line in err) and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_plain_clip_benchmark_cli_reads_the_suite_prompts(tiny_suite, prompt_sensitive_checkpoint, tmp_path):
    """The host's own `clip_benchmark eval` (subprocess, default 4 workers), MedCLIP found through the opt-in
    autoload installed into a throw-away site folder."""
    from open_clip_medclip.autoload import install_autoload

    site, boot = tmp_path / "site", tmp_path / "boot"
    install_autoload(str(site))
    boot.mkdir()
    (boot / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({str(site)!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(boot), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = tmp_path / "plain.json"
    executable = Path(sys.executable).parent / "clip_benchmark"
    proc = subprocess.run([str(executable), "eval", "--model_type", "open_clip", "--model", "medclip-tiny",
                           "--pretrained", str(prompt_sensitive_checkpoint), "--dataset", "wds/nih-tiny",
                           "--dataset_root", str(tiny_suite / "wds"), "--no_amp", "--batch_size", "8",
                           "--output", str(out), "--dump_templates"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using the suite's class-specific prompts" in proc.stderr
    result = strict_json(out)
    assert result["templates"] == suite_prompts(load_suite(tiny_suite).definition)
    ours = harness_embed(tiny_suite, prompt_sensitive_checkpoint, tmp_path / "harness")
    assert ours["accuracy"]["value"] == pytest.approx(result["metrics"]["acc1"])
    assert ours["balanced_accuracy"]["value"] == pytest.approx(result["metrics"]["mean_per_class_recall"])
    assert_same_auroc(ours, result["metrics"])
