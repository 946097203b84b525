"""Fast start (issue 13): `medclip --help`, `medclip label` and `medclip shards` import neither torch nor
open_clip (nor spaCy, which imports torch through thinc) unless a step needs them. Each check runs in a fresh
interpreter, since this test process has imported everything already."""
from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "open_clip", "spacy", "thinc", "transformers")
CHECK = ("import sys; heavy = [m for m in {heavy!r} if m in sys.modules]; "
         "assert not heavy, f'imported: {{heavy}}'; print('light')")


def run_light(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code + "\n" + CHECK.format(heavy=HEAVY)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("light"), result.stderr[-2000:]


@pytest.mark.parametrize("module", [
    "open_clip_medclip",
    "open_clip_medclip.cli",
    "open_clip_medclip.knowledge.cli",
    "open_clip_medclip.knowledge",
    "open_clip_medclip.sources",
    "open_clip_medclip.sources.text",
    "open_clip_medclip.shards.cli",
])
def test_import_is_light(module):
    run_light(f"import {module}")


def test_help_and_labelling_stay_light(tmp_path):
    source = tmp_path / "r.csv"
    source.write_text("id,Reports\na,FINDINGS: No effusion. IMPRESSION: Mild cardiomegaly.\n", encoding="utf-8")
    run_light("import contextlib, io\n"
              "from open_clip_medclip.cli import main\n"
              "for argv in (['--help'], ['label', '--help'], ['shards', '--help']):\n"
              "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
              "        main(argv)\n"
              f"assert main(['label', {str(source)!r}, '--out', {str(tmp_path / 'o.csv')!r}, '--quiet']) == 0\n"
              f"assert main(['label', {str(source)!r}, '--out', {str(tmp_path / 'o.csv')!r}, '--quiet', "
              "'--workers', '2']) == 0")
