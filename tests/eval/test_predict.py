"""Using the model on your own X-rays: the zero-shot API, `medclip predict` and exact heatmaps.

Real bundled images (NIH CXR14 sample, the bundled DICOM); `medclip-tiny` with fixed random weights, `medclip-demo`
for the EfficientNet tower. One scoring path: `medclip eval zeroshot`, the API and `medclip predict` give the same
per-image scores to 1e-6."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import open_clip_medclip as mc
from open_clip_medclip import predict_cli
from open_clip_medclip.eval.embed import embed_images, embed_texts
from open_clip_medclip.eval.metrics import softmax
from open_clip_medclip.eval.options import EvalOptions
from open_clip_medclip.eval.suites.build import load_image
from open_clip_medclip.eval.suites.load import load_suite
from open_clip_medclip.eval.zeroshot import auroc_summary, classification_metrics, pair_probabilities, run_zeroshot
from open_clip_medclip.heatmaps import HeatmapUnsupported

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "open_clip_medclip" / "sample_data"
NIH = sorted((SAMPLE / "nih_cxr14" / "images").glob("*.jpg"))
DICOM = next((SAMPLE / "odd_inputs").glob("*.dcm"))
PROMPTS = {"No Finding": ["no acute cardiopulmonary abnormality", "the lungs are clear"],
           "Pneumonia": ["focal consolidation consistent with pneumonia", "right lower lobe pneumonia"]}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def demo_model():
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("medclip-demo")
    return model.eval(), preprocess, open_clip.get_tokenizer("medclip-demo")


def test_api_names_are_lazy_package_attributes():
    code = ("import sys, open_clip_medclip as m; assert 'torch' not in sys.modules; "
            "assert {'prompts', 'predict', 'ZeroShotClassifier', 'heatmap'} <= set(dir(m)); m.prompts; "
            "assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_prompts_by_name_mapping_and_pairs(tmp_path):
    chexpert = mc.prompts("chexpert", per_class=10)
    assert list(chexpert) == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert [len(v) for v in chexpert.values()] == [10, 10, 10, 10, 10]
    assert mc.prompts("chexpert", per_class=10) == chexpert  # seeded
    assert mc.prompts("covid", classes=["COVID"])["COVID"]
    assert mc.prompts("chexzero", classes=["Edema"]) == {"Edema": ["edema", "no edema"]}
    assert list(mc.prompts("chexzero")) == list(mc.CHEXPERT_FINDINGS)
    assert mc.prompts(PROMPTS, classes=["Pneumonia"]) == {"Pneumonia": PROMPTS["Pneumonia"]}
    (tmp_path / "mine.json").write_text(json.dumps(PROMPTS))
    assert mc.prompts(str(tmp_path / "mine.json")) == PROMPTS
    with pytest.raises(FileNotFoundError, match="chexzero"):
        mc.prompts("chexpertt")


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_api_on_real_images_and_additive_heatmaps(which, tiny_model, demo_model):
    model, preprocess, tokenizer = tiny_model if which == "tiny" else demo_model
    weights = mc.build_zero_shot_classifier(model, tokenizer, PROMPTS, ensemble="embed")
    assert weights.shape == (model.visual.head.proj.out_features, 2)  # (dim, classes) as open_clip's
    assert torch.allclose(weights.norm(dim=0), torch.ones(2), atol=1e-5)  # `embed`: unit columns as OpenCLIP's
    classifier = mc.ZeroShotClassifier.from_prompts(model, tokenizer, PROMPTS)
    result = mc.predict(model, NIH[:4], classifier, preprocess=preprocess, batch_size=3)
    assert result.items == [str(p) for p in NIH[:4]] and result.probabilities.shape == (4, 2)
    assert np.allclose(result.probabilities.sum(1), 1) and set(result.top_classes) <= set(PROMPTS)
    pictures = [Image.open(p) for p in NIH[:4]]
    assert np.allclose(mc.predict(model, pictures, classifier, preprocess=preprocess).logits, result.logits, atol=1e-5)
    batch = torch.stack([preprocess(load_image(p)) for p in NIH[:4]])
    for clf in (classifier, mc.ZeroShotClassifier.multilabel(model, tokenizer)):
        shares = clf.heatmaps(batch)
        assert shares.shape[:2] == (4, len(clf.classes)) and shares.shape[2] * shares.shape[3] > 1
        assert torch.allclose(shares.mean(dim=(2, 3)), clf.logits(batch), atol=1e-5, rtol=0)
        assert shares.std(dim=(2, 3)).min() > 0  # locations differ: a map, not a constant
    one = mc.heatmap(model, classifier, NIH[0], preprocess)
    assert np.allclose(one.mean(axis=(1, 2)), result.logits[0], atol=1e-5)
    assert np.allclose(mc.predict(model, NIH[:2], classifier).logits, result.logits[:2], atol=1e-6)  # default preprocess


def test_inference_runs_in_eval_mode_whatever_the_model_mode(tiny_model):
    model, preprocess, tokenizer = tiny_model
    reference = mc.predict(model, NIH[:2], mc.ZeroShotClassifier.from_prompts(model, tokenizer, PROMPTS),
                           preprocess=preprocess).logits
    model.train()  # as `create_model_and_transforms` may hand it over: dropout on
    try:
        classifier = mc.ZeroShotClassifier.from_prompts(model, tokenizer, PROMPTS)
        again = mc.predict(model, NIH[:2], classifier, preprocess=preprocess).logits
        shares = classifier.heatmaps(torch.stack([preprocess(load_image(p)) for p in NIH[:2]]))
        assert model.training  # the caller's mode is restored
    finally:
        model.eval()
    np.testing.assert_allclose(again, reference, atol=1e-6, rtol=0)
    np.testing.assert_allclose(shares.mean(dim=(2, 3)).numpy(), reference, atol=1e-5, rtol=0)


def test_text_side_costs_nothing_per_image(tiny_model, tiny_checkpoint, tmp_path, monkeypatch):
    from open_clip_medclip import zero_shot

    model, preprocess, tokenizer = tiny_model
    classifier = mc.ZeroShotClassifier.from_prompts(model, tokenizer, PROMPTS)
    calls = []
    monkeypatch.setattr(model, "encode_text", lambda *a, **k: calls.append(1))
    mc.predict(model, NIH[:6], classifier, preprocess=preprocess, batch_size=2)
    assert calls == []  # 3 batches, no text encoding
    monkeypatch.undo()
    built = []
    original = zero_shot.embed_texts
    monkeypatch.setattr(zero_shot, "embed_texts", lambda *a, **k: built.append(1) or original(*a, **k))
    folder = tmp_path / "six"
    folder.mkdir()
    for path in NIH[:6]:
        shutil.copy(path, folder / path.name)
    assert predict_cli.main([str(folder), "--model", "medclip-tiny", "--pretrained", str(tiny_checkpoint), "--quiet",
                             "--batch-size", "1", "--device", "cpu", "--out", str(tmp_path / "p.csv")]) == 0
    assert len(built) == 2  # the positive and the negative prompts, once per run, whatever the number of batches


def test_heatmaps_refuse_towers_where_pooling_and_projection_do_not_commute(tiny_model):
    import copy

    model, preprocess, tokenizer = tiny_model
    batch = preprocess(load_image(NIH[0]))[None]
    mlp = copy.deepcopy(model)
    width = mlp.visual.head.proj.in_features
    mlp.visual.head = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), mlp.visual.head.proj)
    classifier = mc.ZeroShotClassifier.from_prompts(mlp, tokenizer, PROMPTS)
    with pytest.raises(HeatmapUnsupported, match="not one linear projection, so pooling and projection do not commute"):
        classifier.heatmaps(batch)
    maxpool = copy.deepcopy(model)
    maxpool.visual.trunk.forward_head = lambda features: features.amax(dim=(2, 3))
    classifier = mc.ZeroShotClassifier.from_prompts(maxpool, tokenizer, PROMPTS)
    with pytest.raises(HeatmapUnsupported, match="does more than average-pool"):
        classifier.heatmaps(batch)


def test_one_scoring_path_eval_api_and_cli(tiny_model, tiny_suite, tiny_checkpoint, tmp_path):
    model, preprocess, tokenizer = tiny_model
    suite = load_suite(tiny_suite)
    zs = run_zeroshot(model, suite, tokenizer, preprocess,
                      options=EvalOptions(prompts=PROMPTS, ensemble="logit", bootstrap=0, progress=False, batch_size=8))
    paths = [e.image_path for e in zs.entries]
    api = mc.predict(model, paths, mc.ZeroShotClassifier.from_prompts(model, tokenizer, PROMPTS), preprocess=preprocess,
                     batch_size=8)
    np.testing.assert_allclose(api.logits, zs.scores, atol=1e-6, rtol=0)
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    (tmp_path / "list.txt").write_text("\n".join(str(p) for p in paths) + "\n")
    out = tmp_path / "pred.csv"
    code = predict_cli.main([str(tmp_path / "list.txt"), "--model", "medclip-tiny", "--pretrained", str(tiny_checkpoint),
                             "--prompts", str(tmp_path / "prompts.json"), "--batch-size", "8", "--out", str(out),
                             "--device", "cpu", "--quiet"])
    assert code == 0
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    cli = np.array([[float(r[c]) for c in suite.classes] for r in rows])
    np.testing.assert_allclose(cli, softmax(zs.scores), atol=1e-6, rtol=0)
    # multi-label: the default classifier's probabilities are eval's CheXzero pair probabilities
    features, _, _ = embed_images(model, preprocess, paths, batch_size=8, progress=False)
    pairs = mc.prompts("chexzero", classes=["Pneumonia", "Edema"])
    pos = embed_texts(model, tokenizer, [p for p, _ in pairs.values()])
    neg = embed_texts(model, tokenizer, [n for _, n in pairs.values()])
    multilabel = mc.predict(model, paths, mc.ZeroShotClassifier.multilabel(model, tokenizer, list(pairs)),
                            preprocess=preprocess, batch_size=8)
    np.testing.assert_allclose(multilabel.probabilities, pair_probabilities(features, pos, neg, model.logit_scale.exp().item()),
                               atol=1e-6, rtol=0)


def test_auroc_summary_rescales_clip_benchmark_logits_to_the_model_scale():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(60, 3))
    targets = rng.integers(0, 3, size=60)
    ours = classification_metrics(targets, scores, ["a", "b", "c"], 0)
    summary = auroc_summary(targets, scores * (100 / 14.3), ["a", "b", "c"], scale=14.3)
    assert abs(summary["auroc_macro"] - ours["macro_auc"]["value"]) < 1e-9 and "auroc" not in summary
    unscaled = auroc_summary(targets, scores * (100 / 14.3), ["a", "b", "c"], scale=100.0)
    assert abs(unscaled["auroc_macro"] - ours["macro_auc"]["value"]) > 1e-4  # the scale matters beyond 2 classes
    multi = auroc_summary(rng.integers(0, 2, size=(60, 3)), scores, ["a", "b", "c"], scale=1.0)
    assert set(multi["auroc_per_class"]) == {"a", "b", "c"}


def odd_folder(folder: Path) -> dict[str, Path]:
    """A good JPEG, a 16-bit PNG, a DICOM, and the bad ones: corrupt PNG, zero-byte file, text named .png."""
    folder.mkdir(parents=True)
    good = folder / "good.jpg"
    shutil.copy(NIH[0], good)
    gray = np.asarray(Image.open(NIH[1]).convert("L"), dtype=np.uint16) * 16 + 7  # 12-bit data in a 16-bit PNG
    sixteen = folder / "sub" / "sixteen.png"
    sixteen.parent.mkdir()
    Image.fromarray(gray).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    dicom = folder / "sub" / "scan.dcm"
    shutil.copy(DICOM, dicom)
    buffer = io.BytesIO()
    Image.open(NIH[2]).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64
    (folder / "corrupt.png").write_bytes(bytes(data))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file, not an image\n")
    return {"good": good, "sixteen": sixteen, "dicom": dicom}


def test_cli_names_rejects_and_predicts_the_rest(tiny_checkpoint, tmp_path, capsys):
    odd_folder(tmp_path / "in")
    out = tmp_path / "out" / "pred.csv"
    code = predict_cli.main([str(tmp_path / "in"), "--model", "medclip-tiny", "--pretrained", str(tiny_checkpoint),
                             "--findings", "Edema", "Pneumonia", "--out", str(out), "--device", "cpu", "--quiet",
                             "--heatmaps", str(tmp_path / "maps")])
    assert code == predict_cli.REJECTED_EXIT_CODE == 3
    rows = read_rows(out)
    assert sorted(Path(r["path"]).name for r in rows) == ["good.jpg", "scan.dcm", "sixteen.png"]
    assert list(rows[0]) == ["path", "Edema", "Pneumonia", "top_class"]
    assert all(0 < float(r["Edema"]) < 1 and r["top_class"] in ("Edema", "Pneumonia") for r in rows)
    rejects = {Path(r["path"]).name: r["reason"] for r in read_rows(predict_cli.rejects_path(out))}
    assert rejects == {"corrupt.png": "corrupt_image", "empty.png": "zero_byte_image", "notes.png": "corrupt_image"}
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("medclip predict: 3 input(s) rejected:") and "empty.png (zero_byte_image)" in err
    provenance = json.loads(out.with_suffix(".json").read_text())
    assert provenance["num_predicted"] == 3 and provenance["num_rejected"] == 3
    assert len(provenance["checkpoint_sha256"]) == 64 and provenance["versions"]["torch"]
    assert provenance["classifier"]["task"] == "multi-label" and len(provenance["classifier"]["prompts_sha256"]) == 64
    maps = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert len([m for m in maps if m.endswith(".npz")]) == 3 and len([m for m in maps if m.endswith(".png")]) == 6
    assert Image.open(tmp_path / "maps" / next(m for m in maps if m.endswith(".png"))).size == (256, 256)
    saved = np.load(tmp_path / "maps" / next(m for m in maps if m.endswith(".npz")))
    assert np.allclose(saved["shares"].mean(axis=(1, 2)), saved["logits"], atol=1e-5)


def test_cli_exit_codes_and_bad_invocations(tiny_checkpoint, tmp_path):
    from open_clip_medclip.cli import main as medclip

    folder = tmp_path / "clean"
    folder.mkdir()
    shutil.copy(NIH[0], folder / "a.jpg")
    out = tmp_path / "p.csv"
    common = ["--model", "medclip-tiny", "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--quiet",
              "--out", str(out)]
    assert medclip(["predict", str(folder), *common, "--classes", "Edema", "Atelectasis"]) == 0
    assert list(read_rows(out)[0]) == ["path", "Edema", "Atelectasis", "top_class"]
    assert json.loads(out.with_suffix(".json").read_text())["classifier"]["prompt_set"] == "chexpert"
    assert read_rows(predict_cli.rejects_path(out)) == []
    (tmp_path / "list.csv").write_text("id,image\nx,clean/a.jpg\ny,clean/missing.jpg\n")  # relative to the list
    assert medclip(["predict", str(tmp_path / "list.csv"), *common]) == 3
    assert [Path(r["path"]).name for r in read_rows(out)] == ["a.jpg"]
    assert [r["reason"] for r in read_rows(predict_cli.rejects_path(out))] == ["missing_image"]
    assert medclip(["predict", str(tmp_path / "missing"), *common]) == 2
    assert medclip(["predict", str(folder), *common, "--findings", "Edemaa"]) == 2
    assert medclip(["predict", str(folder), *common, "--prompts", "nope"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert medclip(["predict", str(empty), *common]) == 2


@pytest.mark.slow
def test_killed_run_leaves_no_partial_csv(tiny_checkpoint, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        shutil.copy(NIH[i % len(NIH)], folder / f"{i:03d}.jpg")
    out = tmp_path / "out" / "pred.csv"
    out.parent.mkdir()
    out.write_text("previous,run\n")
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "open_clip_medclip.predict_cli", str(folder), "--model",
                                 "medclip-tiny", "--pretrained", str(tiny_checkpoint), "--batch-size", "1",
                                 "--device", "cpu", "--out", str(out)], stderr=stderr, stdout=subprocess.DEVNULL,
                                env=env)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and "/300" not in log.read_text(errors="replace"):
            time.sleep(0.2)
        time.sleep(0.5)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert "image(s) predicted" not in log.read_text(errors="replace")
    assert out.read_text() == "previous,run\n"  # the previous run's output, whole
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.csv"]  # no partial CSV, rejects or JSON
