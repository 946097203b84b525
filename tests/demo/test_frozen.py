"""Frozen-tower training (`open_clip_medclip.frozen`): the cache holds exactly the trunks' outputs, a stale cache is
never reused when the weights or the transform change, heads trained on the cache give the full model's embeddings,
and the demo's frozen-tower checkpoints load in plain OpenCLIP and score what the demo reports."""
from __future__ import annotations

import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import open_clip_medclip  # noqa: F401
from open_clip_medclip import frozen
from open_clip_medclip.augment import medclip_train_transform
from open_clip_medclip.sources import SAMPLE_DATA_DIR

MODEL = "medclip-tiny"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(MODEL)


def _images(count: int = 6) -> list[Image.Image]:
    paths = sorted((SAMPLE_DATA_DIR / "kermany_pediatric").rglob("*.jpg"))[:count]
    assert len(paths) == count, "bundled pediatric sample images missing"
    return [Image.open(p) for p in paths]


TEXTS = ["no acute cardiopulmonary abnormality.", "small left pleural effusion", "heart size is mildly enlarged and "
         "there is bibasilar atelectasis without pneumothorax", "clear lungs."]


@torch.no_grad()
def test_cached_features_equal_the_trunk_outputs_and_heads_give_the_model_embeddings(tiny):
    model, preprocess, tokenizer = tiny
    images = _images()
    cached = frozen.image_trunk_features(model, images, preprocess, batch_size=4)
    batch = torch.stack([preprocess(im) for im in images])
    direct = model.visual.trunk(batch).numpy()
    assert cached.shape == direct.shape and np.abs(cached - direct).max() <= 1e-6
    image_head, text_head = frozen.heads(model)
    assert np.abs(image_head(torch.from_numpy(cached)).numpy() - model.encode_image(batch).numpy()).max() <= 1e-6

    text = frozen.text_trunk_features(model, tokenizer, TEXTS, batch_size=3)  # length-sorted batches, original order
    tokens = tokenizer(TEXTS)
    mask = (tokens != model.text.config.pad_token_id).long()
    pooled = model.text.pooler(model.text.transformer(input_ids=tokens, attention_mask=mask), mask).numpy()
    assert np.abs(text - pooled).max() <= 1e-6
    assert np.abs(text_head(torch.from_numpy(text)).numpy() - model.encode_text(tokens).numpy()).max() <= 1e-6
    assert isinstance(model.visual.head, torch.nn.Sequential) and not isinstance(model.text.proj, torch.nn.Identity)


def test_cache_is_recomputed_when_the_weights_or_the_transform_change(tiny, tmp_path):
    model, preprocess, _ = tiny
    images = _images(2)
    calls = []

    def cached(transform):
        parts = frozen.image_cache_parts("views", MODEL, model, transform, images=["a", "b"])
        return frozen.cached_array(tmp_path, "views", parts, lambda: calls.append(1) or
                                   frozen.image_trunk_features(model, images, transform))

    first = cached(preprocess)
    again = cached(preprocess)
    assert len(calls) == 1 and isinstance(again, np.memmap) and np.array_equal(first, again)
    # equal transforms built twice fingerprint the same (no object addresses); other parameters do not
    assert frozen.transform_fingerprint(medclip_train_transform(64)) == frozen.transform_fingerprint(
        medclip_train_transform(64))
    assert frozen.transform_fingerprint(medclip_train_transform(64)) != frozen.transform_fingerprint(
        medclip_train_transform(64, mean=(0.5,) * 3))
    cached(medclip_train_transform(64))
    assert len(calls) == 2
    original = next(model.visual.trunk.parameters()).detach().clone()
    try:
        with torch.no_grad():
            next(model.visual.trunk.parameters()).add_(1e-3)
        changed = cached(preprocess)
        assert len(calls) == 3 and not np.array_equal(changed, first)
    finally:
        with torch.no_grad():
            next(model.visual.trunk.parameters()).copy_(original)
    assert len(list(tmp_path.glob("views-*.npy"))) == 3 and len(list(tmp_path.glob("views-*.json"))) == 3


def test_text_cache_key_follows_the_text_weights_the_tokenizer_and_the_texts(tiny):
    model, _, tokenizer = tiny
    key = frozen.cache_key(frozen.text_cache_parts("bank", MODEL, model, tokenizer, TEXTS))
    assert frozen.cache_key(frozen.text_cache_parts("bank", MODEL, model, tokenizer, list(TEXTS))) == key
    assert frozen.cache_key(frozen.text_cache_parts("bank", MODEL, model, tokenizer, TEXTS[:-1])) != key
    other_tokenizer = open_clip.get_tokenizer(MODEL, context_length=16)
    assert frozen.cache_key(frozen.text_cache_parts("bank", MODEL, model, other_tokenizer, TEXTS)) != key
    original = next(model.text.transformer.parameters()).detach().clone()
    try:
        with torch.no_grad():
            next(model.text.transformer.parameters()).add_(1e-3)
        assert frozen.cache_key(frozen.text_cache_parts("bank", MODEL, model, tokenizer, TEXTS)) != key
    finally:
        with torch.no_grad():
            next(model.text.transformer.parameters()).copy_(original)


