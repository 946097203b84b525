"""Adapters on synthetic fixtures in the real column layouts, and on the bundled real sample."""
from __future__ import annotations

from pathlib import Path

import pytest

from open_clip_medclip.findings import CHEXPERT_FINDINGS, FINDING_INDEX
from open_clip_medclip.sources import (
    NIH_TO_CHEXPERT,
    NIH_UNMAPPED,
    SAMPLE_DATA_DIR,
    Record,
    Reject,
    SourceError,
    iter_chexpert,
    iter_covid,
    iter_generic_csv,
    iter_labelled_csv,
    iter_mimic,
    iter_nih,
    iter_pediatric,
    iter_rsna,
    parse_label_columns,
)

SAMPLE = SAMPLE_DATA_DIR
# CheXpert's own column order (Lung Opacity before Lung Lesion), as in train.csv.
CHEXPERT_CSV_ORDER = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                      "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                      "Pleural Other", "Fracture", "Support Devices"]


def value(record: Record, finding: str):
    return record.labels[FINDING_INDEX[finding]]


def split(items):
    items = list(items)
    return [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, Reject)]


def test_chexpert_train_csv(tmp_path):
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_CSV_ORDER)
    rows = [
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
        "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,,"
        ",-1.0,,-1.0,,1.0,",
        "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,41,Frontal,AP,,,nan,,,,,,,,,,,",
        "CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg,Male,20,Frontal,AP,,,2.0,,,,,,,,,,,",
        "CheXpert-v1.0-small/train/patient00005/study1/view2_lateral.jpg,Male",
    ]
    csv = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    csv.parent.mkdir()
    csv.write_text("\n".join([header, *rows]) + "\n")
    records, rejects = split(iter_chexpert(csv))
    assert [r.id for r in records] == ["train/patient00001/study1/view1_frontal",
                                      "train/patient00002/study2/view1_frontal"]
    first, second = records
    assert value(first, "No Finding") == 1.0 and value(first, "Pneumothorax") == 0.0
    assert value(first, "Support Devices") == 1.0 and value(first, "Edema") is None
    # columns are matched by name, not position: Lung Opacity (4th in CheXpert's order) lands at our index 4
    assert value(second, "Lung Opacity") == 1.0 and value(second, "Lung Lesion") is None
    assert value(second, "Cardiomegaly") == -1.0 and value(second, "Fracture") == 1.0
    assert first.image_path == str(tmp_path / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    assert first.meta["frontal_lateral"] == "Frontal" and first.meta["sex"] == "Female"
    assert [(r.reason, "NaN" in r.detail or "2.0" in r.detail) for r in rejects[:2]] == [("bad_label", True)] * 2
    assert rejects[2].reason == "missing_columns" and rejects[2].input.endswith("train.csv:6")


def test_chexpert_missing_column_names_file(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("Path,Sex\nx.jpg,Male\n")
    with pytest.raises(SourceError, match=r"train\.csv: missing column\(s\) 'No Finding'"):
        list(iter_chexpert(csv))


def test_mimic_joins_labels_by_study(tmp_path):
    labels = tmp_path / "mimic-cxr-2.0.0-chexpert.csv"
    labels.write_text("subject_id,study_id," + ",".join(CHEXPERT_FINDINGS) + "\n"
                      "10000032,50414267,1.0" + "," * 13 + "\n"
                      "10000032,53189527,,,,,,-1.0,,,,,,,,1.0\n")
    metadata = tmp_path / "mimic-cxr-2.0.0-metadata.csv"
    metadata.write_text("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns\n"
                        "02aa804e-bde0afdd,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544\n"
                        "174413ec-4ec4c1f7,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544\n"
                        "2a2277a9-b0ded155,10000032,53189527,CHEST (PA AND LAT),PA,3056,2544\n"
                        "68b5c4b1-227d0485,10000032,59999999,CHEST (PA AND LAT),PA,3056,2544\n")
    reports = tmp_path / "reports" / "files" / "p10" / "p10000032"
    reports.mkdir(parents=True)
    (reports / "s50414267.txt").write_text("FINDINGS: No acute process.\nIMPRESSION: Normal chest.")
    records, rejects = split(iter_mimic(labels, metadata, tmp_path / "jpg", tmp_path / "reports"))
    assert [r.id for r in records] == ["02aa804e-bde0afdd", "174413ec-4ec4c1f7", "2a2277a9-b0ded155"]
    assert records[0].image_path == str(tmp_path / "jpg/files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg")
    assert records[1].labels == records[0].labels and value(records[0], "No Finding") == 1.0
    assert value(records[2], "Edema") == -1.0 and records[2].meta["view"] == "PA"
    assert "No acute process" in records[0].report_text and records[2].report_text == ""
    assert [(r.reason, r.id) for r in rejects] == [("missing_labels", "68b5c4b1-227d0485")]


def test_nih_mapping_is_documented_and_complete():
    assert NIH_TO_CHEXPERT["Effusion"] == "Pleural Effusion"
    assert NIH_TO_CHEXPERT["Mass"] == NIH_TO_CHEXPERT["Nodule"] == "Lung Lesion"
    assert NIH_TO_CHEXPERT["Infiltration"] == "Lung Opacity"
    assert set(NIH_UNMAPPED) == {"Emphysema", "Fibrosis", "Hernia"}
    assert all(target in CHEXPERT_FINDINGS for target in NIH_TO_CHEXPERT.values())


def test_nih_data_entry_format(tmp_path):
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                   "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
                   "00000001_000.png,Cardiomegaly|Emphysema,0,1,58,M,PA,2682,2749,0.143,0.143,\n"
                   "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,\n"
                   "00000003_000.png,Pneumonia|Infiltration,0,3,81,F,AP,2500,2048,0.168,0.168,\n"
                   "00000004_000.png,Flu,0,4,82,F,AP,2500,2048,0.168,0.168,\n")
    (tmp_path / "images_001" / "images").mkdir(parents=True)
    (tmp_path / "images_001" / "images" / "00000002_000.png").write_bytes(b"")
    records, rejects = split(iter_nih(csv, tmp_path))
    first, second, third = records
    assert value(first, "Cardiomegaly") == 1.0 and value(first, "No Finding") == 0.0
    assert first.meta["unmapped_findings"] == ["Emphysema"] and value(first, "Fracture") is None
    assert value(second, "No Finding") == 1.0 and value(second, "Pleural Effusion") == 0.0
    assert second.image_path == str(tmp_path / "images_001/images/00000002_000.png")
    assert value(third, "Pneumonia") == 1.0 and value(third, "Lung Opacity") == 1.0
    assert rejects[0].reason == "unknown_class" and "'Flu'" in rejects[0].detail


def test_nih_bundled_sample():
    records, rejects = split(iter_nih(SAMPLE / "nih_cxr14" / "labels.csv"))
    assert len(records) == 200 and not rejects
    assert all(Path(r.image_path).is_file() for r in records)
    pneumonia = [r for r in records if value(r, "Pneumonia") == 1.0]
    normal = [r for r in records if value(r, "No Finding") == 1.0]
    assert len(pneumonia) == 100 and len(normal) == 100
    assert {r.meta["split"] for r in records} == {"train", "heldout"}


def test_rsna_groups_rows_per_patient(tmp_path):
    csv = tmp_path / "stage_2_train_labels.csv"
    csv.write_text("patientId,x,y,width,height,Target\n"
                   "0004cfab,,,,,0\n"
                   "00436515,264,152,213,379,1\n"
                   "00436515,562,152,256,453,1\n"
                   "00704310,,,,,0\n"
                   "bad00001,,,,,7\n")
    info = tmp_path / "stage_2_detailed_class_info.csv"
    info.write_text("patientId,class\n0004cfab,No Lung Opacity / Not Normal\n00704310,Normal\n")
    records, rejects = split(iter_rsna(csv, tmp_path / "dcm", info))
    by_id = {r.id: r for r in records}
    positive = by_id["00436515"]
    assert value(positive, "Pneumonia") == 1.0 and value(positive, "Lung Opacity") == 1.0
    assert positive.meta["boxes"] == [[264.0, 152.0, 213.0, 379.0], [562.0, 152.0, 256.0, 453.0]]
    assert positive.image_path == str(tmp_path / "dcm" / "00436515.dcm")
    assert value(by_id["0004cfab"], "No Finding") == 0.0 and value(by_id["0004cfab"], "Edema") is None
    assert value(by_id["00704310"], "No Finding") == 1.0 and value(by_id["00704310"], "Edema") == 0.0
    assert [(r.id, r.reason) for r in rejects] == [("bad00001", "bad_label")]


def test_covid_folder_layout(tmp_path):
    for folder in ("COVID", "Normal", "Lung_Opacity", "Viral Pneumonia"):
        (tmp_path / folder / "images").mkdir(parents=True)
        (tmp_path / folder / "images" / f"{folder.replace(' ', '_')}-1.png").write_bytes(b"x")
        (tmp_path / folder / "masks").mkdir()
        (tmp_path / folder / "masks" / "ignored.png").write_bytes(b"x")
    records, rejects = split(iter_covid(tmp_path))
    assert not rejects and len(records) == 4
    by_class = {r.meta["class"]: r for r in records}
    assert value(by_class["COVID"], "Pneumonia") == 1.0 and value(by_class["COVID"], "No Finding") == 0.0
    assert value(by_class["Lung_Opacity"], "Lung Opacity") == 1.0
    assert value(by_class["Normal"], "No Finding") == 1.0 and value(by_class["Normal"], "Pneumonia") == 0.0
    assert by_class["Viral Pneumonia"].id == "Viral Pneumonia/images/Viral_Pneumonia-1"


def test_pediatric_release_layout(tmp_path):
    for split_name, cls, name in (("train", "NORMAL", "IM-0115-0001.jpeg"),
                                  ("train", "PNEUMONIA", "person1_bacteria_1.jpeg"),
                                  ("test", "PNEUMONIA", "person100_virus_184.jpeg")):
        (tmp_path / "chest_xray" / split_name / cls).mkdir(parents=True, exist_ok=True)
        (tmp_path / "chest_xray" / split_name / cls / name).write_bytes(b"x")
    records, _ = split(iter_pediatric(tmp_path))
    by_name = {Path(r.image_path).name: r for r in records}
    assert by_name["person1_bacteria_1.jpeg"].meta == {
        "path": "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg", "class": "PNEUMONIA",
        "split": "train", "pneumonia_type": "bacteria"}
    assert by_name["person100_virus_184.jpeg"].meta["split"] == "test"
    assert value(by_name["IM-0115-0001.jpeg"], "No Finding") == 1.0


def test_pediatric_bundled_labels_csv():
    records, rejects = split(iter_pediatric(SAMPLE / "kermany_pediatric"))
    assert len(records) == 600 and not rejects
    assert sum(value(r, "Pneumonia") == 1.0 for r in records) == sum(r.meta["class"] == "PNEUMONIA"
                                                                     for r in records) > 0
    assert all(Path(r.image_path).is_file() for r in records[:20])


def test_generic_csv_label_and_class_columns(tmp_path):
    csv = tmp_path / "table.csv"
    csv.write_text("file,Effusion,Edema,diagnosis,report\n"
                   "a.png,1,0,effusion,Left effusion.\n"
                   "b.png,,-1,normal,\n"
                   "c.png,x,0,Lung Opacity|Edema,\n"
                   "d.png,1,0,gout,\n")
    columns = parse_label_columns(["Effusion=Pleural Effusion", "Edema"])
    records, rejects = split(iter_generic_csv(csv, "file", columns, report_column="report"))
    assert [r.id for r in records] == ["a", "b", "d"]
    assert value(records[0], "Pleural Effusion") == 1.0 and value(records[1], "Edema") == -1.0
    assert records[0].report_text == "Left effusion." and records[0].meta == {"diagnosis": "effusion",
                                                                           "path": "a.png"}
    assert rejects[0].reason == "bad_label" and "'Effusion'" in rejects[0].detail
    records, rejects = split(iter_generic_csv(csv, "file", class_column="diagnosis"))
    assert value(records[0], "Pleural Effusion") == 1.0 and value(records[0], "No Finding") == 0.0
    assert value(records[1], "No Finding") == 1.0 and value(records[1], "Edema") == 0.0
    assert value(records[2], "Lung Opacity") == value(records[2], "Edema") == 1.0
    assert [(r.id, r.reason) for r in rejects] == [("d", "unknown_class")]


def test_labelled_csv_bundled_chexpert_output():
    records, rejects = split(iter_labelled_csv(SAMPLE / "chexpert_labeler" / "labeled_reports.csv"))
    assert len(records) == 4 and not rejects
    third = records[2]
    assert value(third, "Lung Opacity") == 1.0 and value(third, "Atelectasis") == -1.0
    assert third.sentences == [(third.report_text, third.labels)]
