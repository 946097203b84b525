"""Host glue: the only code that touches OpenCLIP, open_clip_train or CLIP_benchmark internals (see README.md)."""
from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType


class HostMismatchError(RuntimeError):
    """A host package changed in a way this plugin was not built for."""


def missing_attributes(required: Mapping[ModuleType, tuple[str, ...]]) -> list[str]:
    """'module.attr' for every required attribute that is gone."""
    return [f"{mod.__name__}.{attr}" for mod, attrs in required.items() for attr in attrs if not hasattr(mod, attr)]


def require_host(missing: list[str], host: str, installed: str, pin: str) -> None:
    """Fail loudly, naming each missing attribute and the supported version."""
    if missing:
        raise HostMismatchError(
            f"open_clip_medclip supports {host}; this install ({installed}) lacks {', '.join(missing)}. "
            f"Install '{pin}'."
        )
