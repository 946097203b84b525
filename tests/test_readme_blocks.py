"""The README's runnable code, executed as written (extracted from README.md at test time, never copied here).

Rule: a command is run when a comment on it says `runs as is` -
- in a ```bash block: that command (one logical line, `\\` continuations joined);
- in a ```python block: the whole block.
They run in README order, in one temporary working folder, offline, and each must exit 0. Tag only commands whose
inputs ship with the package (the bundled sample) and that need no download; the test fails if the tagged commands
it relies on disappear, so the tag cannot silently stop covering the README.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TAG = "runs as is"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def readme_commands(text: str) -> list[tuple[str, str]]:
    """[(language, code)] of the tagged commands, in README order."""
    found = []
    for language, body in FENCE.findall(text):
        if language == "python":
            if TAG in body:
                found.append(("python", body))
        elif language in ("bash", "sh", "shell"):
            logical, current = [], ""
            for line in body.splitlines():
                current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
                if not line.rstrip().endswith("\\"):
                    logical.append(current)
                    current = ""
            found += [("bash", cmd) for cmd in logical if not cmd.lstrip().startswith("#") and "#" in cmd
                      and TAG in cmd.split("#", 1)[1]]
    return found


def test_the_rule_finds_the_readme_examples():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    text = "\n".join(code for _, code in commands)
    for expected in ("create_model_and_transforms", "medclip eval build-suite pediatric-pneumonia --raw sample",
                     "medclip eval zeroshot", "python -m open_clip_medclip.benchmark eval",
                     "ZeroShotClassifier.from_prompts", "mc.heatmap(", "medclip predict suites/pediatric/images",
                     "--classifier ft/", "mc.predict(classifier,"):
        assert expected in text, f"no README command tagged '{TAG}' contains {expected!r}"
    assert all("--raw /data" not in code for _, code in commands)  # untagged commands are left alone


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    for language, code in readme_commands(README.read_text(encoding="utf-8")):
        argv = [sys.executable, "-c", code] if language == "python" else ["bash", "-euo", "pipefail", "-c", code]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README command failed ({proc.returncode}):\n{code}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "suites/pediatric/manifest.csv").is_file() and (tmp_path / "cb.json").is_file()
