"""Label-aware streams: the lean bank's pairing rule, start-up from the shard index only, any URL, label policy,
named skips and per-shard counts (fault injection), the splice into OpenCLIP's pipeline, text trimming and length
bucketing."""
from __future__ import annotations

import functools
import http.server
import json
import logging
import random
import shutil
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds

from open_clip_medclip.errors import UserError
from open_clip_medclip.findings import FINDING_INDEX, NUM_FINDINGS
from open_clip_medclip.labels import LabelError, pack_batch, unpack_batch, values_from_names
from open_clip_medclip.streams.bank import (
    RULE_FALLBACK,
    RULE_NO_FINDING,
    RULE_OWN_REPORT,
    RULE_SHARED_FINDING,
    SentenceBank,
)
from open_clip_medclip.streams.plan import plan_streams, shard_name
from open_clip_medclip.streams.stages import BucketByLength, PackBatch, get_medclip_wds_dataset, iter_pairs
from open_clip_medclip.text_width import text_bucket_for, text_multiple_for, trim_tokens
from tests.train.shardkit import (
    SAMPLE_DIR,
    brace,
    cut_tar_before,
    fake_image,
    fake_tokenizer,
    member_names,
    rewrite_member,
    stream_args,
    write_shards,
)

NF = FINDING_INDEX["No Finding"]


def _vec(*names: str) -> list[float]:
    v = [0.0] * NUM_FINDINGS
    for n in names:
        v[FINDING_INDEX[n]] = 1.0
    return v


# ----------------------------------------------------------------------------------------------------------------
# The lean sentence bank
# ----------------------------------------------------------------------------------------------------------------
def test_bank_draw_follows_the_pairing_rule():
    bank = SentenceBank.from_entries([
        ("the heart is enlarged .", _vec("Cardiomegaly")),
        ("large effusion and cardiomegaly .", _vec("Cardiomegaly", "Pleural Effusion")),
        ("no acute disease is seen here .", _vec("No Finding")),
        ("the lungs are clear bilaterally .", _vec("No Finding")),
        ("there is a right sided pneumothorax .", _vec("Pneumothorax")),
        ("the heart is enlarged .", _vec("Edema")),  # duplicate text keeps its first labels
    ])
    assert len(bank) == 5 and isinstance(bank.buffer.base, bytes | type(None))
    assert bank.codes.dtype.itemsize == 1 and bank.offsets.dtype == "int64"
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
        assert bank.text(index) in ("no acute disease is seen here .", "the lungs are clear bilaterally .")
    index, rule = bank.draw([0.0] * NUM_FINDINGS, rng)  # nothing positive counts as No Finding
    assert rule == RULE_NO_FINDING
    index, rule = bank.draw(_vec("Fracture"), rng)  # no Fracture sentence: MedCLIP's No Finding fallback
    assert rule == RULE_FALLBACK and bank.labels[index, NF] == 1.0


def test_bank_policy_decides_what_counts_as_positive():
    uncertain = [None] * NUM_FINDINGS
    uncertain[FINDING_INDEX["Edema"]] = -1.0
    entries = [("edema cannot be excluded .", uncertain), ("no acute disease .", values_from_names(["No Finding"]))]
    zeros, ones = SentenceBank.from_entries(entries, "zeros"), SentenceBank.from_entries(entries, "ones")
    rng = random.Random(1)
    assert zeros.draw(_vec("Edema"), rng)[1] == RULE_FALLBACK
    assert ones.draw(_vec("Edema"), rng) == (0, RULE_SHARED_FINDING)
    assert ones.targets(0)[FINDING_INDEX["Edema"]] == 1.0 and zeros.targets(0)[FINDING_INDEX["Edema"]] == 0.0


def test_banks_from_several_indexes_are_merged_without_duplicates():
    a = SentenceBank.from_entries([("a b .", _vec("Edema")), ("c d .", _vec("No Finding"))])
    b = SentenceBank.from_entries([("c d .", _vec("No Finding")), ("e f .", _vec("Fracture"))])
    merged = SentenceBank.concat([(x.buffer, x.offsets, x.codes) for x in (a, b)], "zeros")
    assert sorted(merged.texts) == ["a b .", "c d .", "e f ."]


