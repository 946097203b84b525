"""Imported by a `medclip shards build` subprocess in tests: each sample takes 200 ms longer, so a test can press
Ctrl-C mid-build even on a loaded machine (the 200-sample build would take ~20 s; its third shard is there in ~1 s).
A module (not a lambda) so that the fork pool can pickle the patched function."""
from __future__ import annotations

import time

from open_clip_medclip.shards import builder

_process = builder._process


def slow_process(index: int):
    time.sleep(0.2)
    return _process(index)


builder._process = slow_process
