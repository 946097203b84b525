"""Imported by a `medclip shards build` subprocess in tests: each sample takes 20 ms longer, so a test can press
Ctrl-C mid-build. A module (not a lambda) so that the fork pool can pickle the patched function."""
from __future__ import annotations

import time

from open_clip_medclip.shards import builder

_process = builder._process


def slow_process(index: int):
    time.sleep(0.02)
    return _process(index)


builder._process = slow_process
