"""Private host names live only in the host glue (`plugins/`, installed as `open_clip_medclip.plugins`).

Issue 12: "nothing in open_clip_medclip/ outside plugins/ imports a private host name". The hosts are the packages
this plugin runs inside: `open_clip`, `open_clip_train`, `webdataset`, `clip_benchmark`. The rule, for every
`.py` file under `open_clip_medclip/` (the `plugins/` glue is a separate folder; a `plugins` sub-package there
would be exempt too):

1. `open_clip_train` and `clip_benchmark` are applications, not libraries: they are not imported at all (no
   `import`, `from ... import`, `importlib.import_module`, `__import__` or `sys.modules[...]` of them or any of
   their modules). Their use goes through the glue, which checks the names at import.
2. `open_clip` and `webdataset` are used through their top-level namespace only: `import open_clip`,
   `import webdataset [as wds]` (never a submodule: `open_clip.loss`, `webdataset.gopen`, ...), and
   `from open_clip import X` / `open_clip.X` / `getattr(open_clip, "X")` where X is a *public host name*: a name
   of the package's top-level namespace that does not start with `_` and is not a module (dunders such as
   `__version__` are fine). So `open_clip.ClipLoss` is public, `open_clip.loss.gather_features`,
   `open_clip.factory._MODEL_CONFIGS`, `open_clip.transform.PreprocessCfg` and `wds.filters` are not.
3. Further down a chain (`open_clip.X.y`), no component starts with `_` (dunders excepted).
4. Host attributes are not assigned or deleted (monkeypatching is glue), and `getattr`/`setattr` on a host module
   need a constant public name.

The files are parsed with `ast` (docstrings and comments that mention host names are fine); names bound by host
imports are tracked per function scope, so a local variable that happens to be called `wds` is not a host module.
The public names are read from the installed host packages' `__init__.py` with `ast` too (explicit imports,
definitions, `__all__`; `from . import sub` binds a module, which is not public), so nothing heavy is imported.
"""
from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "open_clip_medclip"
LIBRARY_HOSTS = ("open_clip", "webdataset")  # usable through their public top-level names
APPLICATION_HOSTS = ("open_clip_train", "clip_benchmark")  # not imported outside the glue
HOSTS = LIBRARY_HOSTS + APPLICATION_HOSTS

