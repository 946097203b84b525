"""The shard index (issue 12) and content checksums / shard-side label faults (issue 11), on real sample data."""
from __future__ import annotations

import csv
import functools
import http.server
import itertools
import json
import tarfile
import threading
from pathlib import Path

import pytest

from open_clip_medclip.errors import UserError
from open_clip_medclip.findings import CHEXPERT_FINDINGS
from open_clip_medclip.parts import parse_part, part_of
from open_clip_medclip.shards import BuildOptions, build_shards, validate_shards
from open_clip_medclip.shards.cli import main as shards_main
from open_clip_medclip.shards.index import (
    BANK_FILE,
    CHECKSUMS_FILE,
    INDEX_FILE,
    ShardIndexError,
    index_url,
    read_index,
    sample_checksum,
)
from open_clip_medclip.shards.merge import merge_builds, write_index
from open_clip_medclip.shards.validate import check_sample
from open_clip_medclip.sources import iter_generic_csv, iter_labelled_csv, iter_nih
from tests.shards.conftest import SAMPLE
from tests.shards.test_validate import rewrite_member

LABELLED = SAMPLE / "chexpert_labeler" / "labeled_reports.csv"
NIH = SAMPLE / "nih_cxr14" / "labels.csv"


def options(**kw) -> BuildOptions:
    return BuildOptions(**{"samples_per_shard": 4, "image_size": 32, "progress": False, **kw})


def mixed_items(tmp_path: Path, n_nih: int = 10):
    """Images, labelled reports (bank sentences) and inputs that are rejected (bad label, missing image, dup)."""
    bad = tmp_path / "bad.csv"
    if not bad.exists():
        bad.write_text("image,Edema\n00000061_015.jpg,nan\nabsent.jpg,1\n00000261_007.jpg,1\n00000261_007.jpg,0\n")
    return itertools.chain(
        itertools.islice(iter_nih(NIH), n_nih),
        iter_labelled_csv(LABELLED),
        iter_generic_csv(bad, "image", {"Edema": "Edema"}, root=SAMPLE / "nih_cxr14" / "images", source="bad"),
    )


@pytest.fixture
def built(tmp_path) -> Path:
    build_shards(mixed_items(tmp_path), tmp_path / "out", options(kinds=("image", "text")))
    return tmp_path / "out"