# ----------------------------------------------------------------------------------------------------------------
# Pairing on shards, read through the index
# ----------------------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_batches_carry_the_shard_labels(small_shards, workers):
    info = get_medclip_wds_dataset(stream_args(small_shards["all"], workers=workers), fake_image, is_train=True,
                                   tokenizer=fake_tokenizer)
    loader = info.dataloader
    assert loader.num_samples == 24 and loader.num_batches == 6  # image-bearing samples only
    batches = list(loader)
    assert len(batches) == 6
    images, texts = batches[0]
    assert images.shape == (4, 3, 8, 8) and texts.shape == (4, 77 + 2 * NUM_FINDINGS + 1)
    image_labels = torch.cat([unpack_batch(t)[1] for _, t in batches])
    expected = set()
    for url in small_shards["image"] + small_shards["paired"]:
        for sample in wds.WebDataset(url, shardshuffle=False).decode():
            expected.add(tuple(0.0 if v is None else v for v in sample["json"]["labels"]))  # zeros policy
    assert {tuple(row) for row in image_labels.tolist()} <= expected


def test_the_pipeline_is_open_clip_trains_own(small_shards):
    """Upstream's stages stay (shard shuffle, node/worker split); only the reader, shuffle and tail are ours."""
    import open_clip_train.data as ocd

    info = get_medclip_wds_dataset(stream_args(small_shards["all"]), fake_image, is_train=True, tokenizer=fake_tokenizer)
    stages = info.dataloader.pipeline[0].dataset.pipeline
    assert isinstance(stages[1], ocd.detshuffle2) and stages[2] is wds.split_by_node
    assert type(stages[4]).__name__ == "ShardReader" and type(stages[5]).__name__ == "SeededShuffle"
    assert info.shared_epoch is not None and isinstance(info, ocd.DataInfo)


def test_upsampling_factors_drop_text_only_groups(small_shards):
    image_a, image_b = small_shards["image"]
    data = f"{image_a}::{image_b}::{small_shards['text'][0]}"
    args = stream_args(data, dataset_resampled=True, train_data_upsampling_factors="1::3::1", train_num_samples=64)
    info = get_medclip_wds_dataset(args, fake_image, is_train=True, tokenizer=fake_tokenizer)
    shard_stage = info.dataloader.pipeline[0].dataset.pipeline[0]  # WebLoader -> DataLoader -> DataPipeline
    assert shard_stage.urls == [image_a, image_b] and shard_stage.weights == [1.0, 3.0]
    assert sum(len(images) for images, _ in info.dataloader) == 64


def test_resampled_without_upsampling_factors_is_uniform(small_shards):
    image_a, image_b = small_shards["image"]
    args = stream_args(f"{image_a}::{image_b}::{small_shards['text'][0]}", dataset_resampled=True, train_num_samples=32)
    info = get_medclip_wds_dataset(args, fake_image, is_train=True, tokenizer=fake_tokenizer)
    shard_stage = info.dataloader.pipeline[0].dataset.pipeline[0]
    assert shard_stage.urls == [image_a, image_b] and shard_stage.weights == [1.0, 1.0]
    assert sum(len(images) for images, _ in info.dataloader) == 32


def test_bank_data_flag_adds_sentences(small_shards):
    args = stream_args(small_shards["image"][0], medclip_bank_data=small_shards["text"][0], train_num_samples=8)
    info = get_medclip_wds_dataset(args, fake_image, is_train=True, tokenizer=fake_tokenizer)
    assert sum(len(images) for images, _ in info.dataloader) == 8


# ----------------------------------------------------------------------------------------------------------------
# Start-up from the index only; errors
# ----------------------------------------------------------------------------------------------------------------
def test_start_up_reads_only_the_index(tmp_path: Path):
    out = tmp_path / "shards"
    written = write_shards(out, images_per_shard=4, image_shards=3, text_shards=1)
    for path in written["image"]:  # image shards are never opened before iteration
        Path(path).unlink()
    plan = plan_streams(stream_args(brace(written["image"] + written["text"])), is_train=True)
    assert plan.image_urls == written["image"] and plan.image_samples == 12 and len(plan.bank) == 12


