"""Shard builds on the bundled real sample: accounting, rejects, determinism, resume after a kill, OpenCLIP."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from open_clip_medclip.shards import BuildError, BuildOptions, build_shards, validate_shards
from open_clip_medclip.shards.builder import ABORT_ENV
from open_clip_medclip.shards.cli import main as shards_main
from open_clip_medclip.sources import iter_generic_csv, iter_labelled_csv, iter_nih, iter_pediatric
from tests.shards.conftest import REPO, SAMPLE


def real_items(n_nih: int = 8, n_ped: int = 8):
    return itertools.chain(itertools.islice(iter_nih(SAMPLE / "nih_cxr14" / "labels.csv"), n_nih),
                           itertools.islice(iter_pediatric(SAMPLE / "kermany_pediatric"), n_ped))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def options(**kw) -> BuildOptions:
    return BuildOptions(**{"samples_per_shard": 5, "image_size": 64, "progress": False, **kw})


def test_bad_inputs_all_accounted(tmp_path, bad_images, stub_labeler):
    table = tmp_path / "bad.csv"
    lines = ["image,Pleural Effusion,Edema,report"]
    lines += [f"{path},1,0,Effusion present." for path in bad_images.values()]
    lines += [f"{bad_images['good']},nan,0,Effusion.", f"{bad_images['good']},3,0,Effusion.", f"{bad_images['good']},1"]
    table.write_text("\n".join(lines) + "\n")
    items = itertools.chain(real_items(4, 4), iter_generic_csv(table, "image", root=tmp_path, source="bad"),
                            iter_labelled_csv(SAMPLE / "chexpert_labeler" / "labeled_reports.csv"))
    empty_report = iter_generic_csv(_write(tmp_path / "empty.csv", "id,report\nr1,\nr2,No effusion.\n"),
                                    id_column="id", report_column="report", source="txt")
    summary = build_shards(itertools.chain(items, empty_report), tmp_path / "out",
                           options(kinds=("image", "text")), labeler=stub_labeler)
    assert summary.inputs == summary.written + summary.rejected
    assert summary.reject_reasons == {"bad_label": 2, "corrupt_image": 1, "empty_report": 1, "missing_columns": 1,
                                      "missing_image": 1, "truncated_image": 1, "unreadable_dicom": 1,
                                      "zero_byte_image": 1}
    # images: 8 real + 1 good generated; texts: 4 labelled rows + 1 of the 2 report rows (the other is empty)
    assert summary.kinds == {"image": 9, "text": 5}
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == summary.rejected and all(r["detail"] and r["input"] for r in rejects)
    assert any(r["reason"] == "bad_label" and "bad.csv:" in r["input"] and "NaN" in r["detail"] for r in rejects)
    report = validate_shards(tmp_path / "out")
    assert report.ok, [str(p) for p in report.problems]
    assert report.samples == summary.written


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_deterministic_across_workers_and_runs(tmp_path):
    one = build_shards(real_items(), tmp_path / "a", options(workers=1))
    two = build_shards(real_items(), tmp_path / "b", options(workers=2))
    assert one.written == two.written == 16 and one.shards == 4
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    assert [m.name for m in members] == sorted(m.name for m in members)


def test_paired_and_text_samples_with_labeler(tmp_path, stub_labeler):
    table = _write(tmp_path / "pairs.csv", "image,report,Cardiomegaly\n"
                   "00000061_015.jpg,Cardiomegaly. No effusion.,1\n"
                   "00000261_007.jpg,Lungs are clear.,\n")
    items = iter_generic_csv(table, "image", {"Cardiomegaly": "Cardiomegaly"}, report_column="report",
                             root=SAMPLE / "nih_cxr14" / "images", source="p")
    summary = build_shards(items, tmp_path / "out", options(kinds=("paired", "text"), uncertainty="raw"),
                           labeler=stub_labeler)
    assert summary.kinds == {"paired": 2, "text": 2}
    import webdataset as wds

    samples = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False)
               .decode("pil")}
    paired = samples["p__00000061_015__paired"]
    assert paired["json"]["labels"][2] == 1.0 and paired["json"]["labels"][0] is None  # image labels from table
    assert [s["text"] for s in paired["json"]["sentences"]] == ["Cardiomegaly.", "No effusion."]
    assert paired["json"]["sentences"][1]["labels"][10] == 0.0
    assert paired["txt"] == "Cardiomegaly. No effusion." and max(paired["jpg"].size) == 64
    text = samples["p__00000261_007__text"]
    assert "jpg" not in text and text["json"]["labels"][0] == 1.0  # report labels from the labeler
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["labeler"]["version"] == "stub-1" and provenance["uncertainty_policy"] == "raw"


def test_sentence_text_unit(tmp_path, stub_labeler):
    table = _write(tmp_path / "r.csv", "id,report\nr1,Cardiomegaly. No effusion.\n")
    items = iter_generic_csv(table, id_column="id", report_column="report", source="iu")
    summary = build_shards(items, tmp_path / "out", options(kinds=("text",), text_unit="sentence"),
                           labeler=stub_labeler)
    assert summary.written == 2
    assert validate_shards(tmp_path / "out").ok


def test_uncertainty_policies(tmp_path):
    labelled = SAMPLE / "chexpert_labeler" / "labeled_reports.csv"
    values = {}
    for policy in ("zeros", "ones", "keep", "raw"):
        build_shards(iter_labelled_csv(labelled), tmp_path / policy, options(kinds=("text",), uncertainty=policy))
        with tarfile.open(tmp_path / policy / "shard-000000.tar") as tar:
            document = json.loads(tar.extractfile("labelled__row3__text.json").read())
        values[policy] = document["labels"][8], document["labels"][1]  # Atelectasis is -1, EC blank in row 3
        assert validate_shards(tmp_path / policy).ok
    assert values == {"zeros": (0.0, 0.0), "ones": (1.0, 0.0), "keep": (-1.0, 0.0), "raw": (-1.0, None)}


def test_rerun_is_noop_and_other_build_is_refused(tmp_path):
    build_shards(real_items(2, 2), tmp_path / "out", options())
    before = folder_bytes(tmp_path / "out")
    again = build_shards(real_items(2, 2), tmp_path / "out", options())
    assert again.already_complete and folder_bytes(tmp_path / "out") == before
    with pytest.raises(BuildError, match="different shard build"):
        build_shards(real_items(3, 2), tmp_path / "out", options())
    build_shards(real_items(3, 2), tmp_path / "out", options(overwrite=True))
    assert validate_shards(tmp_path / "out").samples == 5


KILL_SCRIPT = """
import itertools, sys
from pathlib import Path
from open_clip_medclip.shards import BuildOptions, build_shards
from open_clip_medclip.sources import iter_nih, iter_pediatric
sample = Path(sys.argv[2])
items = itertools.chain(itertools.islice(iter_nih(sample / 'nih_cxr14' / 'labels.csv'), 9),
                        itertools.islice(iter_pediatric(sample / 'kermany_pediatric'), 9))
