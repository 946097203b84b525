"""Dependencies run one way: the host glue (`plugins/`, installed as `open_clip_medclip.plugins`) imports the library,
the library does not import the glue, except at its documented entry points.

Read with `ast`, every import counts: top-level ones and the lazy ones inside functions (`TYPE_CHECKING` blocks
excepted). The entry points may load the glue: `register()` in `__init__` and the autoload. Host pieces the library
needs, the CLI launchers' trainer and CLIP_benchmark included, travel the other way (`open_clip_medclip.hosted`).
The import graph of the package, glue included, has no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "open_clip_medclip"
GLUE = f"{PACKAGE}.plugins"
# (module, enclosing top-level function or None for anywhere in the module) allowed to import the glue
ENTRY_POINTS = {(PACKAGE, "register"), (f"{PACKAGE}.autoload", None)}


def _modules() -> dict[str, Path]:
    found = {}
    for root, prefix in ((REPO / PACKAGE, PACKAGE), (REPO / "plugins", GLUE)):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def imports(name: str, source: str) -> list[tuple[str, str | None, int]]:
    """(imported module of this package, enclosing top-level function, line) for every import in `source`."""
    is_package = MODULES.get(name, Path()).name == "__init__.py"
    base = name if is_package else name.rpartition(".")[0]
    found: list[tuple[str, str | None, int]] = []

    def resolve(module: str) -> str | None:
        while module and module not in MODULES:
            module = module.rpartition(".")[0]
        return module or None

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child, function)
            return
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = base
            for _ in range(max(0, node.level - 1)):
                parent = parent.rpartition(".")[0]
            module = f"{parent}.{node.module}" if node.level and node.module else (parent if node.level else node.module)
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                       for alias in node.names]
        else:
            targets = []
        for target in targets:
            resolved = resolve(target) if target and target.split(".")[0] == PACKAGE else None
            if resolved and resolved != name:
                found.append((resolved, function, node.lineno))
        for child in ast.iter_child_nodes(node):
            inner = function
            if function is None and isinstance(node, ast.Module) and isinstance(child, ast.FunctionDef):
                inner = child.name
            visit(child, inner)

    visit(ast.parse(source), None)
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imports(name, path.read_text())} for name, path in MODULES.items()}


def library_to_glue(name: str, source: str) -> list[str]:
    """The imports of the glue in library module `name` outside the entry points, as `line: target`."""
    if name.startswith(GLUE):
        return []
    return [f"{line}: {target}" for target, function, line in imports(name, source)
            if target.startswith(GLUE) and (name, function) not in ENTRY_POINTS and (name, None) not in ENTRY_POINTS]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_library_imports_the_glue_only_at_entry_points():
    offenders = [f"{MODULES[name].relative_to(REPO)}:{entry}" for name in MODULES
                 for entry in library_to_glue(name, MODULES[name].read_text())]
    assert not offenders, "library modules importing open_clip_medclip.plugins:\n" + "\n".join(offenders)


def test_the_import_graph_has_no_cycle():
    found = cycles(_graph())
    assert not found, f"import cycles: {found}"


@pytest.mark.parametrize("source", [
    "from open_clip_medclip.plugins import openclip_data\n",
    "def f():\n    from open_clip_medclip.plugins.openclip_data import shard_samples\n",
    "def f():\n    import open_clip_medclip.plugins.openclip_train\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\nelse:\n    from .plugins import openclip_data\n",
])
def test_a_glue_import_in_the_library_is_caught(source):
    assert library_to_glue(f"{PACKAGE}.loss", source)


def test_a_cycle_is_caught():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert library_to_glue(f"{PACKAGE}.autoload", "def f():\n    from .plugins import openclip_train\n") == []
    # the CLI launchers are no entry point: they get the trainer through `hosted`
    assert library_to_glue(f"{PACKAGE}.train", "def main():\n    from .plugins import openclip_train\n") != []
