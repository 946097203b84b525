"""`medclip predict --classifier FILE` and `predict(classifier, images)`: a classifier saved by `medclip eval finetune`
predicts through the zero-shot predict code (decoding, rejects, exit codes, provenance, exact heatmaps).

The classifier is trained here with `medclip eval finetune` (medclip-tiny from a fixed checkpoint, 1 epoch on the
tiny NIH suite); the inputs are the bundled real images."""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import open_clip_medclip as mc
from open_clip_medclip import predict_cli
from open_clip_medclip.cli import main as medclip_main
from open_clip_medclip.errors import UserError
from open_clip_medclip.eval.classifier import load_classifier
from open_clip_medclip.eval.finetune import CLASSIFIER_FILE
from open_clip_medclip.eval.suites.build import load_image
from open_clip_medclip.heatmaps import HeatmapUnsupported
from open_clip_medclip.zero_shot import activate

SAMPLE = Path(__file__).resolve().parents[2] / "open_clip_medclip" / "sample_data"
NIH = sorted((SAMPLE / "nih_cxr14" / "images").glob("*.jpg"))[:6]
DICOM = next((SAMPLE / "odd_inputs").glob("*.dcm"))
BATCH = 4


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory, tiny_suite, tiny_checkpoint) -> Path:
    from open_clip_medclip.eval.cli import main

    out = tmp_path_factory.mktemp("finetune")
    assert main(["finetune", "--model", "medclip-tiny", "--pretrained", str(tiny_checkpoint), "--suite",
                 str(tiny_suite), "--init", "checkpoint", "--epochs", "1", "--batch-size", "4", "--bootstrap", "20",
                 "--out", str(out), "--quiet", "--no-plots"]) == 0
    return out / "nih-tiny" / "finetune_runs" / "checkpoint-seed0" / CLASSIFIER_FILE


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A folder of real images (JPEG + DICOM) and one empty file, which is rejected."""
    folder = tmp_path_factory.mktemp("xrays")
    kept = []
    for source in [*NIH, DICOM]:
        target = folder / source.name
        target.write_bytes(source.read_bytes())
        kept.append(target)
    (folder / "zz_empty.png").write_bytes(b"")
    return folder, sorted(kept)


def documented_logits(classifier, paths: list[Path]) -> np.ndarray:
    """The README's call: preprocess each decoded image, stack, call the module (in batches of BATCH)."""
    batches = []
    with torch.no_grad():
        for start in range(0, len(paths), BATCH):
            images = torch.stack([classifier.preprocess(load_image(p)) for p in paths[start:start + BATCH]])
            batches.append(classifier(images).numpy())
    return np.concatenate(batches)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_reproduces_the_loaded_classifier(classifier_file, inputs, tiny_checkpoint, tmp_path, caplog):
    folder, paths = inputs
    out = tmp_path / "pred.csv"
    code = predict_cli.main([str(folder), "--classifier", str(classifier_file), "--out", str(out), "--quiet",
                             "--batch-size", str(BATCH), "--device", "cpu"])
    assert code == predict_cli.REJECTED_EXIT_CODE  # the empty file, listed; the rest predicted
    assert [r["reason"] for r in read_rows(predict_cli.rejects_path(out))] == ["zero_byte_image"]

    classifier = load_classifier(classifier_file)
    rows = read_rows(out)
    assert [Path(r["path"]).name for r in rows] == [p.name for p in paths]
    assert list(rows[0]) == ["path", *classifier.class_names, "top_class"]
    logits = documented_logits(classifier, paths)
    written = np.array([[float(r[c]) for c in classifier.class_names] for r in rows])
    assert np.array_equal(written, activate(logits, classifier.activation))  # same logits, bit for bit
    with torch.no_grad():
        probabilities = torch.cat([classifier.probabilities(torch.stack([classifier.preprocess(load_image(p))
                                                                         for p in paths[i:i + BATCH]]))
                                   for i in range(0, len(paths), BATCH)]).numpy()
    np.testing.assert_allclose(written, probabilities, atol=1e-6)
    assert [r["top_class"] for r in rows] == [classifier.class_names[i] for i in probabilities.argmax(1)]

    provenance = json.loads(out.with_suffix(".json").read_text())
    record = provenance["classifier"]
    assert record["classifier"] == "fine-tuned" and record["file"] == str(classifier_file)
    assert record["sha256"] == hashlib.sha256(classifier_file.read_bytes()).hexdigest()
    training = record["training"]
    assert training["suite"] == "nih-tiny" and training["init"] == "checkpoint" and training["seed"] == 0
    assert training["checkpoint_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert training["selected_epoch"] == 1 and training["options"]["epochs"] == 1
    assert provenance["model"] == "medclip-tiny" and provenance["num_rejected"] == 1

    # The Python API: the loaded classifier is its own model and preprocessing.
    result = mc.predict(classifier, [str(folder)], batch_size=BATCH)
    assert np.array_equal(result.logits, logits) and [Path(r["image"]).name for r in result.rejected] == ["zz_empty.png"]

    # Loading a classifier file does not log OpenCLIP's "initialized randomly" warning (creating the tower does).
    import open_clip

    with caplog.at_level(logging.WARNING):
        load_classifier(classifier_file)
        assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
        open_clip.create_model("medclip-tiny")
        assert [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


@pytest.mark.parametrize("extra", [["--model", "medclip-tiny"], ["--pretrained", "ckpt.pt"], ["--classes", "a", "b"],
                                   ["--prompts", "chexpert"], ["--findings", "Edema"], ["--ensemble", "embed"]])
def test_conflicting_options_are_a_one_line_error(extra, classifier_file, tmp_path, capsys):
    argv = [str(NIH[0]), "--classifier", str(classifier_file), "--out", str(tmp_path / "p.csv"), *extra]
    with pytest.raises(UserError) as caught:
        predict_cli.main(argv)
    message = str(caught.value)
    assert "\n" not in message and extra[0] in message and "come from the file" in message
    assert medclip_main(["predict", *argv]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "p.csv").exists()


def test_missing_classifier_file_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="nope.safetensors: no such classifier file"):
        predict_cli.main([str(NIH[0]), "--classifier", str(tmp_path / "nope.safetensors"), "--out",
                          str(tmp_path / "p.csv")])


def test_heatmaps_add_up_to_the_fine_tuned_logits(classifier_file, inputs, tmp_path):
    folder, paths = inputs
    out, maps = tmp_path / "pred.csv", tmp_path / "maps"
    code = predict_cli.main([*map(str, paths[:3]), "--classifier", str(classifier_file), "--out", str(out),
                             "--heatmaps", str(maps), "--quiet", "--device", "cpu"])
    assert code == 0
    classifier = load_classifier(classifier_file)
    logits = documented_logits(classifier, paths[:3])
    arrays = sorted(maps.glob("*.npz"))
    assert len(arrays) == 3 and len(list(maps.glob("*.png"))) == 3 * len(classifier.class_names)
    for array, expected in zip(arrays, logits):
        saved = np.load(array)
        assert list(saved["classes"]) == classifier.class_names
        np.testing.assert_allclose(saved["shares"].mean(axis=(1, 2)), expected, atol=1e-5)
        np.testing.assert_allclose(saved["logits"], expected, atol=1e-6)
        assert saved["shares"].std() > 0  # locations differ: a map, not a constant

    # The linear probe's head reads L2-normalised embeddings: its shares add up too.
    batch = torch.stack([classifier.preprocess(load_image(p)) for p in paths[:3]])
    classifier.normalize_features = True
    torch.testing.assert_close(classifier.heatmaps(batch).mean(dim=(2, 3)), classifier.logits(batch),
                               atol=1e-5, rtol=0)


def test_heatmaps_refuse_a_fine_tuned_tower_whose_head_is_not_linear(classifier_file, tmp_path):
    classifier = load_classifier(classifier_file)
    batch = classifier.preprocess(load_image(NIH[0]))[None]
    mlp = copy.deepcopy(classifier)
    width = mlp.tower.head.proj.in_features
    mlp.tower.head = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), mlp.tower.head.proj)
    with pytest.raises(HeatmapUnsupported) as caught:
        mlp.heatmaps(batch)
    assert "\n" not in str(caught.value) and "not one linear projection" in str(caught.value)
