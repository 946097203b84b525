"""The `medclip` command: one entry point, one module per subcommand, one way of failing.

Each subcommand module exposes `main(argv: list[str] | None) -> int` with its own argparse parser, so it
also runs as `python -m <module>` and tests call it directly. Subcommands raise `errors.UserError` for user
mistakes; `run_command` turns it into one line, `medclip <command>: <message>`, and exit code 2. Common input
faults that escape a subcommand (a missing or unreadable file, undecodable text, a malformed CSV) become one line
naming the file the same way; anything else is a bug and keeps its traceback. `--debug` anywhere on the command
line (or MEDCLIP_DEBUG=1) shows the traceback for user errors too.

Light on purpose: `medclip --help` imports neither torch nor open_clip.
"""
from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from open_clip_medclip.errors import USER_ERROR_EXIT_CODE, UserError, debug_requested, did_you_mean

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("open_clip_medclip.weights_cli", "convert an official MedCLIP checkpoint to an OpenCLIP local-dir"),
    "info": ("open_clip_medclip.weights_cli", "say what a checkpoint file or folder is"),
    "smoke": ("open_clip_medclip.smoke", "embed a bundled real X-ray and a few sentences with a MedCLIP model"),
    "label": ("open_clip_medclip.knowledge.cli", "label report sentences with the 14 CheXpert findings"),
    "shards": ("open_clip_medclip.shards.cli", "build or validate labelled WebDataset shards"),
    "train": ("open_clip_medclip.train", "train inside OpenCLIP's trainer with the semantic matching loss"),
    "eval": ("open_clip_medclip.eval.cli", "zero-shot, retrieval, linear-probe and fine-tuning evaluation"),
    "predict": ("open_clip_medclip.predict_cli", "zero-shot predictions (and heatmaps) for your own X-ray files"),
    "demo": ("open_clip_medclip.demo", "label, shard, train and evaluate on the bundled real sample"),
}
# Subcommands whose own parser also takes --debug (OpenCLIP's trainer: debug logging); it is passed on to them.
PASSES_DEBUG_ON = frozenset({"train"})

# OSError numbers that describe the user's files or machine, not a bug in this package.
_USER_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOENT", "EACCES", "EPERM", "EISDIR", "ENOTDIR", "EEXIST", "ENOSPC",
                                      "EDQUOT", "EROFS", "ENAMETOOLONG", "ENOTEMPTY", "EXDEV")
    if hasattr(errno, name)
)
_PACKAGE_DIR = Path(__file__).resolve().parent


def _usage() -> str:
    commands = [f"  {name:<8} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(["usage: medclip <command> [options]", "", "commands:", *commands, "",
                      "Run 'medclip <command> --help' for a command's options; add --debug to see tracebacks."])


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _inside_installation(filename: str) -> bool:
    """A file of this package or of an installed library: missing means a broken install or a bug."""
    try:
        path = Path(filename).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    roots = [_PACKAGE_DIR]
    import sysconfig

    roots += [Path(p).resolve() for key in ("purelib", "platlib") if (p := sysconfig.get_paths().get(key))]
    return any(path == root or root in path.parents for root in roots)


