"""Suite building: determinism, recipes on synthetic raw data in the real formats, missing and corrupt images."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from open_clip_medclip.eval.suites.build import build_suite
from open_clip_medclip.eval.suites.definitions import MANIFEST_NAME, SuiteError, csv_definition, load_definition
from open_clip_medclip.eval.suites.load import load_suite
from open_clip_medclip.findings import CHEXPERT_COMPETITION_FINDINGS, CHEXPERT_FINDINGS


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _jpeg(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value % 256, np.uint8), mode="L").save(path, quality=95)


def test_build_twice_gives_the_same_manifest_hash(tmp_path, tiny_nih_definition):
    first = build_suite(tiny_nih_definition, "sample", tmp_path / "a", progress=False)
    second = build_suite(tiny_nih_definition, "sample", tmp_path / "b", progress=False)
    assert first.manifest_sha256 == second.manifest_sha256
    assert (tmp_path / "a/wds/test/0.tar").read_bytes() == (tmp_path / "b/wds/test/0.tar").read_bytes()
    record = read_json(tmp_path / "a/suite.json")
    assert record["build"]["manifest_sha256"] == first.manifest_sha256
    assert first.counts["test"] == {"No Finding": 6, "Pneumonia": 6}
    wds = tmp_path / "a/wds"
    assert (wds / "classnames.txt").read_text().split("\n")[:2] == ["No Finding", "Pneumonia"]
    assert (wds / "test/nshards.txt").read_text().strip() == "4"  # at least CLIP_benchmark's default 4 workers
    assert set(read_json(wds / "custom_templates.json")["wds/nih-tiny"]) == {"No Finding", "Pneumonia"}


def test_packaged_sample_suites_use_the_heldout_split(tmp_path):
    result = build_suite("pediatric-pneumonia", "sample", tmp_path / "ped", progress=False)
    assert result.counts["test"] == {"Normal": 100, "Pneumonia": 100}
    assert result.counts["train"] == {"Normal": 200, "Pneumonia": 200}


def test_missing_image_in_manifest_is_a_clear_error(tiny_suite, tmp_path):
    copy = tmp_path / "suite"
    shutil.copytree(tiny_suite, copy)
    victim = sorted((copy / "images").iterdir())[0]
    victim.unlink()
    suite = load_suite(copy)
    with pytest.raises(FileNotFoundError, match=victim.stem):
        suite.check_images()


def test_corrupt_image_is_rejected_and_counted_at_build(tmp_path):
    for i in range(4):
        _jpeg(tmp_path / f"img{i}.jpg", 40 * i)
    (tmp_path / "img2.jpg").write_bytes(b"\xff\xd8not a jpeg")
    with open(tmp_path / "suite.csv", "w") as handle:
        handle.write("image,label\n" + "".join(f"img{i}.jpg,{lab}\n" for i, lab in enumerate(["cat", "dog", "cat", "dog"])))
    result = build_suite(csv_definition(tmp_path / "suite.csv"), tmp_path / "suite.csv", tmp_path / "out",
                           progress=False)
    assert result.num_rejected == 1 and result.counts["test"] == {"cat": 1, "dog": 2}
    rejects = (tmp_path / "out/rejects.jsonl").read_text()
    assert "img2" in rejects and "corrupt_image" in rejects


def test_missing_raw_image_stops_the_build_naming_it(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    (tmp_path / "suite.csv").write_text("image,label\na.jpg,x\nb.jpg,y\n")
    with pytest.raises(SuiteError, match="b.jpg"):
        build_suite(csv_definition(tmp_path / "suite.csv"), tmp_path / "suite.csv", tmp_path / "out", progress=False)
    result = build_suite(csv_definition(tmp_path / "suite.csv"), tmp_path / "suite.csv", tmp_path / "out2",
                           skip_missing=True, progress=False)
    assert result.num_rejected == 1


def test_build_suite_whose_every_test_image_is_rejected_exits_1_and_keeps_the_old_suite(tmp_path, capsys):
    """An empty suite is work not done (issue 24): one line, exit 1, the previous manifest left as it was."""
    from open_clip_medclip.cli import main as medclip_main

    _jpeg(tmp_path / "a.jpg")
    (tmp_path / "suite.csv").write_text("image,label\na.jpg,x\n")
    build = ["eval", "build-suite", str(tmp_path / "suite.csv"), "--out", str(tmp_path / "out"), "--skip-missing",
             "--quiet"]
    assert medclip_main(build) == 0
    manifest = (tmp_path / "out" / MANIFEST_NAME).read_bytes()
    capsys.readouterr()
    (tmp_path / "a.jpg").unlink()
    assert medclip_main(build) == 1
    assert capsys.readouterr().err.strip() == ("medclip eval: build-suite: suite 'suite' not written: all 1 selected "
                                               "test image(s) were rejected (1 missing_image)")
    assert (tmp_path / "out" / MANIFEST_NAME).read_bytes() == manifest


def _chexpert_fixture(root: Path, per_class: int = 12) -> Path:
    """CheXpert-v1.0-small/train.csv with single-finding rows per competition class plus distractors."""
    base = root / "CheXpert-v1.0-small"
    order = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
             "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
             "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
    assert set(order[5:]) == set(CHEXPERT_FINDINGS)
    rows, n = [], 0
    for cls in CHEXPERT_COMPETITION_FINDINGS:
        for i in range(per_class):
            n += 1
            view = "Lateral" if i % 3 == 0 else "Frontal"
            rel = f"CheXpert-v1.0-small/train/patient{n:05d}/study1/view1_{view.lower()}.jpg"
            _jpeg(root / rel, n)
            row = {k: "" for k in order}
            row.update({"Path": rel, "Sex": "F", "Age": "50", "Frontal/Lateral": view, "AP/PA": "AP" if view == "Frontal" else ""})
            row[cls] = "1.0"
            row["Support Devices"] = "-1.0" if i == 1 else ""  # uncertain -> negative under MedCLIP's policy
            rows.append(row)
    for _ in range(5):  # two competition findings: never eligible
        n += 1
        rel = f"CheXpert-v1.0-small/train/patient{n:05d}/study1/view1_frontal.jpg"
        _jpeg(root / rel, n)
        row = {k: "" for k in order}
        row.update({"Path": rel, "Frontal/Lateral": "Frontal", "Edema": "1.0", "Atelectasis": "1.0"})
        rows.append(row)
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "train.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=order)
        writer.writeheader()
        writer.writerows(rows)
    return base


def test_chexpert_5x200_recipe_and_frontal_variant(tmp_path):
    raw = _chexpert_fixture(tmp_path / "raw")
    definition = load_definition("chexpert-5x200")
    definition["recipe"] = {**definition["recipe"], "per_class": 8}
    result = build_suite(definition, raw, tmp_path / "all", progress=False)
    assert sum(result.counts["test"].values()) == 20 and sum(result.counts["train"].values()) == 20
    manifest = (tmp_path / "all/manifest.csv").read_text()
    assert "patient000" in manifest and "lateral" in manifest
    again = build_suite(definition, raw, tmp_path / "again", progress=False)
    assert again.manifest_sha256 == result.manifest_sha256
    frontal = load_definition("chexpert-5x200-frontal")
    frontal["recipe"] = {**frontal["recipe"], "per_class": 8}
    build_suite(frontal, raw, tmp_path / "frontal", progress=False)
    assert "lateral" not in (tmp_path / "frontal/manifest.csv").read_text()


def test_mimic_recipe(tmp_path):
    raw = tmp_path / "mimic"
    raw.mkdir()
    labels = ["subject_id,study_id," + ",".join(CHEXPERT_FINDINGS)]
    meta = ["dicom_id,subject_id,study_id,ViewPosition"]
    n = 0
    for cls in CHEXPERT_COMPETITION_FINDINGS:
        for i in range(4):
            n += 1
            subject, study, dicom = f"1000{n:04d}", f"5000{n:04d}", f"d{n:04d}"
            values = ["1.0" if f == cls else ("0.0" if i % 2 else "") for f in CHEXPERT_FINDINGS]
            labels.append(f"{subject},{study}," + ",".join(values))
            meta.append(f"{dicom},{subject},{study},{'LATERAL' if i == 3 else 'PA'}")
            _jpeg(raw / f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg", n)
    (raw / "mimic-cxr-2.0.0-chexpert.csv").write_text("\n".join(labels) + "\n")
    (raw / "mimic-cxr-2.0.0-metadata.csv").write_text("\n".join(meta) + "\n")
    definition = load_definition("mimic-5x200-frontal")
    result = build_suite(definition, raw, tmp_path / "out", progress=False)
    total = sum(result.counts["test"].values()) + sum(result.counts["train"].values())
    assert total == 15  # 3 frontal images per class


def test_covid_recipe_balances_the_test_set(tmp_path):
    raw = tmp_path / "COVID-19_Radiography_Dataset"
    for i in range(6):
        _jpeg(raw / "COVID/images" / f"COVID-{i}.png", i)
    for i in range(15):
        _jpeg(raw / "Normal/images" / f"Normal-{i}.png", 50 + i)
    _jpeg(raw / "Viral Pneumonia/images/Viral-0.png")
    result = build_suite("covid", raw, tmp_path / "out", progress=False)
    assert result.counts["test"] == {"Normal": 6, "COVID": 6}
    assert result.counts["train"] == {"Normal": 9, "COVID": 0}


def test_rsna_recipe_reads_dicom(tmp_path, sample_dir):
    raw = tmp_path / "rsna"
    images = raw / "stage_2_train_images"
    images.mkdir(parents=True)
    dicom = next((sample_dir / "odd_inputs").glob("*.dcm"))
    rows = ["patientId,x,y,width,height,Target"]
    for i in range(20):
        pid = f"p{i:03d}"
        shutil.copy(dicom, images / f"{pid}.dcm")  # copies of the bundled real RSNA DICOM
        target = 1 if i % 4 == 0 else 0
        rows.append(f"{pid},1,2,3,4,{target}" if target else f"{pid},,,,,0")
    (raw / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    definition = load_definition("rsna-pneumonia")
    definition["recipe"] = {**definition["recipe"], "holdout_fraction": 0.5}
    result = build_suite(definition, raw, tmp_path / "out", progress=False)
    test = result.counts["test"]
    assert test["Normal"] == test["Pneumonia"] > 0
    assert all(path.suffix == ".png" for path in (tmp_path / "out/images").iterdir())


def test_load_suite_errors_name_the_problem(tmp_path):
    with pytest.raises(SuiteError, match="not built"):
        load_suite("chexpert-5x200-not-a-suite")
    (tmp_path / "bad.csv").write_text("path,cls\na.jpg,x\n")
    with pytest.raises(SuiteError, match="'image'"):
        load_suite(tmp_path / "bad.csv")