def json_members(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return [name for name in tar.getnames() if name.endswith(".json")]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_index_agrees_with_shards_and_records_the_policy(built):
    index = read_index(str(built))
    sizes = json.loads((built / "sizes.json").read_text())
    provenance = json.loads((built / "provenance.json").read_text())
    assert {name: info.samples for name, info in index.shards.items()} == sizes
    assert index.samples == provenance["counts"]["written"] and index.kinds == provenance["kinds"]
    assert index.label_policy == provenance["uncertainty_policy"] == "raw"  # raw codes are the default
    assert index.spec_version == provenance["spec_version"] == 1
    bank = index.bank_arrays()
    texts = {bank.text(i) for i in range(len(bank))}
    assert len(texts) == len(bank) == 4 and all(bank.kinds == 2) and bank.codes.dtype.name == "int8"
    assert -2 in bank.codes and -1 in bank.codes  # blanks and uncertain kept raw
    assert sum(len(keys) for keys in index.sample_checksums().values()) == index.samples
    assert validate_shards(built).ok
    # the index command on the same shards writes the same bytes as the build did
    before = folder_bytes(built)
    for name in (INDEX_FILE, BANK_FILE, CHECKSUMS_FILE):
        (built / name).unlink()
    assert any("index.json: missing; write it with 'medclip shards index" in str(p)
               for p in validate_shards(built).problems)
    assert shards_main(["index", str(built)]) == 0
    assert folder_bytes(built) == before


def test_policy_recorded_when_not_raw(tmp_path):
    build_shards(iter_labelled_csv(LABELLED), tmp_path / "z", options(kinds=("text",), uncertainty="zeros"))
    index = read_index(str(tmp_path / "z"))
    assert index.label_policy == "zeros" and set(index.bank_arrays().codes.ravel().tolist()) <= {0, 1}


def test_hand_edit_that_keeps_labels_valid_is_caught(built):
    shard = built / "shard-000000.tar"
    member = json_members(shard)[0]
    key = member[:-5]

    def flip(data: bytes) -> bytes:  # a valid edit: a blank label becomes 1
        document = json.loads(data)
        document["labels"][document["labels"].index(None) if None in document["labels"] else 0] = 1.0
        return json.dumps(document, sort_keys=True).encode()

    rewrite_member(shard, member, flip)
    found = [str(p) for p in validate_shards(built).problems]
    assert found == [f"{shard}: {key}.*: content differs from the checksum in the shard index (edited after the "
                     "build?)"]


def test_edited_text_sample_breaks_checksum_and_bank(built):
    shard = next(name for name, info in read_index(str(built)).shards.items() if info.kinds.get("text"))
    members = [n for n in json_members(built / shard) if n.endswith("__text.json")]

    def reword(data: bytes) -> bytes:
        document = json.loads(data)
        document["sentences"][0]["text"] = "edited by hand."
        return json.dumps(document).encode()

    rewrite_member(built / shard, members[0], reword)
    found = [str(p) for p in validate_shards(built).problems]
    assert any(members[0][:-5] + ".*: content differs from the checksum" in p for p in found), found
    assert any("index-bank.npz: the sentence bank differs from the sentences in the shards" in p for p in found)


@pytest.mark.parametrize("bad, expected", [
    (float("nan"), "NaN is not a label value"),
    ("1", "'1' is a str, not a number"),
])
def test_nan_and_string_labels_in_a_shard_are_rejected_by_validate_and_check_sample(built, bad, expected):
    shard = built / "shard-000000.tar"
    member = json_members(shard)[0]
    key = member[:-5]

    def poison(data: bytes) -> bytes:
        document = json.loads(data)
        document["labels"][5] = bad
        return json.dumps(document).encode()  # json.dumps writes NaN for float('nan')

    rewrite_member(shard, member, poison)
    found = [str(p) for p in validate_shards(built).problems]
    assert f"{shard}: {member}: labels[5] (Edema): {expected}" in " | ".join(found), found
    with tarfile.open(shard) as tar:
        members = {n.split(".", 1)[1]: tar.extractfile(n).read() for n in tar.getnames() if n.startswith(key + ".")}
    document, problems = check_sample(key, {"__key__": key, "__url__": str(shard), **members}, shard=str(shard))
    assert document is not None and [str(p) for p in problems] == [
        f"{shard}: {member}: labels[5] (Edema): {expected}" + (
            " (blank is null / an empty cell)" if expected.startswith("NaN") else
            " (allowed: 1, 0, -1 or blank)")]


def test_check_sample_is_cheap_and_optional_checksum(built):
    index = read_index(str(built))
    name, checksums = next(iter(index.sample_checksums().items()))
    with tarfile.open(built / name) as tar:
        samples: dict[str, dict[str, bytes]] = {}
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for key, members in samples.items():
        document, problems = check_sample(key, members, shard=name, checksum=checksums[key])
        assert problems == [] and document["kind"] in ("image", "text")
        assert sample_checksum(members) == checksums[key]
        members = {**members, "json": members["json"].replace(b'"meta":{', b'"meta":{"x":1,', 1)}
        assert "checksum" in str(check_sample(key, members, shard=name, checksum=checksums[key])[1][0])
        assert check_sample(key, members, shard=name)[1] == []  # checksum only when asked for


def test_read_index_never_opens_shards_and_takes_urls(built, tmp_path):
    for tar in built.glob("*.tar"):
        tar.unlink()  # reading the index (and its bank/checksums) must not need a single shard
    local = read_index(str(built))
    assert read_index(str(built / INDEX_FILE)).samples == local.samples
    assert read_index(f"file://{built}").samples == local.samples
    assert read_index(f"pipe:cat {built}/{INDEX_FILE}").bank_arrays().entries() == local.bank_arrays().entries()
    assert index_url(f"pipe:cat {built}/shard-{{000000..000004}}.tar") == f"pipe:cat {built}/{INDEX_FILE}"
    assert index_url("s3://bucket/x/nih-000000.tar") == "s3://bucket/x/index.json"
    fsspec = pytest.importorskip("fsspec")
    for name in (INDEX_FILE, BANK_FILE, CHECKSUMS_FILE):
        with fsspec.open(f"memory://medclip-test/{name}", "wb") as handle:
            handle.write((built / name).read_bytes())
    assert read_index("memory://medclip-test").sample_checksums() == local.sample_checksums()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(built))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = read_index(url)
        assert remote.bank_arrays().entries() == local.bank_arrays().entries()
        assert remote.shard_url("shard-000000.tar") == f"{url}/shard-000000.tar"
        with pytest.raises(ShardIndexError, match="127.0.0.1"):
            read_index(url + "/nowhere")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ShardIndexError, match="not found; write it with 'medclip shards index DIR'"):
        read_index(str(tmp_path / "empty"))


