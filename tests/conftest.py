"""Shared fixtures: offline mode for every test, bundled sample paths, and the isolated reference environment."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "open_clip_medclip" / "sample_data"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def reference_env_path() -> Path | None:
    """Where the authors' `medclip` 0.0.3 + transformers 4.24 live (a pip --target dir), if installed."""
    configured = os.environ.get("MEDCLIP_REFERENCE_PATH")
    candidates = [Path(configured)] if configured else [REPO_ROOT / ".ref", REPO_ROOT / ".ci" / "ref"]
    for path in candidates:
        if (path / "medclip").is_dir() and (path / "transformers").is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"{SHARED_DATA_DIR} not present (shared data lives beside the repo only on the dev/CI machines)")
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def medclip_reference():
    """A callable running a Python script (path + args) in the reference environment; skips if it's missing.

    CI sets MEDCLIP_REQUIRE_REFERENCE=1 so a missing reference environment fails instead of skipping.
    """
    path = reference_env_path()
    if path is None:
        message = ("reference environment not found: set MEDCLIP_REFERENCE_PATH to a dir made with "
                   "'pip install --target DIR --no-deps medclip==0.0.3 transformers==4.24.0 tokenizers==0.13.3 "
                   "huggingface-hub==0.36.2 nltk' (see tests/run.sh)")
        if os.environ.get("MEDCLIP_REQUIRE_REFERENCE") == "1":
            pytest.fail(message)
        pytest.skip(message)

    def run(script: str | Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        result = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"reference script {script} failed:\n{result.stdout}\n{result.stderr[-4000:]}")
        return result

    return run
