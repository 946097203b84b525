"""Light dependencies (issue 13): scispaCy is the `[scispacy]` extra, and nothing the base install requires caps
numpy below 2 (scispaCy 0.6 pins numpy<2, which used to downgrade an OpenCLIP user's numpy 2 stack)."""
from __future__ import annotations

import configparser
import importlib.metadata as metadata
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"
NUMPY_2 = (Version("2.0.0"), Version("2.3.0"))


def _requirements(text: str) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line]


@pytest.fixture(scope="module")
def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG, encoding="utf-8")
    return parser


def _allows_numpy_2(requirement: Requirement) -> bool:
    return any(requirement.specifier.contains(version, prereleases=True) for version in NUMPY_2)


def test_scispacy_is_only_an_extra(setup_cfg):
    base = {canonicalize_name(r.name) for r in _requirements(setup_cfg["options"]["install_requires"])}
    assert "scispacy" not in base and "spacy" in base
    extra = _requirements(setup_cfg["options.extras_require"]["scispacy"])
    assert [canonicalize_name(r.name) for r in extra] == ["scispacy"]
    for name, text in setup_cfg["options.extras_require"].items():
        if name != "scispacy":
            assert "scispacy" not in {canonicalize_name(r.name) for r in _requirements(text)}, name


def test_base_requirements_do_not_cap_numpy(setup_cfg):
    requirements = _requirements(setup_cfg["options"]["install_requires"])
    for requirement in requirements:
        if canonicalize_name(requirement.name) == "numpy":
            assert _allows_numpy_2(requirement), str(requirement)
    spacy = next(r for r in requirements if canonicalize_name(r.name) == "spacy")
    assert not spacy.specifier.contains("3.7.5"), "spaCy < 3.8 (thinc 8.2) caps numpy below 2"


def test_installed_base_dependency_tree_allows_numpy_2(setup_cfg):
    """Walk the base requirements as installed here (markers evaluated, extras not followed): no package in the
    tree pins numpy below 2. With scispacy still a base requirement this fails (scispacy: numpy<2.0)."""
    seen: set[str] = set()
    caps: list[str] = []
    todo = list(_requirements(setup_cfg["options"]["install_requires"]))
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        if name == "numpy":
            continue
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            child = Requirement(text)
            if child.marker is not None and not child.marker.evaluate({"extra": ""}):
                continue
            if canonicalize_name(child.name) == "numpy" and not _allows_numpy_2(child):
                caps.append(f"{name}: {child}")
            todo.append(child)
    assert "spacy" in seen and "thinc" in seen, "spaCy's tree was not walked (is it installed?)"
    assert not caps, caps


def _fresh_venv_with_this_environment(folder: Path) -> Path:
    """A new venv whose only packages are the ones installed here (torch included), seen through a .pth file:
    what `pip install .` resolves in it is exactly what our metadata asks for beyond an existing stack."""
    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    (site_packages / "inherit_test_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def _pip_dry_run(python: Path, target: str, report: Path, offline: bool):
    argv = [str(python), "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--quiet",
            "--disable-pip-version-check", "--report", str(report), target]
    if offline:
        argv.insert(4, "--no-index")
    return subprocess.run(argv, capture_output=True, text=True, cwd=SETUP_CFG.parent, timeout=600)


def test_pip_install_in_fresh_venv_leaves_scispacy_to_the_extra(tmp_path):
    """`pip install .` in a fresh venv where torch and the rest are already installed resolves offline (so it asks
    for nothing else, scispacy included); `pip install .[scispacy]` asks for scispacy (offline: not found)."""
    if importlib.util.find_spec("scispacy") is not None:
        pytest.skip("scispacy is installed here, so the extra resolves without asking for it")
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here, so pip cannot build our metadata offline")
    python = _fresh_venv_with_this_environment(tmp_path / "venv")
    base = _pip_dry_run(python, ".", tmp_path / "base.json", offline=True)
    assert base.returncode == 0, base.stderr
    installs = [item["metadata"]["name"] for item in json.loads((tmp_path / "base.json").read_text())["install"]]
    assert [canonicalize_name(name) for name in installs] == ["open-clip-medclip"], installs
    extra = _pip_dry_run(python, ".[scispacy]", tmp_path / "extra.json", offline=True)
    assert extra.returncode != 0 and "No matching distribution found for scispacy" in extra.stderr, extra.stderr


@pytest.mark.skipif(not os.environ.get("MEDCLIP_NETWORK_TESTS"),
                    reason="resolves against the package index; set MEDCLIP_NETWORK_TESTS=1 to run")
def test_pip_install_extra_brings_scispacy_from_the_index(tmp_path):
    """Online variant: with the index reachable, `.[scispacy]` would install scispacy and `.` would not."""
    python = _fresh_venv_with_this_environment(tmp_path / "venv")
    for target, wanted in ((".", False), (".[scispacy]", True)):
        result = _pip_dry_run(python, target, tmp_path / "report.json", offline=False)
        assert result.returncode == 0, result.stderr
        names = {canonicalize_name(item["metadata"]["name"])
                 for item in json.loads((tmp_path / "report.json").read_text())["install"]}
        assert ("scispacy" in names) is wanted, (target, sorted(names))
