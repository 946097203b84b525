"""`medclip label` end to end on bundled reports: columns, values, provenance, errors, atomic output."""
from __future__ import annotations

import csv
import json
import tarfile

import pytest

from open_clip_medclip.errors import UserError
from open_clip_medclip.findings import CHEXPERT_FINDINGS
from open_clip_medclip.knowledge.cli import main


def read_rows(path):
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_cli_reproduces_the_chexpert_sample_output(tmp_path, sample_dir, capsys):
    out = tmp_path / "labeled.csv"
    assert main([str(sample_dir / "chexpert_labeler" / "sample_reports.csv"), "--no-header", "--out", str(out),
                 "--quiet"]) == 0
    assert out.read_bytes().replace(b"\r\n", b"\n") == \
        (sample_dir / "chexpert_labeler" / "labeled_reports.csv").read_bytes().replace(b"\r\n", b"\n").rstrip(b"\n") \
        + b"\n"
    provenance = json.loads((tmp_path / "labeled.csv.provenance.json").read_text())
    assert provenance["reports"] == 4 and provenance["rules_hash"].startswith("sha256:")
    assert provenance["label_counts"]["Cardiomegaly"] == {"positive": 2, "negative": 1, "uncertain": 0, "blank": 1}
    assert "Labelled 4 reports" in capsys.readouterr().out


def test_cli_iu_reports_by_sentence(tmp_path, sample_dir):
    source = sample_dir / "iu_reports" / "NLMCXR_reports.tgz"
    subset = tmp_path / "subset.tgz"
    with tarfile.open(source) as archive, tarfile.open(subset, "w:gz") as small:
        for name in ("ecgen-radiology/1.xml", "ecgen-radiology/2.xml", "ecgen-radiology/4.xml"):
            member = archive.getmember(name)
            small.addfile(member, archive.extractfile(member))
    out = tmp_path / "sentences.csv"
    assert main([str(subset), "--out", str(out), "--sentences", "--quiet"]) == 0
    rows = read_rows(out)
    assert list(rows[0]) == ["id", "report_index", "sentence_index", "Reports", *CHEXPERT_FINDINGS]
    assert rows[0]["id"] == "CXR1" and rows[0]["Reports"].startswith("The cardiac silhouette and mediastinum size")
    assert {row["id"] for row in rows} == {"CXR1", "CXR2", "CXR4"}
    for row in rows:
        assert all(row[name] in ("", "1.0", "0.0", "-1.0") for name in CHEXPERT_FINDINGS)
    cxr1 = [row for row in rows if row["id"] == "CXR1"]
    assert [row["Pneumothorax"] for row in cxr1 if "pneumothorax" in row["Reports"]] == ["0.0"]
    cxr2 = [row for row in rows if row["id"] == "CXR2"]
    assert any(row["Cardiomegaly"] == "1.0" for row in cxr2)  # "Borderline cardiomegaly."

    reports_out = tmp_path / "reports.csv"
    assert main([str(subset), "--out", str(reports_out), "--quiet", "--workers", "2"]) == 0
    report_rows = read_rows(reports_out)
    assert [row["id"] for row in report_rows] == ["CXR1", "CXR2", "CXR4"]
    assert report_rows[0]["No Finding"] == "1.0" and report_rows[0]["Reports"].startswith("COMPARISON: None.")


def test_cli_errors_name_the_file_and_keep_old_output(tmp_path):
    source = tmp_path / "reports.csv"
    source.write_text("text\nNo effusion.\n", encoding="utf-8")
    out = tmp_path / "labels.csv"
    out.write_text("previous output\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"reports\.csv: text column 'Reports' not found"):
        main([str(source), "--out", str(out), "--quiet"])
    assert out.read_text() == "previous output\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv", "reports.csv"]  # no temp files left

    empty = tmp_path / "empty.csv"
    empty.write_text("Reports\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty\.csv: no reports found"):
        main([str(empty), "--out", str(tmp_path / "x.csv"), "--quiet"])
    assert not (tmp_path / "x.csv").exists()

    bad_xml = tmp_path / "bad.xml"
    bad_xml.write_text("<eCitation>", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.xml: unreadable XML"):
        main([str(bad_xml), "--out", str(tmp_path / "y.csv"), "--quiet"])


def test_cli_text_and_id_columns(tmp_path):
    source = tmp_path / "reports.csv"
    source.write_text("uid,report_text\na1,Small left pleural effusion.\na2,No pneumothorax.\n", encoding="utf-8")
    out = tmp_path / "labels.csv"
    assert main([str(source), "--out", str(out), "--text-column", "report_text", "--id-column", "uid",
                 "--quiet"]) == 0
    rows = read_rows(out)
    assert list(rows[0])[:2] == ["uid", "Reports"]
    assert [(row["uid"], row["Pleural Effusion"], row["Pneumothorax"]) for row in rows] == [
        ("a1", "1.0", ""), ("a2", "", "0.0")]
