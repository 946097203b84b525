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
from pathlib import Path
from types import ModuleType

AUTOLOAD_MODULE = "open_clip_medclip_autoload"
AUTOLOAD_PTH = "open_clip_medclip_autoload.pth"
WATCHED = ("open_clip", "open_clip_train.params")

# What the written module adds after the text of `import_hook.py` (the one post-import hook): its start-up
# imports stay `importlib.abc` and `sys`, and the plugin is imported only once a watched module has run.
_AUTOLOAD_TAIL = '''

# ---- open_clip_medclip autoload (written by `medclip train --install-autoload`; remove: --uninstall-autoload):
# calls open_clip_medclip.autoload.after_import(name, module) right after each module in WATCHED has run.
WATCHED = @WATCHED@


def _call_plugin(name, module):
    try:
        from open_clip_medclip.autoload import after_import
    except Exception as exc:  # the plugin was uninstalled: never break plain open_clip
        print(f"open_clip_medclip autoload: {exc!r}; remove {__file__} or reinstall open_clip_medclip",
              file=sys.stderr)
        return
    after_import(name, module)


if not any(type(f).__module__ == __name__ for f in sys.meta_path):
    AfterImport.install(WATCHED, _call_plugin)
'''.replace("@WATCHED@", repr(WATCHED))


def autoload_source() -> str:
    """The text of the autoload module: `import_hook.py` (stdlib only, self-contained) plus `_AUTOLOAD_TAIL`."""
    hook = Path(__file__).with_name("import_hook.py").read_text(encoding="utf-8")
    return hook.rstrip("\n") + "\n" + _AUTOLOAD_TAIL


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

    write_text(module_path, autoload_source())  # the module first: a .pth without it would fail at every start-up
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

