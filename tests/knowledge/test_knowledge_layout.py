"""Issue 23 (item 8): no `knowledge/` circle — the spaCy entry points name the module that defines the factories
(no forwarding `__getattr__`), and `sources/` (reading reports) does not import `knowledge/` (labelling them)."""
from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata as metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "open_clip_medclip"


def _factory_entry_points() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(PACKAGE.parent / "setup.cfg", encoding="utf-8")
    lines = parser["options.entry_points"]["spacy_factories"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines)


def test_entry_points_name_where_the_factories_live():
    declared = _factory_entry_points()
    components = importlib.import_module("open_clip_medclip.knowledge.components")
    assert "__getattr__" not in vars(components)
    assert set(declared) == set(components.PIPELINE)
    for name, target in declared.items():
        module_name, attribute = target.split(":")
        assert module_name == "open_clip_medclip.knowledge.factories", name
        assert callable(vars(importlib.import_module(module_name))[attribute]), target
    installed = {ep.name: ep.value for ep in metadata.entry_points(group="spacy_factories")
                 if ep.name.startswith("medclip_")}
    assert installed == declared, "installed metadata is stale: rerun pip install -e ."


def test_sources_do_not_import_knowledge():
    for path in sorted((PACKAGE / "sources").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(name.startswith("open_clip_medclip.knowledge") for name in names), f"{path.name}"
