"""The `--medclip-*` options have one owner (`open_clip_medclip.options.MedclipOptions`).

Walks every module of the library and the host glue with `ast`: each option the code reads (`x.medclip_name`
attributes, `getattr(x, "medclip_name")`, `"--medclip-name"` flags in strings) must be declared by both front
doors' parsers, and nothing outside the options module reads one with `getattr(args, "medclip_...", default)`
(a second default).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from open_clip_medclip.options import PREFIX, MedclipOptions

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(path for path in [*(REPO / "open_clip_medclip").rglob("*.py"), *(REPO / "plugins").rglob("*.py")]
                 if path.name != "options.py")  # the declarations themselves
FLAG = re.compile(r"--medclip-([a-z][a-z-]*[a-z])(?![\w*-])")  # not `--medclip-shard-*` (a family)
ARGS_NAMES = {"args", "train_args", "medclip_args", "parsed"}  # what an argparse namespace is called here


def _reads(path: Path) -> dict[str, int]:
    """{option dest the file reads: first line}."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if (isinstance(node, ast.Attribute) and node.attr.startswith(PREFIX)
                and ast.unparse(node.value).split(".")[-1] in ARGS_NAMES):
            names.append(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and str(node.args[1].value).startswith(PREFIX)):
            names.append(node.args[1].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names += [PREFIX + flag.replace("-", "_") for flag in FLAG.findall(node.value)]
        for name in names:
            found.setdefault(name, node.lineno)
    return found


def _declared(parser) -> set[str]:
    return {action.dest for action in parser._actions if action.dest.startswith(PREFIX)}


def test_every_option_read_is_declared_by_both_front_doors():
    from open_clip_medclip.plugins.host_args import medclip_options_parser

    from open_clip_medclip.train import build_parser

    declared = set(MedclipOptions.dests())
    assert _declared(build_parser()) == declared
    assert _declared(medclip_options_parser()) == declared
    undeclared = [f"{path.relative_to(REPO)}:{line}: {name}" for path in SOURCES
                  for name, line in _reads(path).items() if name not in declared]
    assert not undeclared, "options read but not declared in MedclipOptions:\n" + "\n".join(undeclared)


def test_the_walk_finds_an_undeclared_option(tmp_path):
    source = tmp_path / "module.py"
    source.write_text('def f(args):\n    return args.medclip_nonexistent, getattr(args, "medclip_other")\n'
                      'HELP = "see --medclip-third-one"\n')
    assert set(_reads(source)) == {"medclip_nonexistent", "medclip_other", "medclip_third_one"}


def test_no_second_default_outside_the_options_module():
    pattern = re.compile(r"getattr\(\w+, [\"']medclip_")
    offenders = [f"{path.relative_to(REPO)}:{number}" for path in SOURCES
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders


def test_from_args_fills_declared_defaults():
    from types import SimpleNamespace

    options = MedclipOptions.from_args(SimpleNamespace(medclip_loss="clip", medclip_bank_kinds=None))
    assert options.loss == "clip" and options.bank_kinds == ("text", "paired") and options.shard_retries == 4
    args = SimpleNamespace()
    options.store(args)
    assert MedclipOptions.from_args(args) == options
