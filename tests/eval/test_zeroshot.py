"""Zero-shot, retrieval and linear probe on a tiny real suite with medclip-tiny; the CLI writes JSON + PNGs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from open_clip_medclip.errors import UserError
from open_clip_medclip.eval import cli
from open_clip_medclip.eval.linear_probe import run_linear_probe
from open_clip_medclip.eval.options import EvalOptions
from open_clip_medclip.eval.retrieval import run_retrieval, text_pool
from open_clip_medclip.eval.suites.load import load_suite
from open_clip_medclip.eval.zeroshot import class_scores, pair_probabilities, run_zeroshot, zero_shot_metrics


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_ensembles_follow_their_definitions():
    rng = np.random.default_rng(0)
    images = _unit(rng.normal(size=(4, 8)))
    prompts = [_unit(rng.normal(size=(3, 8))), _unit(rng.normal(size=(5, 8)))]
    logit = class_scores(images, prompts, "logit", scale=10)
    embed = class_scores(images, prompts, "embed", scale=10)
    top = class_scores(images, prompts, "max", scale=10)
    for c, p in enumerate(prompts):
        assert np.allclose(logit[:, c], (10 * images @ p.T).mean(1))  # MedCLIP: mean of logits
        assert np.allclose(embed[:, c], 10 * images @ _unit(p.mean(0)))  # OpenCLIP: renormalised mean
        assert np.allclose(top[:, c], (10 * images @ p.T).max(1))
    probs = pair_probabilities(images, prompts[0][:2], prompts[1][:2], scale=10)
    assert np.all((probs > 0) & (probs < 1))
    with pytest.raises(ValueError, match="ensemble"):
        class_scores(images, prompts, "median")


def test_run_zeroshot_on_tiny_suite(tiny_suite, tiny_model):
    model, preprocess, tokenizer = tiny_model
    result = run_zeroshot(model, tiny_suite, tokenizer, preprocess, options=EvalOptions(bootstrap=50, prompt_runs=2, progress=False))
    m = result.metrics
    assert m["num_samples"] == 12 and m["num_excluded_corrupt"] == 0
    assert set(m["prompts"]["per_class"]) == {"No Finding", "Pneumonia"}
    assert len(m["prompts"]["per_class"]["Pneumonia"]) == 10
    assert "prompt_runs" in m and len(m["prompt_runs"]["accuracy"]["values"]) == 2
    assert result.scores.shape == (12, 2) and result.features.shape[0] == 12
    assert not model.training


def test_corrupt_image_at_eval_is_reported_excluded_and_counted(tiny_suite, tiny_model, tmp_path):
    model, preprocess, tokenizer = tiny_model
    copy = tmp_path / "suite"
    shutil.copytree(tiny_suite, copy)
    victim = sorted((copy / "images").iterdir())[0]
    victim.write_bytes(b"\xff\xd8 truncated")
    result = run_zeroshot(model, copy, tokenizer, preprocess, options=EvalOptions(bootstrap=0, progress=False))
    assert result.metrics["num_excluded_corrupt"] == 1
    assert result.metrics["num_samples"] == 11
    assert victim.name in result.metrics["excluded_corrupt"][0]["image"]


def test_zero_shot_metrics_flat_dict_for_training_hooks(tiny_suite, tiny_model):
    model, preprocess, tokenizer = tiny_model
    model.train()
    flat = zero_shot_metrics(model, str(tiny_suite), tokenizer, preprocess, "cpu")
    assert model.training  # mode restored
    model.eval()
    assert {"nih-tiny-zeroshot-accuracy", "nih-tiny-zeroshot-balanced-accuracy", "nih-tiny-zeroshot-auc"} <= set(flat)
    assert all(isinstance(v, float) for v in flat.values())


def test_multilabel_csv_suite_uses_pair_prompts(tiny_suite, tiny_model, tmp_path):
    model, preprocess, tokenizer = tiny_model
    rows = [line.split(",") for line in (tiny_suite / "manifest.csv").read_text().splitlines()[1:]]
    lines = ["image,labels"] + [f"{tiny_suite / r[3]},{'Pneumonia|Edema' if i % 2 else 'Edema'}" for i, r in enumerate(rows)]
    (tmp_path / "ml.csv").write_text("\n".join(lines) + "\n")
    result = run_zeroshot(model, tmp_path / "ml.csv", tokenizer, preprocess, options=EvalOptions(bootstrap=20, progress=False))
    assert result.metrics["task"] == "multilabel"
    assert result.metrics["per_class"]["Pneumonia"]["auc"]["value"] is not None
    assert result.metrics["prompts"]["pairs"]["Edema"] == ["edema", "no edema"]


def test_retrieval_and_linear_probe(tiny_suite, tiny_model):
    model, preprocess, tokenizer = tiny_model
    suite = load_suite(tiny_suite)
    texts, labels = text_pool(suite)
    assert len(texts) == len(set(texts)) and set(labels) == {0, 1}
    out = run_retrieval(model, suite, tokenizer, preprocess, options=EvalOptions(bootstrap=20, progress=False)).metrics
    assert 0 <= out["image_to_text"]["precision@5"]["value"] <= 1
    assert "recall@10" in out["text_to_image"]
    probe = run_linear_probe(model, suite, preprocess, options=EvalOptions(bootstrap=20, progress=False))
    metrics, logits = probe.metrics, probe.scores
    assert metrics["probe"]["num_train"] == 12 and logits.shape == (12, 2)


def test_cli_zeroshot_writes_table_json_and_pngs(tiny_suite, tiny_checkpoint, tmp_path, capsys):
    code = cli.main(["zeroshot", "--model", "medclip-tiny", "--pretrained", str(tiny_checkpoint), "--suite",
                     str(tiny_suite), "--out", str(tmp_path), "--bootstrap", "50", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| nih-tiny |" in printed and "balanced_accuracy" in printed
    folder = tmp_path / "nih-tiny"
    data = json.loads((folder / "zeroshot.json").read_text())
    assert data["accuracy"]["ci95"][0] is not None
    for name in ("zeroshot_tsne.png", "zeroshot_roc.png", "zeroshot_confusion.png"):
        assert (folder / name).stat().st_size > 1000


def test_cli_stops_before_the_model_on_a_missing_suite(tiny_suite, tmp_path):
    with pytest.raises(UserError, match="nope"):
        cli.main(["zeroshot", "--model", "medclip-tiny", "--suite", str(tmp_path / "nope"), str(tiny_suite),
                  "--out", str(tmp_path / "o"), "--bootstrap", "0", "--no-plots", "--quiet", "--device", "cpu"])
    assert not (tmp_path / "o").exists()


def test_cli_keeps_going_when_one_suite_fails(tiny_suite, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_suite, broken)
    sorted((broken / "images").iterdir())[0].unlink()
    with pytest.raises(UserError, match="is missing"):
        cli.main(["zeroshot", "--model", "medclip-tiny", "--suite", str(broken), str(tiny_suite), "--out",
                  str(tmp_path / "o"), "--bootstrap", "0", "--no-plots", "--quiet", "--device", "cpu"])
    # the suite that evaluated keeps its new results; the combined table is not rewritten without the failed one
    assert (tmp_path / "o/nih-tiny/zeroshot.json").is_file()
    assert not (tmp_path / "o/zeroshot.md").exists()
    assert "left as it was because 1 suite(s) failed" in capsys.readouterr().out


def test_cli_build_suite_from_csv(tmp_path, tiny_suite, capsys):
    rows = [line.split(",") for line in (tiny_suite / "manifest.csv").read_text().splitlines()[1:]]
    (tmp_path / "my.csv").write_text("image,label\n" + "".join(f"{tiny_suite / r[3]},{r[2]}\n" for r in rows))
    assert cli.main(["build-suite", str(tmp_path / "my.csv"), "--out", str(tmp_path / "built"), "--quiet"]) == 0
    assert '"manifest_sha256"' in capsys.readouterr().out
    assert load_suite(tmp_path / "built").classes == ["No Finding", "Pneumonia"]


def test_text_embeddings_of_masked_poolers_are_trimmed_and_equal_the_padded_ones(tiny_model):
    """Eval trims text batches where that is exact (masked pooler): the text tower sees fewer columns, same result."""
    import torch

    from open_clip_medclip import models
    from open_clip_medclip.eval.embed import embed_texts

    model, _, tokenizer = tiny_model
    texts = ["no pneumothorax .", "small left pleural effusion with basilar atelectasis .", "normal heart size"]
    widths = []
    hook = model.text.register_forward_pre_hook(lambda module, inputs: widths.append(inputs[0].shape[1]))
    try:
        trimmed = embed_texts(model, tokenizer, texts)
    finally:
        hook.remove()
    assert widths and widths[0] < 77 and widths[0] % 8 == 0
    with torch.no_grad():
        padded = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1).numpy()
    assert np.abs(trimmed - padded).max() <= 1e-6
    # the reference pooler averages padding: its texts keep the tokenizer's 77 columns
    pooler = model.text.pooler
    model.text.pooler = models.MedclipPooler()
    widths.clear()
    hook = model.text.register_forward_pre_hook(lambda module, inputs: widths.append(inputs[0].shape[1]))
    try:
        embed_texts(model, tokenizer, texts)
    finally:
        hook.remove()
        model.text.pooler = pooler
    assert widths == [77]
