"""Host glue for plain `python -m open_clip_train.main` / `torchrun -m open_clip_train.main` (opt-in autoload).

Light on purpose: the autoload calls `hook_params` while `open_clip_train.main` is still being imported, so nothing
here may import the trainer. It wraps `open_clip_train.params.parse_args`, which the trainer's `main` binds (also as
`__main__`); the wrapper hands over to `plugins.openclip_train.host_parse_args` with the caller's module namespace.
Any other caller of `parse_args` gets the original behaviour.
"""
from __future__ import annotations

import functools
import sys
from types import ModuleType

HOOK_MARK = "_open_clip_medclip_host_hook"


def hook_params(params: ModuleType) -> None:
    """Wrap `params.parse_args` (idempotent)."""
    original = getattr(params, "parse_args", None)
    if original is None:
        raise RuntimeError("open_clip_medclip supports open_clip_train 3.3.x; open_clip_train.params.parse_args is gone. "
                           "Install 'open_clip_torch>=3.3,<3.4'.")
    if getattr(original, HOOK_MARK, False):
        return

    @functools.wraps(original)
    def parse_args(args=None):
        caller = sys._getframe(1).f_globals
        from open_clip_medclip.plugins import openclip_train

        return openclip_train.host_parse_args(original, args, caller)

    setattr(parse_args, HOOK_MARK, True)
    params.parse_args = parse_args