def test_heads_train_on_the_cache_and_the_logit_scale_moves(tiny):
    model, _, _ = tiny
    rng = np.random.default_rng(0)
    labels = np.zeros((64, 14), np.float32)
    labels[np.arange(64), rng.integers(0, 14, 64)] = 1
    features = frozen.TrainingFeatures(
        image=rng.normal(size=(64, 2, model.visual.head.proj.in_features)).astype(np.float32) + labels[:, None, :1],
        image_labels=labels, image_source=np.array(["nih"] * 32 + ["pediatric"] * 32), image_keys=[str(i) for i in
                                                                                                 range(64)],
        image_eval=np.zeros((64, 1), np.float32), text=rng.normal(size=(64, model.text.proj.in_features)).astype(
            np.float32), text_labels=labels, bank=_Bank(labels))
    budget = frozen.HeadTraining(loss="soft", label_temperature=0.5, epochs=2, steps_per_epoch=20, batch_size=32,
                                 lr=1e-2, warmup_steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = frozen.train_heads(model, features, budget, init_logit_scale=float(np.log(1 / 0.07)))
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]
    assert abs(history[-1]["logit_scale"] - 1 / 0.07) > 0.01
    after = model.state_dict()
    trunk_keys = [k for k in after if k.startswith(("visual.trunk.", "text.transformer."))]
    assert trunk_keys and all(torch.equal(before[k], after[k]) for k in trunk_keys)  # trunks stay frozen
    again = frozen.train_heads(model, features, budget, init_logit_scale=float(np.log(1 / 0.07)))
    assert again == history  # seeded: same batches, same result
    model.load_state_dict(before)


class _Bank:
    """A stand-in sentence bank: sentence i is image i's own (same labels)."""

    def __init__(self, labels):
        self.labels = labels

    def draw(self, image_targets, rng):
        rows = np.flatnonzero((self.labels == image_targets).all(axis=1))
        return int(rows[rng.randrange(len(rows))]), "shared-finding"


TINY = ["--model", MODEL, "--seeds", "2", "--epochs", "2", "--samples-per-epoch", "64", "--batch-size", "32",
        "--views", "1", "--bootstrap", "30", "--validation-seeds", "1", "--temperature-candidates", "0.5,1",
        "--no-plots"]


@pytest.mark.slow
def test_frozen_demo_checkpoints_load_in_plain_openclip_and_score_as_reported(tmp_path):
    from open_clip_medclip.demo import RESULTS_FILE
    from open_clip_medclip.demo import main as demo_main
    from open_clip_medclip.demo_results import _positive_margin, score_checkpoint
    from open_clip_medclip.demo_stats import auc_rows

    first = tmp_path / "first"
    assert demo_main(["--out", str(first), *TINY]) == 0
    summary = json.loads((first / RESULTS_FILE).read_text())
    assert summary["mode"] == "frozen towers" and summary["label_temperature"]["chosen"] in (0.5, 1.0)
    assert set(summary["label_temperature"]["candidates"]) == {"0.5", "1.0"}
    check = summary["zero_shot_path_check"]
    assert check["max_abs_score_difference"] <= 1e-4 and check["max_abs_auc_difference"] <= 1e-9
    curves = summary["learning_curves"]
    assert {"soft", "clip"} <= set(curves) and len(curves["soft"]) == 2
    assert set(curves["soft"][0]["heldout_auc"]) >= {"nih-pneumonia", "pediatric-pneumonia"}

    # plain OpenCLIP: the checkpoint is the full model; its zero-shot AUC is the per-seed AUC the demo reports
    path = first / summary["checkpoints"]["clip/seed1"]
    model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=str(path))
    assert type(model).__name__ == "CustomTextCLIP"
    suites = {s: first / "suites" / s for s in ("nih-pneumonia", "pediatric-pneumonia")}
    scores = score_checkpoint(MODEL, path, suites, tmp_path / "fresh_scores.npz")
    for suite in suites:
        auc = auc_rows(_positive_margin(scores[f"{suite}/scores"]), scores[f"{suite}/targets"] == 1, None)[0]
        assert auc == pytest.approx(summary["suites"][suite]["auc"]["clip"]["per_seed"][1], abs=1e-9)

    # same seeds, same machine, fresh work folder (data and feature cache copied): the same results, byte for byte
    second = tmp_path / "second"
    second.mkdir()
    for folder in ("labels", "shards", "suites", "features"):
        shutil.copytree(first / folder, second / folder)
    assert demo_main(["--out", str(second), *TINY]) == 0
    a, b = json.loads((first / RESULTS_FILE).read_text()), json.loads((second / RESULTS_FILE).read_text())
    assert json.dumps(a) == json.dumps(b)