def _wrapped_user_error(exc: BaseException) -> UserError | None:
    """A UserError that a library re-raised inside another exception carrying its message (OpenCLIP does this
    around downloads: RuntimeError(f"Failed to download weights ...: {e}"))."""
    seen = set()
    inner = exc.__cause__ or exc.__context__
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        if isinstance(inner, UserError) and str(inner) and str(inner) in str(exc):
            return inner
        inner = inner.__cause__ or inner.__context__
    return None


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for a user-facing failure, or None when `exc` is a bug (keep the traceback)."""
    if isinstance(exc, UserError):
        return _one_line(exc) or type(exc).__name__
    wrapped = _wrapped_user_error(exc)
    if wrapped is not None:
        return _one_line(wrapped)
    if isinstance(exc, UnicodeDecodeError):
        byte = exc.object[exc.start:exc.start + 1]
        return (f"text is not valid {exc.encoding} (byte {byte!r} at offset {exc.start}: {exc.reason}); "
                "convert the file to UTF-8 or pass its encoding (--encoding) where the command has that option")
    if type(exc).__name__ == "Error" and type(exc).__module__ in ("_csv", "csv"):
        return f"malformed CSV: {_one_line(exc)}"
    if type(exc).__name__ == "UnidentifiedImageError":  # PIL: the message names the file
        return f"{_one_line(exc)} (not an image PIL can read)"
    if isinstance(exc, ModuleNotFoundError) and exc.name and not exc.name.startswith("open_clip_medclip"):
        return (f"the Python package providing {exc.name.split('.')[0]!r} is not installed; "
                "install it (see the README's installation section)")
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
        if exc.filename is not None:
            if _inside_installation(os.fsdecode(exc.filename)):
                return None  # a file of the package itself: broken install or bug
            where = os.fsdecode(exc.filename)
            if exc.filename2 is not None:
                where += f" -> {os.fsdecode(exc.filename2)}"
            return f"{where}: {exc.strerror or _one_line(exc)}"
        return _one_line(exc) or exc.strerror or None
    return None


class _DropLoggedUserError(logging.Filter):
    """Drop a log record that repeats the UserError being handled right now (OpenCLIP logs a download failure with
    `logging.error` before re-raising it); the entry point prints that message once."""

    def filter(self, record: logging.LogRecord) -> bool:
        handling = sys.exc_info()[1]
        if handling is None:
            return True
        user_error = handling if isinstance(handling, UserError) else _wrapped_user_error(handling)
        return user_error is None or not str(user_error) or str(user_error) not in record.getMessage()


def run_command(command: str, function: Callable[[], int | None], debug: bool | None = None) -> int:
    """Run a subcommand body with the one-way-of-failing policy; returns the exit code.

    Other entry points (e.g. a module's `if __name__ == "__main__":`) can use it too:
    `raise SystemExit(run_command("label", lambda: main(argv)))`.
    """
    debug = debug_requested(sys.argv[1:]) if debug is None else debug
    dedup = _DropLoggedUserError()
    root = logging.getLogger()
    if not debug:
        root.addFilter(dedup)
    try:
        return int(function() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        _exit_quietly_on_another_interrupt()
        print(f"medclip {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `medclip ... | head`: the reader left; not an error worth a traceback
        _silence_stdout()
        return 141
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise  # a bug: keep the traceback
        if debug:
            traceback.print_exc()
        print(f"medclip {command}: {message}", file=sys.stderr)
        return getattr(exc, "exit_code", USER_ERROR_EXIT_CODE) if isinstance(exc, UserError) else USER_ERROR_EXIT_CODE
    finally:
        root.removeFilter(dedup)


def _exit_quietly_on_another_interrupt() -> None:
    """A second Ctrl-C while the command winds down (cleanup, interpreter exit) ends the process at once with
    code 130 and no traceback. Everything the commands write is atomic, so what is on disk stays resumable."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _strip_debug(argv: list[str]) -> list[str]:
    """Remove `--debug` (but not after a `--` separator)."""
    out, passthrough = [], False
    for arg in argv:
        if arg == "--":
            passthrough = True
        if arg == "--debug" and not passthrough:
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    original = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(original)
    argv = _strip_debug(original)
    if not argv or argv[0] in ("-h", "--help"):
        return run_command("--help", lambda: print(_usage()), debug)
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"medclip: unknown command {name!r}{did_you_mean(name, SUBCOMMANDS)}; "
              "run 'medclip --help' for the list of commands", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    rest = original[original.index(name) + 1:] if name in PASSES_DEBUG_ON else argv[1:]
    module_name = SUBCOMMANDS[name][0]

    def body() -> int | None:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise UserError(f"command {name!r} is not available in this version") from exc
            raise
        return module.main([name, *rest] if name in ("convert", "info") else rest)

    return run_command(name, body, debug)


if __name__ == "__main__":
    raise SystemExit(main())
