"""Fixtures for the labeler tests: one Labeler per session (building it compiles the rule files once)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from open_clip_medclip.knowledge import Labeler


@pytest.fixture(scope="session")
def labeler() -> Labeler:
    return Labeler()


@pytest.fixture(scope="session")
def label(labeler):
    """label(text) -> {finding name: value} for the findings that are not blank (No Finding included)."""
    from open_clip_medclip.findings import CHEXPERT_FINDINGS

    def run(text: str) -> dict[str, float]:
        result = labeler.label_report(text)
        return {name: value for name, value in zip(CHEXPERT_FINDINGS, result.labels) if value is not None}

    return run


@pytest.fixture
def write_tgz():
    """write_tgz(path, {member name: bytes}) -> path: a gzipped tar of report files (reader fault tests)."""
    def write(path: Path, members: dict[str, bytes]) -> Path:
        with tarfile.open(path, "w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    return write