def test_clear_errors(tmp_path: Path, small_shards):
    old = tmp_path / "old"
    write_shards(old, images_per_shard=2, image_shards=1, text_shards=1, index=False)
    with pytest.raises(UserError, match=r"index.json: shard index not found; write it with 'medclip shards index"):
        plan_streams(stream_args(str(old / "train-{000000..000001}.tar")), is_train=True)
    images_only = tmp_path / "images-only"
    write_shards(images_only, images_per_shard=2, image_shards=1, text_shards=0)
    with pytest.raises(UserError, match="need a sentence bank"):
        plan_streams(stream_args(str(images_only / "train-000000.tar")), is_train=True)
    missing = str(Path(small_shards["image"][0]).with_name("train-000099.tar"))
    with pytest.raises(UserError, match=r"train-000099.tar: no such file$"):  # not "rewrite the index" (issue 24)
        plan_streams(stream_args(missing), is_train=True)
    Path(missing).write_bytes(Path(small_shards["image"][0]).read_bytes())
    try:  # a shard that exists but the index does not list: the index is stale
        with pytest.raises(UserError, match=r"train-000099.tar: shard 'train-000099.tar' is not in the shard index"):
            plan_streams(stream_args(missing), is_train=True)
    finally:
        Path(missing).unlink()
    with pytest.raises(UserError, match="needs --dataset-resampled"):
        get_medclip_wds_dataset(stream_args(small_shards["image"][0], train_data_upsampling_factors="1",
                                      medclip_bank_data=small_shards["text"][0]), fake_image, True, tokenizer=fake_tokenizer)


def test_recorded_policy_that_cannot_give_the_requested_one_stops(tmp_path: Path):
    out = tmp_path / "zeros"
    written = write_shards(out, images_per_shard=2, image_shards=1, text_shards=1)
    index = json.loads((out / "index.json").read_text())
    index["label_policy"] = "zeros"  # as if built with --uncertainty zeros: the -1s are gone
    (out / "index.json").write_text(json.dumps(index))
    data = brace(written["image"] + written["text"])
    with pytest.raises(LabelError, match=r"built with label policy 'zeros', which cannot give 'ones' targets"):
        plan_streams(stream_args(data, medclip_uncertain="ones"), is_train=True)
    assert plan_streams(stream_args(data, medclip_uncertain="zeros"), is_train=True).policy == "zeros"


def test_policy_is_applied_once_from_raw_codes(tmp_path: Path):
    out = tmp_path / "raw"
    written = write_shards(out, images_per_shard=2, image_shards=1, text_shards=1)
    path = written["image"][0]
    json_member = next(m for m in member_names(path) if m.endswith(".json"))

    def uncertain_edema(data: bytes) -> bytes:
        meta = json.loads(data)
        meta["labels"] = [None] * NUM_FINDINGS
        meta["labels"][FINDING_INDEX["Edema"]] = -1
        return json.dumps(meta, sort_keys=True).encode()

    rewrite_member(path, json_member, uncertain_edema)
    data = brace(written["image"] + written["text"])
    for policy, expected in (("zeros", 0.0), ("ones", 1.0), ("keep", -1.0)):
        _, pairs = iter_pairs(data, policy=policy)
        pair = next(p for p in pairs if p["__key__"] == json_member[:-5])
        assert pair["image_labels"][FINDING_INDEX["Edema"]] == expected
        assert pair["image_labels"][NF] == 0.0  # blank -> 0 under every training policy


# ----------------------------------------------------------------------------------------------------------------
# Fault injection: named skips and per-shard counts (issue 11)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def faulty_shards(tmp_path: Path) -> dict:
    out = tmp_path / "faulty"
    written = write_shards(out, images_per_shard=8, image_shards=2, text_shards=1)
    return {"dir": out, **written, "all": brace(written["image"] + written["text"])}


def _train_once(data: str, caplog) -> list:
    with caplog.at_level(logging.INFO, logger="open_clip_medclip.streams"):
        info = get_medclip_wds_dataset(stream_args(data, train_num_samples=16), fake_image, is_train=True,
                                       tokenizer=fake_tokenizer)
        return list(info.dataloader)


