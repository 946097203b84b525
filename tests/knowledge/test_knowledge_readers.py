"""Report readers: CSV, IU XML (folder, file, .tgz), .txt folder, and their errors."""
from __future__ import annotations

import tarfile

import pytest

from open_clip_medclip.knowledge import iter_reports
from open_clip_medclip.sources.reports import ReportInputError

IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">Cough.</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation></eCitation>"""


def write_iu(folder, n, findings="No pneumothorax.", impression="Normal chest."):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{n}.xml"
    path.write_text(IU_XML.format(n=n, findings=findings, impression=impression), encoding="utf-8")
    return path


def test_csv_with_and_without_id(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_text('study,Reports\ns1,"No effusion.\nMild cardiomegaly."\ns2,Clear lungs.\n', encoding="utf-8")
    assert list(iter_reports(path)) == [(None, "No effusion.\nMild cardiomegaly."), (None, "Clear lungs.")]
    assert list(iter_reports(path, id_column="study")) == [("s1", "No effusion.\nMild cardiomegaly."),
                                                           ("s2", "Clear lungs.")]


def test_csv_errors_name_the_file(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_text("study,text\ns1,No effusion.\n", encoding="utf-8")
    with pytest.raises(ReportInputError, match=r"reports\.csv.*text column 'Reports' not found"):
        list(iter_reports(path))
    with pytest.raises(ReportInputError, match="id column 'uid' not found"):
        list(iter_reports(path, text_column="text", id_column="uid"))
    empty = tmp_path / "empty.csv"
    empty.write_text("Reports\n", encoding="utf-8")
    with pytest.raises(ReportInputError, match=r"empty\.csv: no reports found"):
        list(iter_reports(empty))


def test_headerless_csv_like_the_chexpert_sample(sample_dir):
    reports = list(iter_reports(sample_dir / "chexpert_labeler" / "sample_reports.csv", header=False))
    assert len(reports) == 4 and reports[0][0] is None
    assert reports[3][1] == "1. Stable mild cardiomegaly. 2. Hyperexpanded but clear lungs."


def test_iu_xml_folder_single_file_and_tgz(tmp_path):
    folder = tmp_path / "ecgen-radiology"
    for n in (10, 2, 1):
        write_iu(folder, n, findings=f"Report {n}.")
    from_folder = list(iter_reports(folder))
    assert [report_id for report_id, _ in from_folder] == ["CXR1", "CXR2", "CXR10"]  # natural order
    assert from_folder[0][1] == ("COMPARISON: None.\n\nINDICATION: Cough.\n\nFINDINGS: Report 1.\n\n"
                                 "IMPRESSION: Normal chest.")
    assert list(iter_reports(folder / "2.xml")) == [from_folder[1]]
    archive = tmp_path / "reports.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="ecgen-radiology")
    assert list(iter_reports(archive)) == from_folder


def test_bundled_iu_archive(sample_dir):
    reports = list(iter_reports(sample_dir / "iu_reports" / "NLMCXR_reports.tgz"))
    assert len(reports) == 3955
    assert reports[0][0] == "CXR1" and "FINDINGS: The cardiac silhouette" in reports[0][1]


def test_unreadable_xml_names_the_file(tmp_path, write_tgz):
    folder = tmp_path / "xml"
    write_iu(folder, 1)
    (folder / "2.xml").write_text("<eCitation><uId id='CXR2'/>", encoding="utf-8")
    with pytest.raises(ReportInputError, match=r"2\.xml: unreadable XML"):
        list(iter_reports(folder))
    archive = write_tgz(tmp_path / "bad.tgz", {"ecgen-radiology/7.xml": b"<not-closed>"})
    with pytest.raises(ReportInputError, match=r"bad\.tgz!ecgen-radiology/7\.xml: unreadable XML"):
        list(iter_reports(archive))
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(b"not a tar file")
    with pytest.raises(ReportInputError, match=r"broken\.tgz: cannot read archive"):
        list(iter_reports(broken))


def test_txt_folder(tmp_path):
    folder = tmp_path / "files" / "p10" / "p10000032"
    folder.mkdir(parents=True)
    (folder / "s50414267.txt").write_text("FINAL REPORT\n FINDINGS: No effusion.\n", encoding="utf-8")
    (folder / "s53189527.txt").write_text("IMPRESSION: Mild cardiomegaly.\n", encoding="utf-8")
    assert list(iter_reports(tmp_path / "files")) == [
        ("s50414267", "FINAL REPORT\n FINDINGS: No effusion.\n"), ("s53189527", "IMPRESSION: Mild cardiomegaly.\n")]


def test_empty_and_unsupported_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportInputError, match="no reports found"):
        list(iter_reports(tmp_path / "empty"))
    with pytest.raises(ReportInputError, match="input not found"):
        list(iter_reports(tmp_path / "missing.csv"))
    (tmp_path / "reports.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ReportInputError, match="unsupported input"):
        list(iter_reports(tmp_path / "reports.json"))