def test_tampered_companion_file_is_named(built):
    (built / BANK_FILE).write_bytes((built / BANK_FILE).read_bytes() + b"\0")
    with pytest.raises(ShardIndexError, match="index-bank.npz: sha256 differs"):
        read_index(str(built)).bank_arrays()
    assert any("sha256 differs" in str(p) for p in validate_shards(built).problems)


def test_index_command_refuses_broken_shards(built):
    (built / INDEX_FILE).unlink()
    rewrite_member(built / "shard-000000.tar", json_members(built / "shard-000000.tar")[0],
                   lambda data: data.replace(b"null", b"NaN", 1))
    with pytest.raises(ShardIndexError, match=r"not indexed, the build has 1 problem\(s\), first: .*NaN"):
        write_index(built)


def _summary(folder: Path) -> dict:
    index = read_index(str(folder))
    provenance = json.loads((folder / "provenance.json").read_text())
    return {
        "samples": sorted((key, checksum) for shard in index.sample_checksums().values()
                          for key, checksum in shard.items()),
        "bank": index.bank_arrays().entries(),
        "kinds": index.kinds, "policy": index.label_policy,
        "counts": provenance["counts"], "reasons": provenance["reject_reasons"],
        "sources": provenance["sources"],
        "rejects": sorted((folder / "rejects.jsonl").read_text().splitlines()),
    }


def test_n_part_build_merged_equals_single_build(tmp_path):
    single = build_shards(mixed_items(tmp_path), tmp_path / "single", options(kinds=("image", "text")))
    assert single.rejected >= 3  # NaN label, missing image, duplicate id
    parts = []
    for i in (1, 2, 3):
        part = tmp_path / f"p{i}"
        summary = build_shards(mixed_items(tmp_path), part, options(kinds=("image", "text"), part=(i, 3)))
        assert summary.inputs == summary.written + summary.rejected
        assert all(f"-part{i:03d}of003-" in p.name for p in part.glob("*.tar"))
        assert validate_shards(part).ok
        parts.append(part)
    assert sum(read_index(str(p)).samples for p in parts) == single.written
    merged = merge_builds(parts, tmp_path / "merged")
    assert (merged.inputs, merged.written, merged.rejected) == (single.inputs, single.written, single.rejected)
    report = validate_shards(tmp_path / "merged")
    assert report.ok, [str(p) for p in report.problems]
    assert _summary(tmp_path / "merged") == _summary(tmp_path / "single")


