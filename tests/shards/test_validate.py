"""The validator: precise messages for broken shards, agreement with schema.json, the bundled examples."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from open_clip_medclip.shards import BuildOptions, build_shards, validate_shards
from open_clip_medclip.shards.index import index_problems
from open_clip_medclip.shards.validate import check_provenance, check_sample_json
from open_clip_medclip.sources import iter_nih
from tests.shards.conftest import REPO, SAMPLE


def tarballs_spec():
    """The spec package as installed, or straight from the checkout when the package is not installed."""
    try:
        return importlib.import_module("open_clip_medclip.tarballs_spec")
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location("open_clip_medclip.tarballs_spec",
                                                      REPO / "tarballs_spec" / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


@pytest.fixture
def good_folder(tmp_path) -> Path:
    import itertools

    build_shards(itertools.islice(iter_nih(SAMPLE / "nih_cxr14" / "labels.csv"), 3), tmp_path / "good",
                 BuildOptions(image_size=32, progress=False, uncertainty="zeros"))
    return tmp_path / "good"


def rewrite_member(tar_path: Path, member: str, change) -> None:
    """Rewrite one member of a shard (change(bytes) -> bytes, or None to drop it)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == member:
                data = change(data)
                if data is None:
                    continue
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def problems(folder: Path) -> list[str]:
    return [str(p) for p in validate_shards(folder).problems]


def test_good_folder_and_examples_pass(good_folder):
    assert problems(good_folder) == []
    spec = tarballs_spec()
    report = spec.validate_shards(spec.EXAMPLES_DIR)
    assert report.ok and report.kinds == {"image": 6, "text": 4}
    assert sum(p.stat().st_size for p in spec.EXAMPLES_DIR.iterdir()) < 200_000


def _json_change(function):
    def change(data: bytes) -> bytes:
        document = json.loads(data)
        function(document)
        return json.dumps(document).encode()
    return change


@pytest.mark.parametrize("member,change,expected", [
    ("nih__00000061_015__image.json", _json_change(lambda d: d["labels"].pop()),
     "nih__00000061_015__image.json: labels: expected 14 label values, got 13"),
    ("nih__00000061_015__image.json", _json_change(lambda d: d["labels"].__setitem__(7, 2)),
     "labels[7] (Pneumonia): 2 is not a label value (allowed: 1, 0, -1 or blank)"),
    ("nih__00000061_015__image.json", _json_change(lambda d: d["labels"].__setitem__(8, -1)),
     "labels: Atelectasis not allowed under label policy 'zeros'"),
    ("nih__00000061_015__image.json", _json_change(lambda d: d.__setitem__("id", "other")),
     "is not the key of source 'nih', id 'other'"),
    ("nih__00000061_015__image.json", _json_change(lambda d: d.__setitem__("sentences", [{"text": "x"}])),
     "sentences must be [] for kind image"),
    ("nih__00000061_015__image.json", lambda data: None, "nih__00000061_015__image.*: sample has no .json member"),
    ("nih__00000061_015__image.jpg", lambda data: data[:100], "nih__00000061_015__image.jpg: does not decode"),
    ("nih__00000061_015__image.jpg", lambda data: _rgb_jpeg(), "image mode is RGB"),
    ("nih__00000061_015__image.jpg", lambda data: _gray_jpeg(48, 40),
     "nih__00000061_015__image.jpg: image is 48x40, longer side above provenance image.longer_side 32"),
])
def test_broken_member_gives_precise_message(good_folder, member, change, expected):
    shard = good_folder / "shard-000000.tar"
    rewrite_member(shard, member, change)
    found = problems(good_folder)
    assert any(expected in p and str(shard) in p for p in found), found


