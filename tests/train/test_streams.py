"""Label-aware streams: label transport, the text-pairing rule, seeded pairing, the OpenCLIP data pipeline."""
from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds

from open_clip_medclip.findings import CHEXPERT_FINDINGS, FINDING_INDEX, NUM_FINDINGS
from open_clip_medclip.streams import (
    RULE_FALLBACK,
    RULE_NO_FINDING,
    RULE_OWN_REPORT,
    RULE_SHARED_FINDING,
    SentenceBank,
    get_medclip_wds_dataset,
    iter_pairs,
    pack_labels,
    scan_shards,
    unpack_labels,
)

NF = FINDING_INDEX["No Finding"]


def _vec(*names: str) -> list[float]:
    v = [0.0] * NUM_FINDINGS
    for n in names:
        v[FINDING_INDEX[n]] = 1.0
    return v


def test_pack_unpack_round_trip_is_exact():
    tokens = torch.randint(0, 28996, (3, 77))
    il = [[1.0, -1.0] + [0.0] * 12, [0.0] * 14, [0.5] * 14]
    tl = [[0.0] * 13 + [1.0], [1.0] * 14, [-1.0] * 14]
    packed = torch.stack([pack_labels(tokens[i], il[i], tl[i]) for i in range(3)])
    assert packed.dtype == torch.int64 and packed.shape == (3, 77 + 28)
    out_tokens, out_il, out_tl = unpack_labels(packed, 77)
    assert torch.equal(out_tokens, tokens)
    assert out_il.tolist() == il and out_tl.tolist() == tl
    untouched, none_il, none_tl = unpack_labels(tokens, 77)
    assert untouched is tokens and none_il is None and none_tl is None


def test_bank_draw_follows_the_pairing_rule():
    bank = SentenceBank.from_entries([
        ("the heart is enlarged .", _vec("Cardiomegaly")),
        ("large effusion and cardiomegaly .", _vec("Cardiomegaly", "Pleural Effusion")),
        ("no acute disease is seen here .", _vec("No Finding")),
        ("the lungs are clear bilaterally .", _vec("No Finding")),
        ("there is a right sided pneumothorax .", _vec("Pneumothorax")),
        ("the heart is enlarged .", _vec("Edema")),  # duplicate text keeps its first labels
    ])
    assert len(bank) == 5
    rng = random.Random(0)
    counts = {}
    for _ in range(3000):
        index, rule = bank.draw(_vec("Cardiomegaly", "Pleural Effusion"), rng)
        assert rule == RULE_SHARED_FINDING
        counts[index] = counts.get(index, 0) + 1
    assert set(counts) == {0, 1} and abs(counts[0] - counts[1]) < 300  # uniform over the union, not per finding
    for _ in range(50):
        index, rule = bank.draw(_vec("No Finding"), rng)
        assert rule == RULE_NO_FINDING and bank.labels[index, NF] == 1.0
        assert bank.texts[index] in ("no acute disease is seen here .", "the lungs are clear bilaterally .")
    index, rule = bank.draw([0.0] * NUM_FINDINGS, rng)  # nothing positive counts as No Finding
    assert rule == RULE_NO_FINDING
    index, rule = bank.draw(_vec("Fracture"), rng)  # no Fracture sentence: MedCLIP's No Finding fallback
    assert rule == RULE_FALLBACK and bank.labels[index, NF] == 1.0


def _check_pair(pair: dict, own_sentences: dict, bank: SentenceBank) -> None:
    il, tl = pair["image_labels"], pair["text_labels"]
    if pair["rule"] == RULE_OWN_REPORT:
        assert pair["text"] in own_sentences[pair["__key__"]]
    elif pair["rule"] == RULE_SHARED_FINDING:
        assert any(il[f] == 1.0 and tl[f] == 1.0 for f in range(NUM_FINDINGS) if f != NF)
    elif pair["rule"] == RULE_NO_FINDING:
        assert not any(il[f] == 1.0 for f in range(NUM_FINDINGS) if f != NF) and tl[NF] == 1.0
    else:
        raise AssertionError(f"unexpected rule {pair['rule']} for {pair['__key__']}")
    if pair["rule"] != RULE_OWN_REPORT:  # a whole bank sentence, not MedCLIP's first-character bug
        assert pair["text"] in bank.texts and len(pair["text"]) > 1


def _own_sentences(urls: list[str]) -> dict:
    own = {}
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    own[member.name[: -len(".json")]] = {s["text"] for s in meta["sentences"]}
    return own


def test_pairing_rule_on_written_shards(small_shards):
    bank, pairs = iter_pairs(small_shards["all"], seed=3)
    pairs = list(pairs)
    own = _own_sentences(small_shards["paired"])
    assert len(pairs) == 24  # text-only samples fill the bank, they are not images
    assert {p["rule"] for p in pairs} >= {RULE_OWN_REPORT, RULE_SHARED_FINDING, RULE_NO_FINDING}
    for pair in pairs:
        _check_pair(pair, own, bank)


