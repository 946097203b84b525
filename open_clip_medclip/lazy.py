"""`lazy_attributes`: the PEP 562 `__getattr__` / `__dir__` pair for a package whose public names are imported on
first use (so importing the package, or one of its submodules, imports none of the others). Standard library only.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping


def lazy_attributes(package: str, names: Mapping[str, str],
                    public: Iterable[str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__, __dir__ = lazy_attributes(__name__, {"Name": "submodule", ...}, __all__)`.

    `names` maps each lazy name to the module that defines it, relative to `package` ("submodule", or
    ".sibling.module" one level up); the value is cached in the package's namespace on first access.
    """
    module = sys.modules[package]
    public = tuple(public)

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{names[name]}", package), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(public))

    return __getattr__, __dir__
