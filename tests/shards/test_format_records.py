"""Issue 23 (item 4): the shard format has one owner, `shards/format.py` — the typed provenance record, the URL
scheme test and opener — and "part I of N" one written shape (`parts.part_json`), with the older one still read."""
from __future__ import annotations

import json
from pathlib import Path

from open_clip_medclip.parts import part_json, read_part
from open_clip_medclip.shards.format import Provenance, dump_json, open_url, url_scheme
from open_clip_medclip.shards.index import ShardInfo, parse_index
from open_clip_medclip.shards.validate import check_provenance

EXAMPLES = Path(__file__).resolve().parents[2] / "tarballs_spec" / "examples"


def test_provenance_record_rewrites_the_example_byte_for_byte():
    data = (EXAMPLES / "provenance.json").read_bytes()
    record = Provenance.from_json(json.loads(data))
    assert record.longer_side == 64 and record.part is None and record.merged_from is None
    assert record.labeler is None and b'"labeler": null' in data  # null is written; an absent part is not
    assert (dump_json(record.to_json(), indent=2) + "\n").encode() == data


def test_part_is_written_as_index_count_and_read_in_both_shapes():
    document = json.loads((EXAMPLES / "provenance.json").read_text(encoding="utf-8"))
    for part in ({"index": 2, "count": 3}, {"index": 2, "of": 3}):  # the labeler wrote {index, of} before
        record = Provenance.from_json({**document, "part": part})
        assert record.part == (2, 3)
        assert record.to_json()["part"] == part_json((2, 3)) == {"index": 2, "count": 3}
    assert check_provenance(Provenance.from_json({**document, "part": {"index": 2, "of": 3}}).to_json()) == []
    assert check_provenance({**document, "part": {"index": 2, "of": 3}})  # shards are only written {index, count}
    for malformed in ({"index": 4, "count": 3}, {"index": True, "count": 2}, {"index": 1}, [1, 2], "1/2"):
        assert read_part(malformed) is None, malformed


def test_provenance_reads_partial_or_odd_files_without_raising():
    assert Provenance.from_json({}).longer_side is None
    assert Provenance.from_json({"image": {"longer_side": True}}).longer_side is None
    assert Provenance.from_json({"image": "64"}).longer_side is None
    assert Provenance.from_json({"image": {"longer_side": 256}}).longer_side == 256


def test_index_entries_round_trip():
    data = (EXAMPLES / "index.json").read_bytes()
    index = parse_index(data, str(EXAMPLES / "index.json"))
    document = json.loads(data)
    for name, info in index.shards.items():
        assert info.to_json() == document["shards"][name]
        assert ShardInfo.from_json(name, info.to_json()) == info
    assert sum(info.image_samples for info in index.shards.values()) == document["kinds"]["image"]


def test_one_scheme_test_and_opener(tmp_path):
    cases = {"/data/shard-000000.tar": "", "shards/a.tar": "", "C:\\data\\a.tar": "", "file:/data/a.tar": "file",
             "HTTP://host/a.tar": "http", "https://host/a.tar": "https", "pipe:cat a.tar": "pipe",
             "s3://bucket/a.tar": "s3", "memory://a.tar": "memory"}
    assert {url: url_scheme(url) for url in cases} == cases
    path = tmp_path / "blob.bin"
    path.write_bytes(b"shard bytes")
    for url in (str(path), f"file:{path}"):
        handle = open_url(url)
        try:
            assert handle.read() == b"shard bytes"
        finally:
            handle.close()


def test_the_host_opener_uses_the_library_scheme_test():
    source = (Path(__file__).resolve().parents[2] / "plugins" / "openclip_data.py").read_text(encoding="utf-8")
    assert "urlparse" not in source and "gopen_schemes" not in source
    assert "shard_format.url_scheme(" in source and "shard_format.open_url(" in source
