"""Host glue for plain `python -m open_clip_train.main` / `torchrun -m open_clip_train.main` (opt-in autoload).

Light on purpose: the autoload (`open_clip_medclip.autoload`) calls `hook_params` right after
`open_clip_train.params` is imported, which happens in the middle of importing `open_clip_train.main`, so nothing
here may import the trainer. `hook_params` wraps `open_clip_train.params.parse_args`; `open_clip_train.main`
binds that wrapper with `from open_clip_train.params import parse_args`, also when it runs as `__main__`. When
the trainer's `main` calls it, the wrapper hands over to `plugins.openclip_train.host_parse_args` with the
caller's module namespace, which accepts the `--medclip-*` flags and installs the MedCLIP entry points for
MedCLIP models only (see there). Any other caller of `parse_args` gets the original behaviour.
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