def test_nan_label_is_skipped_and_named(faulty_shards, caplog):
    path = faulty_shards["image"][1]
    member = [m for m in member_names(path) if m.endswith(".json")][3]

    def nan_label(data: bytes) -> bytes:
        return data.replace(b'"labels": [', b'"labels": [NaN, ', 1).replace(b"null, ", b"", 1)

    rewrite_member(path, member, nan_label)
    _train_once(faulty_shards["all"], caplog)
    key = member[: -len(".json")]
    skip = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert skip, "the NaN sample was not reported"  # once per read of the shard (the epoch may wrap around)
    for message in skip:
        assert f"skipped sample {key} in {path}: invalid sample: {member}: labels[0] (No Finding): NaN is not a " \
               "label value" in message
    summary = [r.getMessage() for r in caplog.records if "medclip streams epoch 0" in r.getMessage()]
    assert summary and f"{len(skip)} skipped ({len(skip)} invalid sample)" in summary[-1]


def test_tar_cut_at_a_member_boundary_is_counted_against_the_index(faulty_shards, caplog):
    path = faulty_shards["image"][0]
    names = member_names(path)
    cut_tar_before(path, names[-2])  # the last sample (jpg + json) is gone: 7 of 8 samples
    _train_once(faulty_shards["all"], caplog)
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{path}: read 7 of 8 samples the shard index lists" in m for m in messages), messages
    summary = [m for m in messages if "medclip streams epoch 0" in m]
    assert summary and "shards not matching the index: train-000000.tar: read 7 of 8 samples" in summary[-1]