def test_merge_refuses_incomplete_or_mismatched_parts(tmp_path):
    for i in (1, 2):
        build_shards(itertools.islice(iter_nih(NIH), 6), tmp_path / f"p{i}", options(part=(i, 2)))
    build_shards(itertools.islice(iter_nih(NIH), 6), tmp_path / "z", options(part=(2, 2), uncertainty="zeros"))
    with pytest.raises(UserError, match=r"missing part\(s\) 2/2"):
        merge_builds([tmp_path / "p1"], tmp_path / "m1")
    with pytest.raises(UserError, match="uncertainty_policy is 'zeros' but"):
        merge_builds([tmp_path / "p1", tmp_path / "z"], tmp_path / "m2")
    with pytest.raises(UserError, match="part 1/2 is also"):
        merge_builds([tmp_path / "p1", tmp_path / "p1"], tmp_path / "m3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        merge_builds([tmp_path / "p1", tmp_path / "p2"], tmp_path / "full")


def test_cli_part_and_merge(tmp_path, capsys):
    base = ["build", "--source", "nih", "--csv", str(NIH), "--limit", "9", "--image-size", "32", "--no-progress",
            "--samples-per-shard", "3"]
    assert shards_main([*base, "--out", str(tmp_path / "single")]) == 0
    for i in (1, 2):
        assert shards_main([*base, "--out", str(tmp_path / f"p{i}"), "--part", f"{i}/2"]) == 0
    capsys.readouterr()
    assert shards_main(["merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out", str(tmp_path / "m")]) == 0
    assert "9 inputs = 9 written + 0 rejected" in capsys.readouterr().err
    assert shards_main(["validate", str(tmp_path / "m")]) == 0
    assert _summary(tmp_path / "m") == _summary(tmp_path / "single")
    assert shards_main([*base, "--out", str(tmp_path / "x"), "--part", "3/2"]) == 2
    assert "--part '3/2': I must lie in 1..N" in capsys.readouterr().err


def test_part_split_is_deterministic_and_total():
    ids = [f"nih\0{n:05d}" for n in range(300)]
    parts = [part_of(identity, 4) for identity in ids]
    assert parts == [part_of(identity, 4) for identity in ids] and set(parts) == {1, 2, 3, 4}
    assert parse_part("2/8") == (2, 8) and parse_part(None) is None
    for bad in ("0/4", "5/4", "a/b", "1-4"):
        with pytest.raises(UserError, match="--part"):
            parse_part(bad)


def test_labelled_csv_with_a_huge_report_builds(tmp_path):
    """`medclip label`'s output format with one report over the csv module's 128 KB default field limit."""
    table = tmp_path / "labelled.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Reports", *CHEXPERT_FINDINGS])
        writer.writerow(["Mild cardiomegaly. " * 10_000, "", "", "1.0"] + [""] * 11)
        writer.writerow(["No effusion.", "1.0"] + [""] * 13)
    summary = build_shards(iter_labelled_csv(table), tmp_path / "out", options(kinds=("text",)))
    assert (summary.inputs, summary.written, summary.rejected) == (2, 2, 0)
    assert validate_shards(tmp_path / "out").ok
    bank = read_index(str(tmp_path / "out")).bank_arrays()
    assert max(len(bank.text(i)) for i in range(len(bank))) > 128 * 1024


def test_tar_cut_at_a_member_boundary_is_reported(built):
    shard = built / "shard-000000.tar"
    recorded = read_index(str(built)).shards[shard.name].samples
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    last_key = members[-1].name.split(".")[0]
    cut = next(m for m in members if m.name.split(".")[0] == last_key)  # first member of the last sample
    shard.write_bytes(shard.read_bytes()[:cut.offset])  # no end-of-archive blocks: a plain cut
    found = [str(p) for p in validate_shards(built).problems]
    # one problem, on the shard, with counts; sizes.json and the index describe the whole shard: not blamed
    assert found == [f"{shard}: truncated tar (no end-of-archive blocks: cut at a member boundary; {cut.offset} "
                     f"bytes): {recorded - 1} complete samples readable, 1 of the {recorded} samples the index lists "
                     f"are missing (first missing: {last_key}); restore the file or rebuild the shards (the index "
                     "and sizes.json describe the whole shard)"], found


def test_tar_cut_mid_member_is_reported_once_with_counts(built):
    """Issue 24: a shard cut inside a member is one problem with counts; the intact sizes.json, index.json and
    provenance.json are not blamed, and the sample the cut took is not reported member by member."""
    shards = sorted(built.glob("*.tar"))
    shard = shards[0]
    index = read_index(str(built))
    recorded = index.shards[shard.name].samples
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    middle = members[len(members) // 2]
    shard.write_bytes(shard.read_bytes()[:middle.offset_data + middle.size // 2])  # inside a member's data
    report = validate_shards(built)
    found = [str(p) for p in report.problems]
    assert len(found) == 1 and found[0].startswith(f"{shard}: truncated tar (unexpected end of data; "), found
    readable = int(found[0].split("bytes): ")[1].split(" complete")[0])
    assert f"{readable} complete samples readable, {recorded - readable} of the {recorded} samples the index " \
           "lists are missing (first missing: " in found[0]
    assert 0 < readable < recorded and report.samples == sum(index.shards[s.name].samples for s in shards) - \
        (recorded - readable)
