"""One way of failing for every `medclip` subcommand.

A `UserError` is a problem with the user's input or machine (a bad file, a missing device, a wrong name): the
`medclip` entry point prints it as one line, `medclip <command>: <message>`, and exits with code 2. Anything
else is a bug and keeps its traceback. `--debug` (anywhere on the command line) shows the traceback for user
errors too. Light on purpose: no torch or open_clip import here, so every CLI can use it at start-up.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import signal
import threading
from collections.abc import Iterable, Iterator

USER_ERROR_EXIT_CODE = 2
WORK_NOT_DONE_EXIT_CODE = 1


class UserError(Exception):
    """What went wrong, where (file, row, member) and what to do, in one line."""

    exit_code = USER_ERROR_EXIT_CODE


class WorkNotDone(UserError):
    """The command ran without a fault in its input but the work asked for did not happen (nothing found,
    every input rejected, nothing written, the host refused): one line naming why, exit code 1, so that a
    script or a cluster job sees the failure instead of a success with empty outputs."""

    exit_code = WORK_NOT_DONE_EXIT_CODE


def did_you_mean(name: str, choices: Iterable[str], limit: int = 3) -> str:
    """' (did you mean: a, b?)' for the closest choices, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=limit, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def unknown_name_error(kind: str, name: str, choices: Iterable[str], hint: str = "") -> UserError:
    """`unknown <kind> 'x' (did you mean: ...?)[; hint]`; never dumps the whole list of choices."""
    return UserError(f"unknown {kind} {name!r}{did_you_mean(name, choices)}" + (f"; {hint}" if hint else ""))


def resolve_device(requested: str | None) -> str:
    """The device policy shared by every command: default 'cuda' when available else 'cpu'; an explicitly
    requested accelerator that this machine lacks is a user error, never a silent CPU fallback."""
    import torch  # only commands that run a model call this

    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = requested.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: this machine has no CUDA device; use --device cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {requested}: MPS is not available on this machine; use --device cpu")
    return requested


@contextlib.contextmanager
def handling_signal(signum: int, handler) -> Iterator[None]:
    """`handler` for `signum` inside the block (the main thread only: elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def debug_requested(argv: list[str]) -> bool:
    """True when `--debug` is on the command line or MEDCLIP_DEBUG=1 is set."""
    return "--debug" in argv or os.environ.get("MEDCLIP_DEBUG", "") not in ("", "0")
