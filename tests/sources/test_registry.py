"""The one source registry: every name builds shards (`medclip shards build`) and, where it applies, an eval suite's
raw records; old names resolve as aliases; an unknown name is a one-line error."""
from __future__ import annotations

import json
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
from PIL import Image

from open_clip_medclip.errors import UserError
from open_clip_medclip.eval.suites.build import build_suite, iter_raw_records
from open_clip_medclip.eval.suites.definitions import SuiteError, load_definition
from open_clip_medclip.findings import CHEXPERT_FINDINGS
from open_clip_medclip.shards.cli import main as shards_main
from open_clip_medclip.sources import SAMPLE_DATA_DIR, Record
from open_clip_medclip.sources.registry import ALIASES, SOURCES, canonical_name, get_source, suite_names

DICOM = next((SAMPLE_DATA_DIR / "odd_inputs").glob("*.dcm"))


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (48, 40), 90).save(path)


def _fixture(name: str, tmp: Path) -> tuple[list[str], Path]:
    """(`shards build` flags, raw path for a suite) of a tiny dataset in the source's real layout."""
    tmp.mkdir(parents=True, exist_ok=True)
    if name == "chexpert":
        _png(tmp / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
        csv = tmp / "CheXpert-v1.0-small" / "train.csv"
        csv.write_text("Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_FINDINGS) + "\n"
                       "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,F,68,Frontal,AP,1.0"
                       + "," * 13 + "\n")
        return ["--csv", str(csv), "--root", str(tmp)], csv.parent
    if name == "mimic":
        (tmp / "mimic-cxr-2.0.0-chexpert.csv").write_text(
            "subject_id,study_id," + ",".join(CHEXPERT_FINDINGS) + "\n10000032,50414267,1.0" + "," * 13 + "\n")
        (tmp / "mimic-cxr-2.0.0-metadata.csv").write_text(
            "dicom_id,subject_id,study_id,ViewPosition\n02aa804e-bde0afdd,10000032,50414267,PA\n")
        _png(tmp / "files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg")
        return ["--labels", str(tmp / "mimic-cxr-2.0.0-chexpert.csv"), "--metadata",
                str(tmp / "mimic-cxr-2.0.0-metadata.csv"), "--root", str(tmp)], tmp
    if name == "nih":
        csv = SAMPLE_DATA_DIR / "nih_cxr14" / "labels.csv"
        return ["--csv", str(csv), "--root", str(csv.parent), "--limit", "2"], csv.parent
    if name == "rsna":
        patient = DICOM.stem
        (tmp / "stage_2_train_images").mkdir()
        shutil.copy(DICOM, tmp / "stage_2_train_images" / DICOM.name)
        csv = tmp / "stage_2_train_labels.csv"
        csv.write_text(f"patientId,x,y,width,height,Target\n{patient},,,,,0\n")
        return ["--csv", str(csv), "--root", str(tmp / "stage_2_train_images")], tmp
    if name == "covid":
        _png(tmp / "COVID" / "images" / "COVID-1.png")
        _png(tmp / "Normal" / "images" / "Normal-1.png")
        return ["--root", str(tmp)], tmp
    if name == "pediatric":
        root = SAMPLE_DATA_DIR / "kermany_pediatric"
        return ["--root", str(root), "--limit", "2"], root
    if name == "generic-csv":
        _png(tmp / "a.png")
        (tmp / "table.csv").write_text("image,Edema\na.png,1\n")
        (tmp / "suite.csv").write_text("image,label\na.png,Edema\n")
        return ["--csv", str(tmp / "table.csv"), "--image-column", "image", "--root", str(tmp)], tmp
    if name == "iu-reports":
        return ["--reports", str(SAMPLE_DATA_DIR / "iu_reports" / "NLMCXR_reports.tgz"), "--limit", "2"], tmp
    if name == "labelled-csv":
        return ["--csv", str(SAMPLE_DATA_DIR / "chexpert_labeler" / "labeled_reports.csv"), "--limit", "2"], tmp
    raise AssertionError(name)


def test_names_are_one_set():
    assert list(SOURCES) == ["chexpert", "mimic", "nih", "rsna", "covid", "pediatric", "generic-csv", "iu-reports",
                             "labelled-csv"]
    assert set(suite_names()) == set(SOURCES) - {"iu-reports", "labelled-csv"}
    assert not set(ALIASES) & set(SOURCES)
    for alias, name in ALIASES.items():
        assert canonical_name(alias) == name and get_source(alias) is SOURCES[name]
    for path in sorted((Path(__file__).resolve().parents[2] / "eval_suites").glob("*.json")):
        fmt = load_definition(path)["source"]["format"]
        assert fmt in SOURCES, f"{path.name} uses {fmt!r}, not a registry name"


@pytest.mark.parametrize("name", [n for n in SOURCES if n != "iu-reports"])  # iu-reports needs the labeler
def test_every_source_builds_shards(name, tmp_path, capsys):
    flags, _ = _fixture(name, tmp_path / "raw")
    out = tmp_path / "shards"
    assert shards_main(["build", "--source", name, "--out", str(out), "--no-progress", *flags]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["written"] >= 1, summary


def test_iu_reports_items_without_a_build(tmp_path):
    flags, _ = _fixture("iu-reports", tmp_path)
    options = Namespace(reports=Path(flags[1]), text_column="Reports", id_column=None, source_name=None)
    assert any(isinstance(item, Record) and item.report_text for item in get_source("iu-reports").items(options))


@pytest.mark.parametrize("name", suite_names())
def test_every_suite_source_reads_raw_records(name, tmp_path):
    _, raw = _fixture(name, tmp_path)
    records = [item for item in iter_raw_records({"name": "t", "source": {"format": name}}, raw)
               if isinstance(item, Record)]
    assert records and all(Path(r.image_path).is_file() for r in records[:5])


def test_alias_builds_the_same_suite(tmp_path):
    definition = load_definition("pediatric-pneumonia")
    canonical = build_suite(definition, "sample", tmp_path / "canonical", progress=False)
    old = dict(definition, source=dict(definition["source"], format="kermany"))
    aliased = build_suite(old, "sample", tmp_path / "alias", progress=False)
    assert aliased.manifest_sha256 == canonical.manifest_sha256


def test_unknown_source_is_one_line(tmp_path, capsys):
    assert shards_main(["build", "--source", "nih-cxr14", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown source 'nih-cxr14' (did you mean" in err and "nih_cxr14" in err
    with pytest.raises(UserError, match=r"^unknown source 'kermani' \(did you mean: kermany"):
        get_source("kermani")
    with pytest.raises(SuiteError, match=r"suite 't': unknown source 'folders'"):
        list(iter_raw_records({"name": "t", "source": {"format": "folders"}}, tmp_path))


def test_missing_flag_names_the_source(tmp_path, capsys):
    assert shards_main(["build", "--source", "kermany", "--out", str(tmp_path)]) == 2
    assert "--source pediatric needs --root" in capsys.readouterr().err