def test_corrupt_jpeg_is_skipped_and_named(faulty_shards, caplog):
    path = faulty_shards["image"][0]
    member = [m for m in member_names(path) if m.endswith(".jpg")][2]
    rewrite_member(path, member, lambda data: data[: len(data) // 3])  # JPEG magic kept, body cut
    batches = _train_once(faulty_shards["all"], caplog)
    key = member[: -len(".jpg")]
    skip = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert skip and all(f"skipped sample {key} in {path}: corrupt image: {member} does not decode" in m
                        and "DecodingError" not in m for m in skip), skip
    assert sum(len(images) for images, _ in batches) == 16  # the epoch is still full
    summary = [r.getMessage() for r in caplog.records if "medclip streams epoch 0" in r.getMessage()]
    assert f"{len(skip)} skipped ({len(skip)} corrupt image)" in summary[-1]


def _gray_or_rgb_jpeg(mode: str, width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height), 128 if mode == "L" else (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode,size,reason", [
    ("RGB", (16, 16), "image mode is RGB; the spec stores 8-bit grayscale (L)"),
    ("L", (48, 40), "image is 48x40, longer side above provenance image.longer_side 32"),
])
def test_decoded_image_faults_are_rejected_by_validate_and_the_stream_alike(tmp_path: Path, caplog, capsys,
                                                                            mode, size, reason):
    """An RGB image and one above the build's longer side: `medclip shards validate` and the stream reject the
    sample with the same reason (one check, `shards.validate.decoded_image_problems`), the stream names and counts
    the skip."""
    import itertools

    from open_clip_medclip.shards import BuildOptions, build_shards
    from open_clip_medclip.shards.cli import main as shards_main
    from open_clip_medclip.shards.merge import write_index
    from open_clip_medclip.sources import iter_nih

    build = tmp_path / "build"
    build_shards(itertools.islice(iter_nih(SAMPLE_DIR / "nih_cxr14" / "labels.csv"), 4), build,
                 BuildOptions(image_size=32, progress=False))
    shard = build / "shard-000000.tar"
    member = [m for m in member_names(str(shard)) if m.endswith(".jpg")][1]
    key = member[: -len(".jpg")]
    rewrite_member(str(shard), member, lambda data: _gray_or_rgb_jpeg(mode, *size))
    write_index(build)  # checksums follow the edit: the image itself is the only fault
    bank = tmp_path / "bank"
    write_shards(bank, image_shards=0, text_shards=1)

    assert shards_main(["validate", str(build)]) == 1
    err = capsys.readouterr().err
    assert f"  {shard}: {member}: {reason}\n" in err and "1 problem(s)" in err, err

    with caplog.at_level(logging.INFO, logger="open_clip_medclip.streams"):
        pairs = list(iter_pairs(str(shard), bank_data=str(bank / "train-000000.tar"))[1])
    assert sorted(p["__key__"] for p in pairs) == sorted(m[:-4] for m in member_names(str(shard))
                                                         if m.endswith(".jpg") and m != member)
    skip = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert skip == [f"medclip streams: skipped sample {key} in {shard}: invalid sample: {member}: {reason}"]

    caplog.clear()
    args = stream_args(str(shard), medclip_bank_data=str(bank / "train-000000.tar"), batch_size=1, train_num_samples=3)
    with caplog.at_level(logging.INFO, logger="open_clip_medclip.streams"):
        batches = list(get_medclip_wds_dataset(args, fake_image, is_train=True, tokenizer=fake_tokenizer).dataloader)
    assert len(batches) == 3
    skip = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert skip and all(m.endswith(f"skipped sample {key} in {shard}: invalid sample: {member}: {reason}")
                        for m in skip), skip
    summary = [r.getMessage() for r in caplog.records if "medclip streams epoch 0" in r.getMessage()]
    assert summary and f"{len(skip)} skipped ({len(skip)} invalid sample)" in summary[-1]


# ----------------------------------------------------------------------------------------------------------------
# Any URL: http(s) from a local server, pipe: commands
# ----------------------------------------------------------------------------------------------------------------
class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        return super().do_GET()


@pytest.fixture
def http_shards(small_shards):
    handler = type("Handler", (_CountingHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(handler, directory=str(small_shards["dir"])))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _labels_of(loader) -> list:
    return sorted(tuple(row) for _, texts in loader for row in unpack_batch(texts)[1].tolist())


def test_http_urls_read_the_index_at_start_up_and_the_shards_when_iterated(small_shards, http_shards):
    base, handler = http_shards
    names = [Path(p).name for p in small_shards["image"] + small_shards["paired"] + small_shards["text"]]
    data = f"{base}/{brace([str(Path('x') / n) for n in names]).split('/', 1)[1]}"
    args = stream_args(data, train_num_samples=24)
    info = get_medclip_wds_dataset(args, fake_image, is_train=True, tokenizer=fake_tokenizer)
    # the index files and the build's provenance (image size for the validator's check), once each; no shard
    assert sorted(handler.requests) == ["/index-bank.npz", "/index.json", "/provenance.json"]
    remote = _labels_of(info.dataloader)
    local = _labels_of(get_medclip_wds_dataset(stream_args(small_shards["all"], train_num_samples=24), fake_image, True,
                                               tokenizer=fake_tokenizer).dataloader)
    assert remote == local and len(remote) == 24
    assert {r for r in handler.requests if r.endswith(".tar")} == {f"/{n}" for n in names[:3]}


def test_pipe_urls_and_explicit_index(small_shards, tmp_path: Path):
    urls = "::".join(f"pipe:cat {p}" for p in small_shards["image"] + small_shards["paired"] + small_shards["text"])
    assert shard_name(f"pipe:cat {small_shards['image'][0]}") == "train-000000.tar"
    piped = _labels_of(get_medclip_wds_dataset(stream_args(urls, train_num_samples=24), fake_image, True,
                                               tokenizer=fake_tokenizer).dataloader)
    local = _labels_of(get_medclip_wds_dataset(stream_args(small_shards["all"], train_num_samples=24), fake_image, True,
                                               tokenizer=fake_tokenizer).dataloader)
    assert piped == local
    elsewhere = tmp_path / "index-elsewhere"
    elsewhere.mkdir()
    for name in ("index.json", "index-bank.npz", "index-samples.jsonl"):
        shutil.copy(small_shards["dir"] / name, elsewhere / name)
    moved = tmp_path / "moved"
    shutil.copytree(small_shards["dir"], moved, ignore=shutil.ignore_patterns("index*"))
    data = str(moved / "train-{000000..000003}.tar")
    with pytest.raises(UserError, match="shard index not found"):
        plan_streams(stream_args(data), is_train=True)
    assert plan_streams(stream_args(data, medclip_index=str(elsewhere)), is_train=True).image_samples == 24


# ----------------------------------------------------------------------------------------------------------------
# Text trimming (issue 15)
# ----------------------------------------------------------------------------------------------------------------
def test_trim_tokens_widths():
    tokens = torch.zeros(3, 77, dtype=torch.long)
    tokens[0, :5] = 7
    tokens[1, :11] = 7
    assert trim_tokens(tokens, 8).shape == (3, 16)
    assert trim_tokens(tokens, 1).shape == (3, 11)
    assert trim_tokens(tokens, 0).shape == (3, 77)
    tokens[2, :77] = 7
    assert trim_tokens(tokens, 8).shape == (3, 77)  # never wider than the tokenizer's context


def test_trimmed_batches_stay_packed_at_any_width(small_shards):
    import open_clip

    tokenizer = open_clip.get_tokenizer("medclip-tiny")
    args = stream_args(small_shards["all"], medclip_text_multiple=8)
    for _, texts in get_medclip_wds_dataset(args, fake_image, True, tokenizer=tokenizer).dataloader:
        tokens, image_labels, text_labels = unpack_batch(texts)
        assert tokens.shape[1] % 8 == 0 and tokens.shape[1] < 77 and image_labels.shape == (4, NUM_FINDINGS)
        assert bool((tokens[:, -8:] != 0).any())  # the longest text reaches the last 8 columns


def test_text_multiple_follows_the_pooler():
    assert text_multiple_for(SimpleNamespace(model="medclip-tiny")) == 8  # masked pooler
    assert text_multiple_for(SimpleNamespace(model="medclip-swin")) == 1  # reference pooler: pad to longest
    assert text_multiple_for(SimpleNamespace(model="RN50")) == 0  # OpenCLIP's own text tower: untouched
    assert text_multiple_for(SimpleNamespace(model="medclip-swin", medclip_text_multiple="16")) == 16


SENTENCES = ["no acute cardiopulmonary abnormality .", "there is a small right apical pneumothorax .",
             "the heart is moderately enlarged with small bilateral pleural effusions and bibasilar atelectasis ."]


def test_masked_pooler_embeddings_do_not_change_when_trimmed():
    import open_clip

    model = open_clip.create_model("medclip-tiny").eval()
    tokens = open_clip.get_tokenizer("medclip-tiny")(SENTENCES)
    trimmed = trim_tokens(tokens, 8)
    assert trimmed.shape[1] < 77
    with torch.no_grad():
        full, short = model.encode_text(tokens), model.encode_text(trimmed)
    assert torch.allclose(full, short, atol=1e-6, rtol=0)


def test_reference_pooler_trimmed_to_the_longest_equals_the_authors_padding():
    """MedCLIP's collator tokenizes with `padding=True` (pad to the batch's longest text); the stream's trimmed
    tokens for reference-pooler models are exactly those ids, so the embeddings are the authors'."""
    import open_clip

    from open_clip_medclip.models import MedclipPooler

    tokenizer = open_clip.get_tokenizer("medclip-tiny")
    authors = tokenizer.tokenizer(SENTENCES, padding=True, truncation=True, max_length=77, return_tensors="pt")
    trimmed = trim_tokens(tokenizer(SENTENCES), text_multiple_for(SimpleNamespace(model="medclip-swin")))
    assert torch.equal(trimmed, authors["input_ids"])
    model = open_clip.create_model("medclip-tiny").eval()
    model.text.pooler = MedclipPooler()
    with torch.no_grad():
        ours, theirs = model.encode_text(trimmed), model.encode_text(authors["input_ids"])
        padded77 = model.encode_text(tokenizer(SENTENCES))
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, padded77, atol=1e-4)  # the reference pooler averages padding: 77 differs


def test_pack_batch_round_trip_through_the_stream_contract():
    tokens = torch.randint(1, 28996, (3, 24))
    il = torch.tensor([[1.0, -1.0] + [0.0] * 12, [0.0] * 14, [1.0] * 14])
    tl = torch.tensor([[0.0] * 13 + [1.0], [1.0] * 14, [-1.0] * 14])
    out_tokens, out_il, out_tl = unpack_batch(pack_batch(tokens, il, tl))
    assert torch.equal(out_tokens, tokens) and torch.equal(out_il, il) and torch.equal(out_tl, tl)


# ----------------------------------------------------------------------------------------------------------------
# Length bucketing (--medclip-text-bucket, issue 15)
# ----------------------------------------------------------------------------------------------------------------
def _word_tokenizer(texts):
    """[CLS] one id per word [SEP], zero-padded to 77 (pad id 0, like OpenCLIP's tokenizer)."""
    tokens = torch.zeros(len(texts), 77, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [101] + [1000 + len(word) for word in text.split()][:75] + [102]
        tokens[row, :len(ids)] = torch.tensor(ids)
    return tokens


def _synthetic_samples(count: int, seed: int = 0) -> list[dict]:
    """Paired samples with sentence lengths from 2 to 40 words (skewed short, like report sentences)."""
    rng = random.Random(seed)
    samples = []
    for i in range(count):
        words = min(40, 2 + int(rng.expovariate(1 / 8)))
        labels = torch.zeros(NUM_FINDINGS)
        labels[i % NUM_FINDINGS] = 1.0
        samples.append({"__key__": f"s{i:04d}", "image": i, "text": " ".join(["w" * (1 + i % 5)] * words),
                        "image_labels": labels, "text_labels": labels.roll(1)})
    return samples


def _bucketed_batches(samples: list[dict], pool: int, batch_size: int = 8, seed: int = 0, epoch: int = 0,
                      worker_batches: int | None = None, multiple: int = 1) -> list[tuple[list[int], torch.Tensor]]:
    """(image ids, packed texts) per batch from a pipeline shaped like the training tail: samples -> bucket (pool >
    0) -> batched (no partial batches) -> PackBatch, with `with_epoch(worker_batches)` (repeated passes) if given."""
    def to_sample(s):
        return s["image"], s.get("tokens", s["text"]), s["image_labels"], s["text_labels"]

    stages = [lambda: (dict(s) for s in samples)]
    if pool:
        stages.append(BucketByLength(_word_tokenizer, pool, batch_size, seed=seed, epoch=epoch,
                                     worker_batches=worker_batches))
    stages += [wds.map(to_sample), wds.batched(batch_size, partial=False), wds.map(PackBatch(_word_tokenizer,
                                                                                             multiple))]
    pipeline = wds.DataPipeline(*stages)
    if worker_batches:
        pipeline = pipeline.with_epoch(worker_batches)
    return [(list(images), packed) for images, packed in pipeline]


def _rows(batches) -> list[tuple]:
    """(image id, tokens without padding, image labels, text labels) per sample, sorted: the epoch's multiset."""
    rows = []
    for images, packed in batches:
        tokens, image_labels, text_labels = unpack_batch(packed)
        for i, image in enumerate(images):
            kept = tokens[i][tokens[i] != 0].tolist()
            rows.append((int(image), tuple(kept), tuple(image_labels[i].tolist()), tuple(text_labels[i].tolist())))
    return sorted(rows)


def test_bucketing_narrows_batches_and_keeps_the_epochs_samples():
    samples = _synthetic_samples(8 * 50 + 5)  # 50 full batches of 8 and 5 left over (dropped, as without bucketing)
    plain = _bucketed_batches(samples, pool=0)
    bucketed = _bucketed_batches(samples, pool=8)
    assert len(plain) == len(bucketed) == 50
    width = {name: sum(p.shape[1] for _, p in batches) / len(batches)
             for name, batches in (("plain", plain), ("bucketed", bucketed))}
    width_8 = sum(p.shape[1] for _, p in _bucketed_batches(samples, pool=8, multiple=8)) / 50
    assert width["bucketed"] < 0.8 * width["plain"] and width_8 < width["plain"]
    assert _rows(bucketed) == _rows(plain)  # same samples, each with its own tokens and labels
    by_image = {s["image"]: s for s in samples}
    for images, packed in bucketed:
        tokens, image_labels, text_labels = unpack_batch(packed)
        assert tokens.shape[1] == int((tokens != 0).sum(1).max())  # trimmed to the batch's longest (multiple 1)
        for i, image in enumerate(images):
            assert torch.equal(image_labels[i], by_image[int(image)]["image_labels"])
            assert torch.equal(text_labels[i], by_image[int(image)]["text_labels"])
            assert torch.equal(tokens[i], _word_tokenizer([by_image[int(image)]["text"]])[0, :tokens.shape[1]])


def test_bucketing_is_seeded_and_shuffles_the_batch_order():
    samples = _synthetic_samples(8 * 32)

    def key(batches):
        return [images for images, _ in batches]

    first = _bucketed_batches(samples, pool=8, seed=1)
    assert key(first) == key(_bucketed_batches(samples, pool=8, seed=1))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, _bucketed_batches(samples, pool=8, seed=1)))
    assert key(first) != key(_bucketed_batches(samples, pool=8, seed=2))
    assert key(first) != key(_bucketed_batches(samples, pool=8, seed=1, epoch=1))
    widths = [p.shape[1] for _, p in first[:8]]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # not served short-to-long