def _rgb_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _gray_jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_decoded_image_problems_is_the_one_image_check():
    """The mode and size checks `validate` runs after its decode (and the training stream after its own)."""
    from open_clip_medclip.shards.validate import decoded_image_problems

    assert decoded_image_problems("k.jpg", Image.new("L", (32, 20)), 32) == []
    assert decoded_image_problems("k.jpg", Image.new("L", (64, 20)), None) == []  # no recorded size: not checked
    found = decoded_image_problems("k.jpg", Image.new("RGB", (40, 20)), 32, shard="s.tar")
    assert [str(p) for p in found] == [
        "s.tar: k.jpg: image mode is RGB; the spec stores 8-bit grayscale (L)",
        "s.tar: k.jpg: image is 40x20, longer side above provenance image.longer_side 32"]


def test_folder_level_problems(good_folder):
    sizes = good_folder / "sizes.json"
    sizes.write_text(json.dumps({"shard-000000.tar": 2, "shard-000009.tar": 1}))
    (good_folder / "rejects.jsonl").write_text('{"reason": "oops"}\n')
    found = problems(good_folder)
    assert f"{sizes}: lists shard-000009.tar, which does not exist" in found
    assert f"{sizes}: shard-000000.tar: says 2 samples, the tar has 3" in found
    assert any("rejects.jsonl: line 1: needs source, id, reason, detail and input" in p for p in found)
    assert any("counts.rejected is 0, rejects.jsonl has 1 lines" in p for p in found)


SAMPLE_DOCUMENT = {"kind": "paired", "id": "a", "source": "s", "labels": [1, 0, -1, None] + [0] * 10,
                   "sentences": [{"text": "x", "labels": [0] * 14}], "meta": {}}


def _variants() -> list[dict]:
    variants = [SAMPLE_DOCUMENT]
    for edit in (lambda d: d.pop("meta"), lambda d: d.__setitem__("kind", "video"),
                 lambda d: d.__setitem__("id", ""), lambda d: d["labels"].__setitem__(0, 0.5),
                 lambda d: d["labels"].__setitem__(0, True), lambda d: d["labels"].append(0),
                 lambda d: d.__setitem__("extra", 1), lambda d: d["sentences"][0].pop("labels"),
                 lambda d: d.__setitem__("kind", "image"), lambda d: d.__setitem__("meta", []),
                 lambda d: d["sentences"][0].__setitem__("text", "")):
        document = copy.deepcopy(SAMPLE_DOCUMENT)
        edit(document)
        variants.append(document)
    return variants


def test_hand_written_checks_agree_with_schema_json(good_folder):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (test extra)")
    schema = tarballs_spec().load_schema()
    sample_validator = jsonschema.Draft202012Validator({**schema, "$ref": "#/$defs/sample"})
    for document in _variants():
        assert sample_validator.is_valid(document) == (not check_sample_json(document)), document
    provenance_validator = jsonschema.Draft202012Validator({**schema, "$ref": "#/$defs/provenance"})
    provenance = json.loads((good_folder / "provenance.json").read_text())
    assert provenance_validator.is_valid(provenance) and not check_provenance(provenance)
    for key, bad in (("spec_version", 2), ("labeler", {"name": "x"}), ("uncertainty_policy", "maybe"),
                     ("image", {"format": "gif", "longer_side": 3})):
        broken = {**provenance, key: bad}
        assert not provenance_validator.is_valid(broken) and check_provenance(broken), key
    with tarfile.open(good_folder / "shard-000000.tar") as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                assert sample_validator.is_valid(json.loads(tar.extractfile(member).read()))
    index_validator = jsonschema.Draft202012Validator({**schema, "$ref": "#/$defs/index"})
    index = json.loads((good_folder / "index.json").read_text())
    assert index_validator.is_valid(index) and not index_problems(index)
    for key, bad in (("index_version", 2), ("label_policy", "maybe"), ("shards", {"x.tar": {"samples": 1,
                                                                                          "kinds": {"image": 1}}}),
                     ("bank", {"file": "../bank.npz", "entries": 1, "sha256": "0" * 64})):
        broken = {**index, key: bad}
        assert not index_validator.is_valid(broken) and index_problems(broken), key
    line_validator = jsonschema.Draft202012Validator({**schema, "$ref": "#/$defs/checksums_line"})
    for line in (good_folder / "index-samples.jsonl").read_text().splitlines():
        assert line_validator.is_valid(json.loads(line))