def test_pairing_is_seeded_per_epoch(small_shards):
    def texts(seed, epoch):
        return [p["text"] for p in iter_pairs(small_shards["all"], seed=seed, epoch=epoch)[1]]

    assert texts(1, 0) == texts(1, 0)
    assert texts(1, 0) != texts(1, 1)


def _args(shards: str, **overrides) -> SimpleNamespace:
    args = dict(train_data=shards, val_data=None, train_data_upsampling_factors=None, dataset_resampled=False,
                train_num_samples=None, val_num_samples=None, batch_size=4, workers=0, world_size=1, rank=0,
                seed=0, medclip_uncertain="zeros", medclip_bank_data=None)
    args.update(overrides)
    return SimpleNamespace(**args)


def _tokenizer(texts):
    return torch.full((len(texts), 77), len(texts[0]), dtype=torch.long)


def _image(pil):
    return torch.zeros(3, 8, 8) + pil.size[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_batches_carry_the_shard_labels(small_shards, workers):
    info = get_medclip_wds_dataset(_args(small_shards["all"], workers=workers), _image, is_train=True,
                                   tokenizer=_tokenizer)
    loader = info.dataloader
    assert loader.num_samples == 24 and loader.num_batches == 6  # image-bearing samples only
    batches = list(loader)
    assert len(batches) == 6
    images, texts = batches[0]
    assert images.shape == (4, 3, 8, 8) and texts.shape == (4, 77 + 2 * NUM_FINDINGS)
    image_labels = torch.cat([unpack_labels(t, 77)[1] for _, t in batches])
    expected = set()
    for url in small_shards["image"] + small_shards["paired"]:
        for sample in wds.WebDataset(url, shardshuffle=False).decode():
            expected.add(tuple(sample["json"]["labels"]))
    assert {tuple(row) for row in image_labels.tolist()} <= expected


def test_upsampling_factors_drop_text_only_groups(small_shards):
    image_a, image_b = small_shards["image"]
    data = f"{image_a}::{image_b}::{small_shards['text'][0]}"
    args = _args(data, dataset_resampled=True, train_data_upsampling_factors="1::3::1", train_num_samples=64)
    info = get_medclip_wds_dataset(args, _image, is_train=True, tokenizer=_tokenizer)
    shard_stage = info.dataloader.pipeline[0].dataset.pipeline[0]  # WebLoader -> DataLoader -> DataPipeline
    assert shard_stage.urls == [image_a, image_b] and shard_stage.weights == [1.0, 3.0]
    assert sum(len(images) for images, _ in info.dataloader) == 64


def test_resampled_without_upsampling_factors_is_uniform(small_shards):
    image_a, image_b = small_shards["image"]
    args = _args(f"{image_a}::{image_b}::{small_shards['text'][0]}", dataset_resampled=True, train_num_samples=32)
    info = get_medclip_wds_dataset(args, _image, is_train=True, tokenizer=_tokenizer)
    shard_stage = info.dataloader.pipeline[0].dataset.pipeline[0]
    assert shard_stage.urls == [image_a, image_b] and shard_stage.weights == [1.0, 1.0]
    assert sum(len(images) for images, _ in info.dataloader) == 32


def test_clear_errors(tmp_path: Path, small_shards):
    plain = tmp_path / "plain-000000.tar"
    with wds.TarWriter(str(plain)) as sink:
        sink.write({"__key__": "a", "jpg": b"x", "txt": "hello", "json": json.dumps({"caption": "hello"})})
    with pytest.raises(ValueError, match=r"plain-000000.tar:a.json: 'kind' is None"):
        scan_shards([str(plain)])
    with pytest.raises(ValueError, match="need a sentence bank"):
        get_medclip_wds_dataset(_args(small_shards["image"][0]), _image, is_train=True, tokenizer=_tokenizer)
    with pytest.raises(FileNotFoundError, match="missing-000000.tar"):
        scan_shards([str(tmp_path / "missing-000000.tar")])


def test_bank_data_flag_adds_sentences(small_shards):
    args = _args(small_shards["image"][0], medclip_bank_data=small_shards["text"][0], train_num_samples=8)
    info = get_medclip_wds_dataset(args, _image, is_train=True, tokenizer=_tokenizer)
    assert sum(len(images) for images, _ in info.dataloader) == 8
    assert CHEXPERT_FINDINGS[NF] == "No Finding"


def test_pairing_rule_on_real_shards(real_shards):
    """NIH images paired from a bank of labelled IU report sentences, both built by `medclip shards build`."""
    bank, pairs = iter_pairs(real_shards["nih_brace"], bank_data=real_shards["iu_brace"], seed=0)
    pairs = list(pairs)
    assert len(pairs) == 40 and len(bank) > 100
    rules = {p["rule"] for p in pairs}
    assert {RULE_SHARED_FINDING, RULE_NO_FINDING} <= rules
    for pair in pairs:
        if pair["rule"] == RULE_FALLBACK:  # only when the bank has no sentence for any of the image's findings
            positives = [f for f in range(NUM_FINDINGS) if f != NF and pair["image_labels"][f] == 1.0]
            assert positives and all(len(bank.by_finding[f]) == 0 for f in positives)
            assert pair["text_labels"][NF] == 1.0
        else:
            _check_pair(pair, {}, bank)