@pytest.mark.parametrize("count, worker_batches", [(8 * 40, 13), (8 * 5 + 3, 13)])
def test_bucketing_keeps_the_epochs_samples_under_with_epoch(count, worker_batches):
    """`with_epoch` cuts an epoch at the worker's batches, repeating passes over a short stream: the last pool is cut
    at the epoch's end and a pass that runs dry continues the epoch's quota, giving the samples seen without
    bucketing."""
    samples = _synthetic_samples(count)
    plain = _bucketed_batches(samples, pool=0, worker_batches=worker_batches)
    bucketed = _bucketed_batches(samples, pool=4, worker_batches=worker_batches)
    assert len(plain) == len(bucketed) == worker_batches and _rows(bucketed) == _rows(plain)
    stage = BucketByLength(_word_tokenizer, 4, 8, worker_batches=worker_batches)
    for _ in range(2):  # the next epoch (here: the same epoch value, iterated again) starts a fresh quota
        again = wds.DataPipeline(lambda: (dict(s) for s in samples), stage).with_epoch(worker_batches * 8)
        assert len(list(again)) == worker_batches * 8


def test_text_bucket_flag():
    assert text_bucket_for(SimpleNamespace()) == 0
    assert text_bucket_for(SimpleNamespace(medclip_text_bucket=16)) == 16
    with pytest.raises(UserError, match="text-bucket"):
        text_bucket_for(SimpleNamespace(medclip_text_bucket=-1))