build_shards(items, sys.argv[1], BuildOptions(samples_per_shard=4, image_size=64, progress=False,
                                               workers=int(sys.argv[3])))
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_build_resumes_to_identical_bytes(tmp_path, workers):
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(reference), str(SAMPLE), "1"], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), ABORT_ENV: "6"}  # dies inside the second shard
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), str(SAMPLE), str(workers)], env=env)
    assert killed.returncode == -9
    assert (out / "shard-000000.tar").exists() and not (out / "shard-000001.tar").exists()
    assert not (out / "sizes.json").exists()
    report = validate_shards(out)
    assert any("unfinished build" in str(p) for p in report.problems)
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), str(SAMPLE), str(workers)], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    assert folder_bytes(out) == folder_bytes(reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_openclip_reads_the_shards(tmp_path):
    from open_clip_train.data import get_dataset_size

    build_shards(real_items(), tmp_path / "out", options(samples_per_shard=6))
    total, shards = get_dataset_size(str(tmp_path / "out" / "shard-{000000..000002}.tar"))
    assert (total, shards) == (16, 3)
    import webdataset as wds

    urls = [str(p) for p in sorted((tmp_path / "out").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").to_tuple("jpg", "json"))
    assert len(samples) == 16
    image, document = samples[0]
    assert image.mode == "RGB" and max(image.size) == 64 and len(document["labels"]) == 14


def test_cli_build_and_validate(tmp_path, capsys):
    out = tmp_path / "nih"
    code = shards_main(["build", "--source", "nih", "--csv", str(SAMPLE / "nih_cxr14" / "labels.csv"), "--out",
                        str(out), "--split", "heldout", "--limit", "5", "--image-size", "64", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["written"] == 5
    assert "5 inputs = 5 written + 0 rejected" in captured.err
    assert shards_main(["validate", str(out)]) == 0
    bad = _write(tmp_path / "no_path.csv", "Sex,Age\nMale,3\n")
    assert shards_main(["build", "--source", "chexpert", "--csv", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "no_path.csv: missing column(s) 'Path'" in capsys.readouterr().err


def test_cli_text_shards_with_the_real_labeler(tmp_path, capsys):
    pytest.importorskip("open_clip_medclip.knowledge.labeler", reason="report labeler not in this checkout")
    out = tmp_path / "iu"
    code = shards_main(["build", "--source", "iu-reports", "--reports",
                        str(SAMPLE / "iu_reports" / "NLMCXR_reports.tgz"), "--out", str(out), "--limit", "30",
                        "--text-unit", "sentence", "--no-progress"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["inputs"] == summary["written"] + summary["rejected"] and summary["written"] > 30
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["labeler"]["rules_hash"] and provenance["text_unit"] == "sentence"
    assert validate_shards(out).ok


# A terminal's Ctrl-C reaches a Python whose SIGINT handler is the default one. A runner started as a background job
# of a script (as CI may start the suite) hands its children SIGINT ignored, so Python would install no handler and
# the interrupt would be lost: the build script puts the default handler back first.
CTRL_C_BUILD = """
import signal
import sys
signal.signal(signal.SIGINT, signal.default_int_handler)
if sys.argv[2] == "slow":
    import tests.shards.slow_build  # noqa: F401
from open_clip_medclip.cli import main
sample = sys.argv[3]
raise SystemExit(main(["shards", "build", "--source", "nih", "--csv", f"{sample}/nih_cxr14/labels.csv", "--root",
                       f"{sample}/nih_cxr14", "--out", sys.argv[1], "--image-size", "64", "--samples-per-shard", "4",
                       "--workers", "2", "--no-progress"]))
"""


def test_second_ctrl_c_exits_quietly_and_the_build_resumes(tmp_path):
    """Issue 24: Ctrl-C twice (to the whole process group, as a terminal does) during a 2-worker build: no
    traceback from the command or its workers, exit status 130 (a shell's value for death by SIGINT too), and the
    rerun completes to the bytes of an uninterrupted build."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run([sys.executable, "-c", CTRL_C_BUILD, str(reference), "fast", str(SAMPLE)], check=True, env=env,
                   capture_output=True)
    process = subprocess.Popen([sys.executable, "-c", CTRL_C_BUILD, str(out), "slow", str(SAMPLE)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "nih-000002.tar").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        assert process.poll() is None, "the build ended before it could be interrupted"
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode in (130, -signal.SIGINT), (process.returncode, err)
    assert err.strip() == "medclip shards: interrupted", err
    subprocess.run([sys.executable, "-c", CTRL_C_BUILD, str(out), "fast", str(SAMPLE)], check=True, env=env,
                   capture_output=True)
    assert folder_bytes(out) == folder_bytes(reference)


def test_cli_build_and_merge_that_write_nothing_exit_1(tmp_path, capsys):
    """A build (or a merge) that wrote 0 samples did not do its work: one line naming why, exit 1 (issue 24)."""
    header_only = _write(tmp_path / "header_only.csv", "path,report\n")
    csv_build = ["build", "--source", "generic-csv", "--image-column", "path", "--report-column", "report",
                 "--kind", "image", "--no-progress"]
    assert shards_main([*csv_build, "--csv", str(header_only), "--out", str(tmp_path / "none")]) == 1
    assert "medclip shards: error: 0 samples written" in capsys.readouterr().err
    missing = _write(tmp_path / "missing.csv", "path,report\nnot_there.png,Effusion.\n")
    assert shards_main([*csv_build, "--csv", str(missing), "--out", str(tmp_path / "rejected")]) == 1
    assert "all 1 input(s) rejected (1 missing_image" in capsys.readouterr().err.splitlines()[-1]
    # an empty part of a split build is not a failure; a merge of parts that hold nothing is
    parts = [tmp_path / "p1", tmp_path / "p2"]
    codes = [shards_main([*csv_build, "--csv", str(missing), "--out", str(part), "--part", f"{i}/2"])
             for i, part in enumerate(parts, 1)]
    assert sorted(codes) == [0, 1]  # the part holding the rejected row fails, the empty one does not
    capsys.readouterr()
    assert shards_main(["merge", "--out", str(tmp_path / "merged"), *map(str, parts)]) == 1
    assert "0 samples written" in capsys.readouterr().err.splitlines()[-1]
