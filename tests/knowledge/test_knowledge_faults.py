"""Fault injection for `medclip label` (issue 11): every bad input is named, nothing is left behind.

Cases: a report over the csv module's 128 KB field limit (labeller and the `labelled-csv` shard source reading
the labeller's own output), bytes that are not valid UTF-8 (CSV, .txt, archive member) and `--encoding`, XML
that is not IU/OpenI, duplicate report ids, killed runs (workers die with the parent, SIGTERM cleans up, a stale
`.tmp-PID` output is removed by the next run), scispaCy options without the extra; and `--part I/N`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from open_clip_medclip.errors import UserError
from open_clip_medclip.knowledge.cli import main, part_range
from open_clip_medclip.parts import read_part

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

IU_XML = ('<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="{uid}"/><MedlineCitation><Article><Abstract>'
          '<AbstractText Label="FINDINGS">{findings}</AbstractText><AbstractText Label="IMPRESSION">Normal chest.'
          '</AbstractText></Abstract></Article></MedlineCitation></eCitation>')


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> Path:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    path.write_bytes(buffer.getvalue().encode(encoding))
    return path


# --- reports of any length ---------------------------------------------------------------------------------------
def test_report_over_the_csv_field_limit_is_labelled_and_read_back_by_the_shard_source(tmp_path):
    huge = "FINDINGS: " + "Stable appearance of the chest. " * 6000 + "Small left pleural effusion."
    assert len(huge) > 131072  # the csv module's default field limit
    source = write_csv(tmp_path / "reports.csv", [["id", "Reports"], ["r1", "No pneumothorax."], ["r2", huge]])
    out = tmp_path / "labels.csv"
    assert main([str(source), "--out", str(out), "--id-column", "id", "--quiet"]) == 0
    rows = read_rows(out)
    assert [row["id"] for row in rows] == ["r1", "r2"]
    assert rows[1]["Reports"] == huge and rows[1]["Pleural Effusion"] == "1.0"

    from open_clip_medclip.sources import iter_labelled_csv  # `medclip shards build --source labelled-csv`

    records = list(iter_labelled_csv(out, id_column="id"))
    assert [record.id for record in records] == ["r1", "r2"]
    assert records[1].report_text == huge


# --- encodings ---------------------------------------------------------------------------------------------------
def test_latin1_bytes_are_an_error_naming_file_row_and_line_not_u_fffd(tmp_path):
    source = write_csv(tmp_path / "latin1.csv", [["id", "Reports"], ["a", "No effusion."],
                                                  ["b", "Pleural effusion, caf\u00e9 noted."]], encoding="latin-1")
    out = tmp_path / "labels.csv"
    with pytest.raises(UserError, match=r"latin1\.csv: row 3 \(line 3\), column 2: byte 0xe9 .* not valid utf-8; "
                                        r"give the file's encoding with --encoding"):
        main([str(source), "--out", str(out), "--quiet"])
    assert not out.exists() and list(tmp_path.iterdir()) == [source]  # nothing written, no temporary left

    assert main([str(source), "--out", str(out), "--quiet", "--encoding", "latin-1", "--id-column", "id"]) == 0
    rows = read_rows(out)
    assert rows[1]["Reports"] == "Pleural effusion, caf\u00e9 noted." and "\ufffd" not in out.read_text("utf-8")


def test_bad_bytes_in_txt_reports_and_archive_members_name_them(tmp_path, write_tgz):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "s1.txt").write_text("FINDINGS: No effusion.", encoding="utf-8")
    (folder / "s2.txt").write_bytes(b"FINDINGS: Normal.\nIMPRESSION: caf\xe9.")
    with pytest.raises(UserError, match=r"s2\.txt: line 2: byte 0xe9 is not valid utf-8"):
        main([str(folder), "--out", str(tmp_path / "a.csv"), "--quiet"])

    archive = write_tgz(tmp_path / "reports.tgz", {"reports/bad.txt": b"FINDINGS: caf\xe9."})
    with pytest.raises(UserError, match=r"reports\.tgz!reports/bad\.txt: line 1: byte 0xe9"):
        main([str(archive), "--out", str(tmp_path / "b.csv"), "--quiet"])


def test_unknown_encoding_is_one_line(tmp_path):
    source = write_csv(tmp_path / "r.csv", [["Reports"], ["No effusion."]])
    with pytest.raises(UserError, match="--encoding utf-9: unknown text encoding"):
        main([str(source), "--out", str(tmp_path / "o.csv"), "--quiet", "--encoding", "utf-9"])


# --- XML that is not IU/OpenI ------------------------------------------------------------------------------------
def test_non_iu_xml_is_an_error_naming_the_file(tmp_path):
    other = tmp_path / "pom.xml"
    other.write_text('<?xml version="1.0"?><project><name>not a report</name></project>', encoding="utf-8")
    out = tmp_path / "labels.csv"
    with pytest.raises(UserError, match=r"pom\.xml: not an IU/OpenI report \(root <project> has no <AbstractText>"):
        main([str(other), "--out", str(out), "--quiet"])
    assert not out.exists()

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "1.xml").write_text(IU_XML.format(uid="CXR1", findings="No effusion."), encoding="utf-8")
    (folder / "2.xml").write_text("<svg><g/></svg>", encoding="utf-8")
    with pytest.raises(UserError, match=r"mixed/2\.xml: not an IU/OpenI report \(root <svg>"):
        main([str(folder), "--out", str(out), "--quiet"])


# --- duplicate ids -------------------------------------------------------------------------------------------------
def test_duplicate_ids_are_reported_with_count_and_examples(tmp_path, capsys):
    rows = [["id", "Reports"]] + [[f"r{i % 3}", "No effusion."] for i in range(7)]
    source = write_csv(tmp_path / "dups.csv", rows)
    out = tmp_path / "labels.csv"
    assert main([str(source), "--out", str(out), "--id-column", "id", "--quiet"]) == 0
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "warning: " in error and "dups.csv: 4 report(s) repeat an earlier report id, e.g. 'r0' (reports 1 and 4)," \
        " 'r1' (reports 2 and 5), 'r2' (reports 3 and 6), ...; their rows are written as they are" in error
    assert len(read_rows(out)) == 7
    provenance = json.loads((tmp_path / "labels.csv.provenance.json").read_text())
    assert provenance["duplicate_ids"]["count"] == 4
    assert provenance["duplicate_ids"]["examples"][0] == {"id": "r0", "first_report": 1, "repeated_at_report": 4}

    unique = write_csv(tmp_path / "unique.csv", [["id", "Reports"], ["a", "x"], ["b", "y"]])
    assert main([str(unique), "--out", str(out), "--id-column", "id", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


# --- scispaCy is an extra ------------------------------------------------------------------------------------------
def test_scispacy_options_without_the_extra_say_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "scispacy" else real_find_spec(name, *a, **k))
    source = write_csv(tmp_path / "r.csv", [["Reports"], ["No effusion."]])
    for flags, shown in ((["--umls-linker"], "--umls-linker"), (["--scispacy-model", "en_core_sci_sm"],
                                                                  "--scispacy-model")):
        with pytest.raises(UserError, match=rf"^{shown} needs scispaCy, which is an optional extra: "
                                            r"pip install 'open_clip_medclip\[scispacy\]'$"):
            main([str(source), "--out", str(tmp_path / "o.csv"), "--quiet", *flags])


# --- --part I/N ----------------------------------------------------------------------------------------------------
def test_part_ranges_cover_the_input_once():
    for count in (0, 1, 7, 100):
        for total in (1, 3, 8):
            ranges = [part_range(count, index, total) for index in range(1, total + 1)]
            assert ranges[0][0] == 0 and ranges[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


@pytest.mark.parametrize("sentences", [False, True])
def test_parts_concatenated_equal_the_single_run(tmp_path, sample_dir, sentences):
    source = sample_dir / "iu_reports" / "NLMCXR_reports.tgz"
    small = tmp_path / "small.tgz"
    with tarfile.open(source) as archive, tarfile.open(small, "w:gz") as out:
        for number in range(1, 40):
            try:
                member = archive.getmember(f"ecgen-radiology/{number}.xml")
            except KeyError:
                continue
            out.addfile(member, archive.extractfile(member))
    flags = ["--quiet"] + (["--sentences"] if sentences else [])
    single = tmp_path / "single.csv"
    assert main([str(small), "--out", str(single), *flags]) == 0
    parts = []
    for index in range(1, 4):
        part = tmp_path / f"part{index}.csv"
        assert main([str(small), "--out", str(part), "--part", f"{index}/3", *flags]) == 0
        parts.append(part.read_text(encoding="utf-8").splitlines(keepends=True))
        provenance = json.loads((tmp_path / f"part{index}.csv.provenance.json").read_text())
        assert read_part(provenance["part"]) == (index, 3)  # written {index, count} (was {index, of})
    assert all(lines[0] == parts[0][0] for lines in parts)  # same header
    merged = parts[0][0] + "".join(line for lines in parts for line in lines[1:])
    assert merged == single.read_text(encoding="utf-8")
    assert all(len(lines) > 1 for lines in parts)


@pytest.mark.parametrize("part", ["0/3", "4/3", "1/0", "x", "1/2/3"])
def test_bad_part_is_one_line(tmp_path, part):
    with pytest.raises(UserError, match=rf"^--part '?{part}'?: "):
        main([str(tmp_path / "none.csv"), "--out", str(tmp_path / "o.csv"), "--part", part])


# --- killed runs ---------------------------------------------------------------------------------------------------
def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_labelling(tmp_path: Path) -> tuple[subprocess.Popen, set[int], Path, int]:
    """`medclip label --workers 2` reading a FIFO that stays open: the parent waits for input with its workers
    started and idle (the case where pool workers would otherwise wait for work forever). Returns the process,
    its worker pids, the output path and the FIFO's write end (close it when done)."""
    source = tmp_path / "stream.csv"
    os.mkfifo(source)
    out = tmp_path / "labels.csv"
    process = subprocess.Popen([sys.executable, "-m", "open_clip_medclip.knowledge.cli", str(source), "--out", str(out), "--workers", "2", "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    writer = os.open(source, os.O_WRONLY)  # blocks until the labeller opens the FIFO
    os.write(writer, b"id,Reports\n" + b"".join(b"r%d,FINDINGS: Mild cardiomegaly. No effusion.\n" % i
                                                 for i in range(600)))
    deadline = time.monotonic() + 60
    workers: set[int] = set()
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = _children(process.pid)
        assert process.poll() is None, process.stderr.read().decode()
    assert len(workers) >= 2, "the workers did not start"
    time.sleep(0.5)  # the first chunk labelled; the workers now wait for more
    return process, workers, out, writer


def _wait_gone(pids: set[int], seconds: float = 10.0) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = {pid for pid in pids if _alive(pid)}
        if not alive:
            return set()
        time.sleep(0.1)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux-only")
def test_workers_die_with_a_killed_parent_and_the_next_run_cleans_its_temporary(tmp_path):
    process, workers, out, writer = _start_labelling(tmp_path)
    process.kill()  # SIGKILL: no cleanup code runs in the parent
    process.wait(timeout=10)
    try:
        assert _wait_gone(workers) == set(), "workers outlived their SIGKILLed parent"
    finally:
        os.close(writer)
        for pid in workers:  # never leave them behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".labels.csv.tmp-")]
    assert leftovers == [f".labels.csv.tmp-{process.pid}"]  # the killed run's hidden output

    (tmp_path / "stream.csv").unlink()
    small = write_csv(tmp_path / "small.csv", [["Reports"], ["No effusion."]])
    assert main([str(small), "--out", str(out), "--quiet"]) == 0
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(read_rows(out)) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux-only")
def test_sigterm_stops_the_workers_and_removes_the_temporary(tmp_path):
    process, workers, out, writer = _start_labelling(tmp_path)
    process.terminate()
    try:
        assert process.wait(timeout=20) == 128 + signal.SIGTERM
        assert _wait_gone(workers) == set(), "workers outlived their SIGTERMed parent"
    finally:
        os.close(writer)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert "Traceback" not in process.stderr.read().decode()


# --- through the `medclip` entry point -------------------------------------------------------------------------------
def test_entry_point_prints_one_line_and_exits_2(tmp_path):
    source = write_csv(tmp_path / "latin1.csv", [["Reports"], ["caf\u00e9"]], encoding="latin-1")
    result = subprocess.run([sys.executable, "-c", "import sys; from open_clip_medclip.cli import main; "
                             "sys.exit(main())", "label", str(source), "--out", str(tmp_path / "o.csv"), "--quiet"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "MEDCLIP_DEBUG": ""})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "latin1.csv: row 2 (line 2), column 1: byte 0xe9" in result.stderr
