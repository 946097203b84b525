"""Opt-in autoload: OpenCLIP's own commands find and train MedCLIP models without an explicit import.

`medclip train --install-autoload` writes two files into site-packages (or `--autoload-site-dir`):
`open_clip_medclip_autoload.pth` (one line, `import open_clip_medclip_autoload`) and that top-level module. It
imports nothing heavy at start-up: a meta-path finder waits for two imports and calls `after_import` right after
each has run:
- `open_clip`: imports `open_clip_medclip`, which registers the MedCLIP model configs, poolers and tags, so
  `open_clip.create_model('medclip-swin')` and `clip_benchmark eval --model medclip-swin` work;
- `open_clip_train.params`: wraps its `parse_args` (`plugins/openclip_main.py`), so plain
  `python -m open_clip_train.main --model medclip-* ...` and `torchrun -m open_clip_train.main ...` accept the
  `--medclip-*` flags and train MedCLIP on MedCLIP shards with the semantic matching loss; other models are not
  touched beyond a webdataset compatibility fix.
`medclip train --uninstall-autoload` removes both files. Opt-in because `.pth` lines run in every Python start of
that environment (and are skipped under `python -S`).
"""
from __future__ import annotations

import os
from types import ModuleType

AUTOLOAD_MODULE = "open_clip_medclip_autoload"
AUTOLOAD_PTH = "open_clip_medclip_autoload.pth"
WATCHED = ("open_clip", "open_clip_train.params")

AUTOLOAD_SOURCE = '''"""open_clip_medclip autoload (written by `medclip train --install-autoload`; remove: --uninstall-autoload).

A top-level module so start-up imports nothing heavy: a meta-path finder waits for the imports in WATCHED and
calls open_clip_medclip.autoload.after_import(name, module) right after each has run.
"""
import importlib.abc
import sys

WATCHED = @WATCHED@


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.pending = set(WATCHED)

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            try:
                from open_clip_medclip.autoload import after_import
            except Exception as exc:  # the plugin was uninstalled: never break plain open_clip
                print(f"open_clip_medclip autoload: {exc!r}; remove {__file__} or reinstall open_clip_medclip",
                      file=sys.stderr)
                return
            after_import(name, module)

        spec.loader.exec_module = exec_then_hook
        return spec


if not any(type(f).__name__ == "_AfterImport" for f in sys.meta_path):
    _finder = _AfterImport()
    _finder.pending -= set(sys.modules)
    if _finder.pending:
        sys.meta_path.insert(0, _finder)
'''.replace("@WATCHED@", repr(WATCHED))


def after_import(name: str, module: ModuleType) -> None:
    """Called by the autoload right after `name` was imported."""
    if name == "open_clip":
        import open_clip_medclip  # noqa: F401  (registers the MedCLIP models)
        from open_clip_medclip.plugins.clip_benchmark import install_if_clip_benchmark_running

        install_if_clip_benchmark_running()  # plain `clip_benchmark eval`: the suite's prompts, no NaN metrics
    elif name == "open_clip_train.params":
        from open_clip_medclip.plugins.openclip_main import hook_params

        hook_params(module)


def default_site_dir() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def install_autoload(site_dir: str | None = None) -> list[str]:
    """Write the `.pth` hook and its module into `site_dir` (default: this interpreter's site-packages)."""
    site_dir = site_dir or default_site_dir()
    os.makedirs(site_dir, exist_ok=True)
    module_path = os.path.join(site_dir, AUTOLOAD_MODULE + ".py")
    pth_path = os.path.join(site_dir, AUTOLOAD_PTH)
    from open_clip_medclip.atomic import write_text

    write_text(module_path, AUTOLOAD_SOURCE)  # the module first: a .pth without it would fail at every start-up
    write_text(pth_path, f"import {AUTOLOAD_MODULE}\n")
    return [pth_path, module_path]


def uninstall_autoload(site_dir: str | None = None) -> list[str]:
    """Remove what `install_autoload` wrote; returns the files removed."""
    site_dir = site_dir or default_site_dir()
    removed = []
    for name in (AUTOLOAD_PTH, AUTOLOAD_MODULE + ".py"):
        path = os.path.join(site_dir, name)
        if os.path.exists(path):
            os.remove(path)
            removed.append(path)
    return removed


def installed(site_dir: str | None = None) -> bool:
    return os.path.exists(os.path.join(site_dir or default_site_dir(), AUTOLOAD_PTH))