@pytest.mark.parametrize("workers", [0, 2])
def test_bucketed_training_stream_keeps_batches_and_labels(small_shards, workers):
    import open_clip

    tokenizer = open_clip.get_tokenizer("medclip-tiny")

    def epoch(bucket):
        args = stream_args(small_shards["all"], medclip_text_multiple=1, medclip_text_bucket=bucket, workers=workers)
        info = get_medclip_wds_dataset(args, fake_image, True, tokenizer=tokenizer)
        batches = []
        for images, texts in info.dataloader:
            tokens, image_labels, text_labels = unpack_batch(texts)
            assert image_labels.shape == text_labels.shape == (4, NUM_FINDINGS)
            batches.append((images[:, 0, 0, 0].tolist(), texts))
        return info.dataloader.num_batches, batches

    plain_count, plain = epoch(0)
    count, bucketed = epoch(3)
    assert count == plain_count and len(bucketed) == len(plain) == 6
    assert _rows(bucketed) == _rows(plain)  # same pairs, texts and labels; only the batch composition changed
    assert epoch(3)[1][0][0] == bucketed[0][0]  # deterministic
    assert sum(t.shape[1] for _, t in bucketed) <= sum(t.shape[1] for _, t in plain)


def test_validation_stream_reads_every_image_once(small_shards):
    args = stream_args(None, val_data=small_shards["all"], val_num_samples=24)
    info = get_medclip_wds_dataset(args, fake_image, is_train=False, tokenizer=fake_tokenizer)
    batches = list(info.dataloader)
    assert sum(len(images) for images, _ in batches) == 24 and info.dataloader.num_batches == 6


def test_hand_edited_sample_is_caught_with_checksums(faulty_shards, caplog):
    path = faulty_shards["image"][0]
    member = [m for m in member_names(path) if m.endswith(".json")][0]
    rewrite_member(path, member, lambda data: data.replace(b"null", b"0", 1))  # still valid labels
    with caplog.at_level(logging.WARNING, logger="open_clip_medclip.streams"):
        info = get_medclip_wds_dataset(stream_args(faulty_shards["all"], train_num_samples=16), fake_image, True,
                                       tokenizer=fake_tokenizer)
        list(info.dataloader)
    assert not [r for r in caplog.records if "skipped sample" in r.getMessage()]  # default: no checksum list read
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="open_clip_medclip.streams"):
        info = get_medclip_wds_dataset(stream_args(faulty_shards["all"], train_num_samples=16,
                                             medclip_verify_checksums=True), fake_image, True, tokenizer=fake_tokenizer)
        list(info.dataloader)
    skip = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert skip and all("content differs from the checksum in the shard index" in m for m in skip)
