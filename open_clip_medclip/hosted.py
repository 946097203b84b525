"""Host pieces the library calls but does not import (dependencies run one way: tests/test_dependencies.py).

The glue provides them (`provide`, from `plugins.openclip_models.install`, run by `open_clip_medclip.register()`
whenever `open_clip` is imported); the library looks them up by name (`piece`).
"""
from __future__ import annotations

from collections.abc import Callable

_PIECES: dict[str, Callable] = {}


def provide(**pieces: Callable) -> None:
    """Hand host pieces to the library (the glue calls this; idempotent)."""
    _PIECES.update(pieces)


def piece(name: str) -> Callable:
    """The host piece `name`; importing `open_clip` registers this package, whose glue provides every piece."""
    if name not in _PIECES:
        import open_clip  # noqa: F401  (open_clip_medclip's import hook runs register() right after it)
    try:
        return _PIECES[name]
    except KeyError:
        raise RuntimeError(f"host piece {name!r} was not provided: import open_clip_medclip before open_clip "
                           "(or call open_clip_medclip.register())") from None