def _top_level_names(init: Path, seen: frozenset[Path] = frozenset()) -> set[str]:
    """Public non-module names a package `__init__.py` (or module) binds at top level, read with `ast`."""
    if init in seen or not init.is_file():
        return set()
    names: set[str] = set()
    declared_all: set[str] | None = None

    def walk(statements: list[ast.stmt]) -> None:
        nonlocal declared_all
        for node in statements:
            if isinstance(node, ast.If | ast.Try | ast.With):
                for block in ("body", "orelse", "finalbody"):
                    walk(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    walk(handler.body)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        names.add(target.id)
                        if target.id == "__all__" and isinstance(node.value, ast.List | ast.Tuple):
                            declared_all = {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
            elif isinstance(node, ast.ImportFrom) and node.module is None:
                continue  # `from . import sub`: a submodule
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name != "*":
                        names.add(alias.asname or alias.name)
                    elif node.level:  # `from .sub import *`: the submodule's public names
                        base = init.parent.joinpath(*node.module.split("."))
                        target = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
                        names.update(_top_level_names(target, seen | {init}))

    walk(ast.parse(init.read_text(encoding="utf-8")).body)
    if declared_all is not None:
        names = declared_all
    return {n for n in names if not n.startswith("_")}


def public_host_names() -> dict[str, frozenset[str]]:
    """{library host: its public top-level names}, from the installed package's source (not imported: fast)."""
    public = {}
    for host in LIBRARY_HOSTS:
        spec = importlib.util.find_spec(host)
        public[host] = frozenset(_top_level_names(Path(spec.origin)) if spec and spec.origin else ())
    return public


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


class HostNameChecker(ast.NodeVisitor):
    """Collects uses of host names that break the rule in the module docstring."""

    def __init__(self, path: str, public: dict[str, frozenset[str]]) -> None:
        self.path = path
        self.public = public
        self.scopes: list[dict[str, str]] = [{}]  # local name -> what it is bound to: "module:P" or "object:P"
        self.violations: list[Violation] = []
        self.import_module_names: set[str] = {"importlib.import_module", "__import__"}

    # helpers ---------------------------------------------------------------------------------------------------
    def flag(self, node: ast.AST, what: str) -> None:
        self.violations.append(Violation(self.path, getattr(node, "lineno", 0), what))

    def bind(self, name: str, target: str | None) -> None:
        if target is None:
            self.scopes[-1].pop(name, None)
        else:
            self.scopes[-1][name] = target

    def lookup(self, name: str) -> str | None:
        return self.scopes[-1].get(name)

    def check_module_path(self, node: ast.AST, dotted: str, spelled: str) -> bool:
        """A host module `dotted` reached by the code `spelled`; False (and flagged) unless allowed."""
        root = dotted.split(".", 1)[0]
        if root not in HOSTS:
            return True
        if root in APPLICATION_HOSTS:
            self.flag(node, f"{spelled}: {root} is used only in the plugins/ glue")
            return False
        if dotted != root:
            self.flag(node, f"{spelled}: {dotted} is a host submodule (use public `{root}.NAME` or the plugins/ "
                            "glue)")
            return False
        return True

    def check_public(self, node: ast.AST, host: str, name: str, spelled: str) -> bool:
        if name == "*":
            self.flag(node, f"{spelled}: star import from a host")
            return False
        if (name.startswith("__") and name.endswith("__")) or name in self.public.get(host, ()):
            return True
        kind = "private" if _private(name) else "not a public top-level name (a submodule or its internals)"
        self.flag(node, f"{spelled}: {kind}; move it into the plugins/ glue")
        return False

    # scopes ----------------------------------------------------------------------------------------------------
    def _visit_scope(self, node: ast.AST, arguments: ast.arguments | None) -> None:
        for decorator in getattr(node, "decorator_list", []):
            self.visit(decorator)
        if arguments is not None:
            for default in arguments.defaults + [d for d in arguments.kw_defaults if d is not None]:
                self.visit(default)
        self.scopes.append(dict(self.scopes[-1]))
        if arguments is not None:
            for arg in arguments.posonlyargs + arguments.args + arguments.kwonlyargs + [
                    a for a in (arguments.vararg, arguments.kwarg) if a is not None]:
                self.bind(arg.arg, None)
        body = node.body if isinstance(node.body, list) else [node.body]
        for statement in body:
            self.visit(statement)
        self.scopes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:  # noqa: N802
        self._visit_scope(node, node.args)
        self.bind(node.name, None)

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815

    def visit_Lambda(self, node: ast.Lambda) -> None:  # noqa: N802
        self._visit_scope(node, node.args)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:  # noqa: N802
        for base in node.bases + [k.value for k in node.keywords]:
            self.visit(base)
        self._visit_scope(node, None)
        self.bind(node.name, None)

    # imports ---------------------------------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:  # noqa: N802
        for alias in node.names:
            root = alias.name.split(".", 1)[0]
            if root not in HOSTS:
                self.bind(alias.asname or root, None)
                continue
            ok = self.check_module_path(node, alias.name, f"import {alias.name}")
            if alias.asname:
                self.bind(alias.asname, f"module:{alias.name}" if ok else None)
            else:
                self.bind(root, f"module:{root}" if ok else None)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:  # noqa: N802
        module = node.module or ""
        if node.level == 0 and module == "importlib":
            for alias in node.names:
                if alias.name == "import_module":
                    self.import_module_names.add(alias.asname or alias.name)
        root = module.split(".", 1)[0]
        if node.level or root not in HOSTS:
            for alias in node.names:
                self.bind(alias.asname or alias.name, None)
            return
        ok = self.check_module_path(node, module, f"from {module} import "
                                                  f"{', '.join(a.name for a in node.names)}")
        for alias in node.names:
            public = ok and self.check_public(node, root, alias.name, f"from {module} import {alias.name}")
            self.bind(alias.asname or alias.name, f"object:{module}.{alias.name}" if public else None)

    # uses ------------------------------------------------------------------------------------------------------
    def visit_Name(self, node: ast.Name) -> None:  # noqa: N802
        if isinstance(node.ctx, ast.Store | ast.Del):
            self.bind(node.id, None)

    def _chain(self, node: ast.AST) -> tuple[str | None, list[str]]:
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        parts.reverse()
        return (node.id if isinstance(node, ast.Name) else None), parts

    def _check_chain(self, node: ast.AST, binding: str, parts: list[str], store: bool) -> None:
        kind, target = binding.split(":", 1)
        spelled = ".".join([target, *parts])
        if store:
            self.flag(node, f"{spelled} assigned or deleted: patching a host is glue (plugins/)")
            return
        rest = parts
        if kind == "module":
            if not parts or not self.check_public(node, target, parts[0], spelled):
                return
            rest = parts[1:]
        private = [p for p in rest if _private(p)]
        if private:
            self.flag(node, f"{spelled}: private name {private[0]!r} of a host object; move it into the plugins/ glue")

    def visit_Attribute(self, node: ast.Attribute) -> None:  # noqa: N802
        root, parts = self._chain(node)
        binding = self.lookup(root) if root else None
        if binding is None:
            self.generic_visit(node)
            return
        self._check_chain(node, binding, parts, isinstance(node.ctx, ast.Store | ast.Del))

    def visit_Call(self, node: ast.Call) -> None:  # noqa: N802
        function = node.func
        name = function.id if isinstance(function, ast.Name) else None
        if isinstance(function, ast.Attribute):
            root, parts = self._chain(function)
            name = ".".join([root, *parts]) if root else None
        first = node.args[0] if node.args else None
        constant = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
        if name in self.import_module_names and constant:
            self.check_module_path(node, constant, f"{name}({constant!r})")
        elif name in ("getattr", "setattr", "delattr", "hasattr") and isinstance(first, ast.Name):
            binding = self.lookup(first.id)
            if binding is not None and binding.startswith("module:"):
                attribute = node.args[1] if len(node.args) > 1 else None
                if name in ("setattr", "delattr"):
                    self.flag(node, f"{name}({first.id}, ...): patching a host is glue (plugins/)")
                elif isinstance(attribute, ast.Constant) and isinstance(attribute.value, str):
                    self._check_chain(node, binding, [attribute.value], store=False)
                else:
                    self.flag(node, f"{name}({first.id}, <computed>): a host name that cannot be checked")
        elif name == "sys.modules.get" and constant:
            self.check_module_path(node, constant, f"sys.modules.get({constant!r})")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:  # noqa: N802
        root, parts = self._chain(node.value)
        key = node.slice
        if [root, *parts] == ["sys", "modules"] and isinstance(key, ast.Constant) and isinstance(key.value, str):
            self.check_module_path(node, key.value, f"sys.modules[{key.value!r}]")
        self.generic_visit(node)


def check_source(source: str, path: str, public: dict[str, frozenset[str]]) -> list[Violation]:
    checker = HostNameChecker(path, public)
    checker.visit(ast.parse(source, filename=path))
    return checker.violations


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "plugins" not in p.relative_to(PACKAGE).parts)


@pytest.fixture(scope="module")
def public() -> dict[str, frozenset[str]]:
    return public_host_names()


def test_public_host_names_are_read_from_the_installed_hosts(public):
    assert {"ClipLoss", "create_model_and_transforms", "get_tokenizer", "list_models"} <= public["open_clip"]
    assert not {"loss", "factory", "transform", "gather_features", "_MODEL_CONFIGS"} & public["open_clip"]
    assert {"map", "batched", "gopen", "gopen_schemes", "WebDataset", "TarWriter"} <= public["webdataset"]
    assert not {"tenbin", "filters", "tariterators", "group_by_keys"} & public["webdataset"]


def test_nothing_outside_plugins_uses_a_private_host_name(public):
    files = package_files()
    assert len(files) > 20, files  # the package is really scanned
    violations = [v for path in files for v in check_source(path.read_text(encoding="utf-8"),
                                                            str(path.relative_to(REPO)), public)]
    assert not violations, "private host names outside plugins/ (move each into the plugins/ glue):\n" + \
        "\n".join(str(v) for v in violations)


def test_the_checker_catches_each_kind_of_private_use(public):
    """The rule on hand-written snippets: each line below is one violation, the allowed forms are none."""
    allowed = '''
import open_clip
import webdataset as wds
from open_clip import ClipLoss, create_model_and_transforms
import open_clip_medclip.plugins.openclip_data as glue

def f(wds_dir):
    model = open_clip.create_model_and_transforms("x")
    stage = wds.map(len), wds.batched(4), webdataset_free(wds_dir)
    loss = ClipLoss().forward
    tokenizer = getattr(open_clip, "get_tokenizer")
    return open_clip.__version__, glue.gather_features

def g():
    wds = "a local path, not webdataset"
    return wds.upper()

import webdataset
handle = webdataset.gopen("x")
'''
    assert check_source(allowed, "ok.py", public) == []
    bad = {
        "from open_clip.loss import gather_features": "open_clip.loss is a host submodule",
        "import open_clip.factory": "import open_clip.factory: open_clip.factory is a host submodule",
        "import open_clip\nopen_clip.factory._MODEL_CONFIGS": "open_clip.factory._MODEL_CONFIGS: not a public",
        "import open_clip\nopen_clip._private_thing": "open_clip._private_thing: private",
        "from open_clip import _MODEL_CONFIGS": "from open_clip import _MODEL_CONFIGS: private",
        "from open_clip import factory": "from open_clip import factory: not a public",
        "from open_clip import *": "star import",
        "import open_clip\nopen_clip.ClipLoss._secret": "private name '_secret' of a host object",
        "from open_clip import ClipLoss\nClipLoss._secret": "private name '_secret' of a host object",
        "import open_clip\nopen_clip.create_model = None": "patching a host is glue",
        "import open_clip\nsetattr(open_clip, 'x', 1)": "patching a host is glue",
        "import open_clip\nname = 'x'\ngetattr(open_clip, name)": "cannot be checked",
        "import open_clip\ngetattr(open_clip, '_MODEL_CONFIGS')": "open_clip._MODEL_CONFIGS: private",
        "def f():\n    from open_clip_train.params import parse_args": "open_clip_train is used only in the plugins/",
        "import open_clip_train.data as ocd": "open_clip_train is used only in the plugins/",
        "import clip_benchmark": "clip_benchmark is used only in the plugins/",
        "from webdataset.tariterators import group_by_keys": "webdataset.tariterators is a host submodule",
        "import webdataset as wds\nwds.filters.shuffle": "webdataset.filters.shuffle: not a public",
        "import importlib\nimportlib.import_module('webdataset.gopen')": "import_module('webdataset.gopen'): webdataset.gopen is",
        "from importlib import import_module as im\nim('open_clip.loss')": "im('open_clip.loss'): open_clip.loss is a host",
        "__import__('open_clip_train.main')": "open_clip_train is used only in the plugins/",
        "import sys\nsys.modules['open_clip.factory']": "sys.modules['open_clip.factory']: open_clip.factory is",
        "import sys\nsys.modules.get('open_clip_train.data')": "open_clip_train is used only in the plugins/",
    }
    for source, expected in bad.items():
        found = check_source(source, "bad.py", public)
        assert len(found) == 1 and expected in found[0].what, (source, [str(v) for v in found])
        assert found[0].line == source.count("\n") + 1, (source, found)


def _hosts_imported(tree: ast.Module) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots & set(HOSTS)


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "plugins").glob("*.py") if p.name != "__init__.py"),
                         ids=lambda p: p.name)
def test_each_glue_module_says_which_host_names_it_touches(path: Path):
    """Issue 23: the glue is split by job, and each module's docstring names the hosts it touches."""
    tree = ast.parse(path.read_text())
    docstring = ast.get_docstring(tree) or ""
    unnamed = [host for host in sorted(_hosts_imported(tree)) if f"{host}." not in docstring
               and f"`{host}`" not in docstring]
    assert docstring and not unnamed, f"{path.name}: docstring does not name {unnamed}"
